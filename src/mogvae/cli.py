"""The `mogvae` command. Every user error is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from pydantic import ValidationError

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we want one line
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mogvae", description="Expressive priors vs posteriors in VAEs, measured exactly.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("reproduce", help="train and evaluate the paper's models over seeds; write figures and a report")
    r.add_argument("--out", type=Path, default=Path("reproduce-out"), help="output folder (default: reproduce-out)")
    r.add_argument("--seeds", type=int, help="seeds per model (default 5)")
    r.add_argument("--epochs", type=int, help="training epochs (default: the configured plateau)")
    r.add_argument("--models", nargs="+", help="subset of mfg mog-prior mog-posterior mog-both")
    r.add_argument("--workers", type=int, help="worker processes (0 = one per core)")
    r.add_argument("--device", help="cpu (default) or cuda")
    r.add_argument("--quick", action="store_true", help="toy size, well under a minute: a smoke test")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    t = sub.add_parser("train", help="train one configuration (R seeds) into a run folder; re-run to resume")
    t.add_argument("config", type=Path, help="TOML file (see examples/run.toml)")
    t.add_argument("--out", type=Path, required=True, help="run folder (created, or resumed)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.lr=3e-4 (repeatable)")
    return p


def _study_config(args):
    from .config import StudyConfig, quick
    updates = {}
    if args.seeds is not None:
        updates["seeds"] = args.seeds
    if args.models:
        updates["models"] = tuple(args.models)
    if args.workers is not None:
        updates["workers"] = args.workers
    base = StudyConfig(**updates)
    train = {}
    if args.epochs is not None:
        train["epochs"] = args.epochs
    if args.device:
        train["device"] = args.device
    if train:
        base = StudyConfig(**{**base.model_dump(), "train": {**base.train.model_dump(), **train}})
    config = quick(base) if args.quick else base
    if args.epochs is not None and args.quick:
        config = config.model_copy(update={"train": config.train.model_copy(update={"epochs": args.epochs})})
    return config


def _check_device(device: str) -> None:
    import torch
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UsageError(f"--device {device!r}: choose cpu or cuda")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out}: folder is not empty (pass --overwrite to replace it)")
        if not (out / "config.json").exists():
            raise UsageError(f"--out {out}: refusing to overwrite a folder that is not a mogvae output")
        shutil.rmtree(out)


def reproduce(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .plots import all_figures
    from .report import write_report
    from .study import choose_workers, run_study

    config = _study_config(args)
    _check_device(config.train.device)
    _prepare_out(args.out, args.overwrite)
    console = Console(stderr=True)
    console.print(f"mogvae reproduce: {len(config.models)} models x {config.seeds} seeds, "
                  f"{config.train.epochs} epochs, {choose_workers(config)} worker(s) -> {args.out}")
    start = time.perf_counter()
    with Progress(TextColumn("{task.description:>14}"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        tasks = {m: progress.add_task(m, total=config.train.epochs) for m in config.models}
        run_study(config, args.out, lambda model, epoch: progress.update(tasks[model], completed=epoch))
    figures = all_figures(args.out, list(config.models))
    report = write_report(args.out, list(config.models), figures)
    _print_table(console, args.out, list(config.models))
    console.print(f"done in {time.perf_counter() - start:.1f} s: {report}")
    return 0


def _print_table(console, out: Path, models: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from .report import TABLE, load_metrics, summary_rows
    table = Table(title="mean ± sd over seeds (nats per test point)")
    for label in ["model", "runs", "diverged", *(t[1] for t in TABLE)]:
        table.add_column(label, justify="left" if label == "model" else "right")
    for row in summary_rows(load_metrics(out / "metrics.csv"), models):
        table.add_row(*row)
    Console(width=max(console.width, 190)).print(table)  # wide enough for every column, also in logs


def train(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .runs import RunError, RunSession, load_run_config

    console = Console(stderr=True)
    try:
        config = load_run_config(args.config, args.overrides)
        _check_device(config.train.device)
        session = RunSession(config, args.out, log=lambda m: console.print(m, soft_wrap=True))  # refusals happen here
    except RunError as e:
        raise UsageError(str(e)) from None
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("train", total=config.train.epochs, completed=session.trainer.epoch)
        metrics = session.train(on_epoch=lambda e: progress.update(task, completed=e))
    console.print(f"done: {metrics}")
    return 0


COMMANDS = {"reproduce": reproduce, "train": train}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"mogvae: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "configuration"
        value = err.get("input")
        got = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
        print(f"mogvae: error: {where}: {err['msg']}{got}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mogvae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
