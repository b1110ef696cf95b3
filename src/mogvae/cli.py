"""The `mogvae` command. Every user error is one line on stderr and exit code 2;
every other fault (a full disk, SIGTERM, a bug) is one line too, never a traceback
(MOGVAE_TRACEBACK=1 shows it), and leaves a state that a re-run can use."""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from .runs.allocator import keep_freed_memory

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_SIGTERM = 128 + signal.SIGTERM
EXIT_SIGINT = 128 + signal.SIGINT
INPUT_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EEXIST,
                errno.EISDIR, errno.ENOENT, errno.ELOOP}  # the path asked for is unusable: the user's to fix


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption), handled like Ctrl-C: temporaries are
    removed on the way out and the folder is left as a re-run expects it."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _folder(text: str) -> Path:
    """An --out value: Path("") would silently mean the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; name a folder")
    return Path(text)


def _address(text: str) -> str:
    """A --scheduler value: an empty one would silently mean 'train here'."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty address; name a Dask scheduler, e.g. tcp://HOST:8786")
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we want one line
        raise UsageError(message)

    def exit(self, status=0, message=None):  # --help and --version print, then exit here
        if message:
            print(message, file=sys.stderr, end="")
        raise SystemExit(status)


NO_REPORT = ("train and evaluate every run and write metrics.csv, but draw no figure and write no report "
             "(`mogvae report DIR` writes them later); where runs are trained, a report from before, which then "
             "no longer matches, is removed")


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .studies import STUDIES
    p = _Parser(prog="mogvae", description="Expressive priors vs posteriors in VAEs, measured exactly.")
    p.add_argument("--version", action="version", version=f"mogvae {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    r = sub.add_parser("reproduce", help="train and evaluate the paper's models over seeds; write figures and a report")
    r.add_argument("--out", type=_folder, default=Path("reproduce-out"), help="output folder (default: reproduce-out)")
    r.add_argument("--seeds", type=int, help="seeds per model (default 5)")
    r.add_argument("--epochs", type=int, help="training epochs (default: the configured plateau)")
    r.add_argument("--models", nargs="+", help="subset of mfg mog-prior mog-posterior mog-both")
    r.add_argument("--workers", type=int, help="worker processes (0 = one per core)")
    r.add_argument("--device", help="cpu (default) or cuda")
    r.add_argument("--quick", action="store_true", help="toy size, well under a minute: a smoke test")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an earlier mogvae reproduce output (only the files it wrote are deleted)")
    r.add_argument("--no-report", action="store_true", help=NO_REPORT)
    t = sub.add_parser("train", help="train one configuration (R seeds) into a run folder; re-run to resume")
    t.add_argument("config", type=Path, help="TOML file (see examples/run.toml)")
    t.add_argument("--out", type=_folder, required=True, help="run folder (created, or resumed)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.lr=3e-4 (repeatable)")
    t.add_argument("--tensorboard", action="store_true",
                   help="also write per-replica curves to DIR/tensorboard (extra: mogvae[tensorboard])")
    t.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (default 1: measured faster for these small matrices, and 15x "
                        "faster than 2 on a loaded machine; see docs/speed.md)")
    w = sub.add_parser("sweep", help="train a grid of runs (SPEC: a train configuration plus [grid]); "
                                     "re-run to resume")
    w.add_argument("spec", type=Path, help="TOML: a `mogvae train` configuration plus a [grid] table "
                                          "(see examples/sweep.toml)")
    w.add_argument("--out", type=_folder, required=True, help="sweep folder (created, or resumed)")
    where = w.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="local worker processes (default: one per core)")
    where.add_argument("--scheduler", metavar="ADDRESS", type=_address,
                       help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (needs a shared filesystem)")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of every cell, e.g. --set train.epochs=50 (repeatable)")
    w.add_argument("--tensorboard", action="store_true",
                   help="also write per-replica curves into each run folder's tensorboard/")
    w.add_argument("--extend", action="store_true",
                   help="let a re-run add cells to the folder's grid (finished runs are kept; "
                        "a changed or removed cell is still refused)")
    w.add_argument("--no-report", action="store_true", help=NO_REPORT)
    st = sub.add_parser("study", help="a built-in study: a sweep with its own figures and reading")
    st.add_argument("name", choices=list(STUDIES), help="; ".join(f"{s.name}: {s.summary}" for s in STUDIES.values()))
    st.add_argument("--out", type=_folder, required=True, help="study folder (created, or resumed)")
    st.add_argument("--seeds", type=int, help="seeds per cell (default: the study's, 10)")
    st_where = st.add_mutually_exclusive_group()
    st_where.add_argument("--workers", type=int, help="local worker processes (default: one per core)")
    st_where.add_argument("--scheduler", metavar="ADDRESS", type=_address, help="an existing Dask scheduler instead")
    st.add_argument("--quick", action="store_true", help="the same pipeline at toy size, in about a minute")
    st.add_argument("--tensorboard", action="store_true",
                    help="also write per-replica curves into each run folder's tensorboard/")
    st.add_argument("--extend", action="store_true",
                    help="let a re-run add cells to the folder's grid (finished runs are kept; "
                         "a changed or removed cell is still refused)")
    st.add_argument("--no-report", action="store_true", help=NO_REPORT)
    rp = sub.add_parser("report", help="write report.md and report.html of a run, sweep, study or reproduce "
                                       "folder, from its saved files")
    rp.add_argument("dir", type=Path, help="a folder written by mogvae train, sweep, study or reproduce")
    c = sub.add_parser("config", help="print every configuration key with its default and meaning, as TOML")
    c.add_argument("--show", action="store_true", help="print the defaults (the only action; the default)")
    return p


def _study_config(args):
    from .config.schema import ReproduceConfig, quick
    updates = {}
    if args.seeds is not None:
        updates["seeds"] = args.seeds
    if args.models:
        duplicated = sorted({m for m in args.models if args.models.count(m) > 1})
        if duplicated:
            raise UsageError(f"--models: {', '.join(duplicated)} given more than once")
        updates["models"] = tuple(args.models)
    if args.workers is not None:
        updates["workers"] = args.workers
    base = ReproduceConfig(**updates)
    train = {}
    if args.epochs is not None:
        train["epochs"] = args.epochs
    if args.device:
        train["device"] = args.device
    if train:
        base = ReproduceConfig(**{**base.model_dump(), "train": {**base.train.model_dump(), **train}})
    config = quick(base) if args.quick else base
    if args.epochs is not None and args.quick:
        config = config.model_copy(update={"train": config.train.model_copy(update={"epochs": args.epochs})})
    return config


def _check_tensorboard(args) -> None:
    from .training.tensorboard import CurveLogUnavailable, check_available
    if getattr(args, "tensorboard", False):
        try:
            check_available()
        except CurveLogUnavailable as e:
            raise UsageError(str(e)) from None


def _check_device(device: str) -> None:
    from .training.trainer import check_device
    try:
        check_device(device)
    except ValueError as e:
        raise UsageError(str(e)) from None


def reproduce(args) -> int:
    """The paper's study (also `mogvae study paper`): checked like every plan before its folder
    is claimed, then trained on local workers or a Dask scheduler, and reported."""
    from .runs import reproduce as study
    from .runs.executors import SchedulerUnavailable, check_scheduler
    from .runs.sweep import SpecError, preflight
    from .storage.folders import OutputError

    config = _study_config(args)
    scheduler = getattr(args, "scheduler", None)
    _check_tensorboard(args)
    sweep = None                        # the folder, once claimed and locked
    try:
        if scheduler:
            check_scheduler(scheduler)  # before the folder is made
        cells = study.cells_of(config)
        preflight(cells, local=scheduler is None)
        sweep = study.claim_output(args.out, config, args.overwrite)
        sweep.check(cells)  # a resume must ask for the same study
        pending = sweep.pending(cells)
    except (OutputError, SpecError, SchedulerUnavailable) as e:
        if sweep is not None:
            sweep.release()
        raise UsageError(str(e).replace("use a new folder", "pass --overwrite to replace it")) from None
    try:
        return _reproduce_in(sweep, args, config, cells, pending, scheduler)
    finally:
        sweep.release()


def _reproduce_in(sweep, args, config, cells, pending, scheduler) -> int:
    """reproduce's work once its folder is locked and checked."""
    from rich.console import Console

    from .runs import reproduce as study
    from .runs.progress import SweepProgress
    args.after_interrupt = f"{args.out} keeps every finished epoch: re-run the same command to resume"
    console = Console(stderr=True)
    console.print(f"mogvae reproduce: {len(config.models)} models x {config.seeds} seeds, "
                  f"{config.train.epochs} epochs, {sweep.describe(cells)} -> {args.out}", highlight=False,
                  soft_wrap=True)
    start = time.perf_counter()
    with SweepProgress(console, {c.name: c.config.train.epochs for c in pending}, len(cells) - len(pending)) as p:
        study.run(config, sweep, p, scheduler=scheduler, tensorboard=getattr(args, "tensorboard", False),
                  after=_drawers(args, cells))
    report, removed = _report_unless_told(args, pending, _reproduce_report)
    _print_table(console, args.out / "metrics.csv", list(config.models))
    _print_ending(console, report, time.perf_counter() - start, args.out, removed)
    return 0


def _print_table(console, path: Path, names: list[str], by: str | None = "model", first: str = "model") -> None:
    """The results a command ends with: per model (or run), mean ± sd over seeds of metrics.csv."""
    from rich.console import Console
    from rich.table import Table

    from .report.statistics import load_metrics, shown_columns, summary_rows
    metrics = load_metrics(path, by, label=names[0])
    columns = shown_columns(metrics)
    table = Table(title="mean ± sd over seeds (nats per test point)")
    for label in [first, "runs", "diverged", *(t[1] for t in columns)]:
        table.add_column(label, justify="left" if label == first else "right")
    for row in summary_rows(metrics, names, columns):
        table.add_row(*row)
    # wide enough for every column on one line: a log file gets the table's natural width, never wrapped cells
    Console(width=max(console.width, 190) if console.is_terminal else 10_000).print(table)


def train(args) -> int:
    import torch
    from rich.console import Console

    from .runs.progress import EpochProgress
    from .runs.run import RunError, RunSession, load_run_config
    from .storage.folders import check_out_path, OutputError

    if not 1 <= args.threads <= 1024:
        raise UsageError(f"--threads {args.threads}: expected 1 to 1024")
    torch.set_num_threads(args.threads)
    _check_tensorboard(args)
    console = Console(stderr=True)
    log = lambda m: console.print(m, soft_wrap=True, highlight=False)  # noqa: E731
    try:
        check_out_path(args.out)
        config = load_run_config(args.config, args.overrides)
        _check_device(config.train.device)
        session = RunSession(config, args.out, log=log)  # every refusal happens here, before training
    except (RunError, OutputError) as e:
        raise UsageError(str(e)) from None
    if session.complete:
        log(f"{args.out}: run complete ({config.train.epochs} epochs); results in {args.out / 'metrics.csv'}")
        return 0
    args.after_interrupt = f"{args.out} keeps its last checkpoint: re-run the same command to resume"
    with EpochProgress(console, {"training": config.train.epochs}, {"training": session.trainer.epoch}) as progress:
        metrics = session.train(on_epoch=lambda e: progress.update("training", e), tensorboard=args.tensorboard)
    session.run.release()                      # the report takes the run's lock itself
    report = _run_report(args.out)
    _print_table(console, metrics, [config.label], by=None)
    _print_ending(console, report)
    return 0


def _drawers(args, cells, study: str | None = None) -> dict | None:
    """What the workers do as each run finishes, unless --no-report: draw its figures, and a study's own
    per-run work (Study.after_run)."""
    from .report.sweep import figure_drawers
    from .studies import STUDIES
    if args.no_report:
        return None
    return figure_drawers(args.out, cells, STUDIES[study].after_run(args.out, args.quick) if study else None)


def _report_unless_told(args, pending, write) -> tuple[Path | None, bool]:
    """The folder's report (`write(out)`), or with --no-report none: then, where runs were trained now
    (`pending`), the report from before no longer matches and is removed. (report, whether removed)."""
    if not args.no_report:
        return write(args.out), False
    return None, bool(pending) and _remove_report(args.out)


def _print_ending(console, report: Path | None, seconds: float | None = None, out: Path | None = None,
                  removed: bool = False) -> None:
    """What every command ends with after its table: the report's leading lines (its verdict,
    or a study's reading) and where the report is; with --no-report (no `report`), that the
    report of `out` is not written, and whether the one from before was `removed`."""
    from .report.sweep import report_lead
    if report is None:
        console.print(f"done in {seconds:.1f} s: {out / 'metrics.csv'}; no report (--no-report"
                      + (", the one from before removed" if removed else "") + f"): mogvae report {out} writes it",
                      soft_wrap=True, highlight=False, markup=False)
        return
    for line in report_lead(report):
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    took = f"done in {seconds:.1f} s: " if seconds is not None else "done: "
    console.print(f"{took}{report.with_suffix('.html')} (and {report.name}, metrics.csv, figures/)", soft_wrap=True,
                  highlight=False, markup=False)


def _remove_report(out: Path) -> bool:
    """Remove a sweep's report.md and report.html (names it writes itself), which no longer match its
    metrics.csv; whether there was one."""
    there = [p for p in (out / "report.md", out / "report.html") if p.is_file()]
    for path in there:
        path.unlink()
    return bool(there)


def sweep(args) -> int:
    from .runs.sweep import SpecError, load_spec
    try:
        base, grid, cells = load_spec(args.spec, args.overrides)
    except SpecError as e:
        raise UsageError(str(e)) from None
    return _run_sweep(args, base, grid, cells, f"mogvae sweep: {args.spec.name}")


def _run_sweep(args, base: dict, grid: dict, cells, title: str, study: str | None = None) -> int:
    """Claim and lock the folder, train what is unfinished, and write the report."""
    from .runs.executors import SchedulerUnavailable, check_scheduler
    from .runs.sweep import SpecError, SweepDir, preflight
    from .storage.folders import OutputError

    if args.workers is not None and not 1 <= args.workers <= 1024:
        raise UsageError(f"--workers {args.workers}: expected 1 to 1024")
    _check_tensorboard(args)
    try:
        if args.scheduler:
            check_scheduler(args.scheduler)  # before the folder is made
        preflight(cells, local=args.scheduler is None)
        folder = SweepDir(args.out)
    except (SpecError, OutputError, SchedulerUnavailable) as e:
        raise UsageError(str(e)) from None
    try:
        return _sweep_in(folder, args, base, grid, cells, title, study)
    finally:
        folder.release()


def _sweep_in(folder, args, base: dict, grid: dict, cells, title: str, study: str | None) -> int:
    """_run_sweep's work once its folder is locked."""
    from rich.console import Console

    from .runs.progress import SweepProgress
    from .runs.sweep import SpecError, execute, versions
    from .storage.folders import OutputError
    try:
        folder.bind({**base, "grid": grid}, cells, versions(), title=title, study=study, extend=args.extend)
    except (SpecError, OutputError) as e:
        raise UsageError(str(e)) from None
    args.after_interrupt = f"{args.out} keeps every finished epoch: re-run the same command to resume"
    console = Console(stderr=True)
    pending = folder.pending(cells)
    console.print(f"mogvae: {folder.describe(cells)} -> {args.out}", highlight=False, soft_wrap=True)
    start = time.perf_counter()
    with SweepProgress(console, {c.name: c.config.train.epochs for c in pending}, len(cells) - len(pending)) as p:
        execute(folder, cells, workers=args.workers or 0, scheduler=args.scheduler, progress=p,
                tensorboard=args.tensorboard, after=_drawers(args, cells, study))
    report, removed = _report_unless_told(args, pending, _sweep_report)
    _print_table(console, args.out / "metrics.csv", [c.name for c in cells], by="run", first="run")
    _print_ending(console, report, time.perf_counter() - start, args.out, removed)
    return 0


def study(args) -> int:
    """A built-in study: a sweep of its spec, or (the paper's) the reproduce pipeline."""
    from .runs.sweep import SpecError, expand
    from .studies import STUDIES

    if args.seeds is not None and not 1 <= args.seeds <= 1000:
        raise UsageError(f"--seeds {args.seeds}: expected 1 to 1000")
    chosen = STUDIES[args.name]
    if chosen.pipeline == "reproduce":
        if args.extend:
            raise UsageError(f"mogvae study {args.name}: --extend does not apply (its models are fixed; "
                             "mogvae reproduce --models picks a subset)")
        args.models = args.epochs = args.device = None
        args.overwrite = False
        return reproduce(args)
    base, grid = chosen.spec([f"seeds={args.seeds}"] if args.seeds else [], args.quick)
    try:
        cells = expand(base, grid)
    except SpecError as e:
        raise UsageError(str(e)) from None
    title = f"mogvae study {args.name}" + (" (quick)" if args.quick else "")
    return _run_sweep(args, base, grid, cells, title, study=args.name)


def report(args) -> int:
    """Rewrite a finished folder's report: a run, a sweep, a study or reproduce. The folder's lock
    is taken first: one still training (or extending) writes its own report when it finishes."""
    from .storage.folders import OutputError, check_own_folders, read_manifest, remove_stale_temporaries, take_lock
    layout = read_manifest(args.dir) if args.dir.is_dir() else None
    if layout is None or layout.kind not in ("run", "sweep", "reproduce"):
        raise UsageError(f"{args.dir}: not a folder written by mogvae train, sweep, study or reproduce")
    args.out = args.dir        # where a full disk's message points
    if layout.kind == "run":
        path = _run_report(args.dir)
    else:
        try:
            check_own_folders(args.dir, layout, option="report")
            lock = take_lock(args.dir, "sweep")
        except OutputError as e:
            raise UsageError(f"{e} (it writes its report when it finishes)") from None
        with lock:
            remove_stale_temporaries(args.dir, layout)   # of a report that was killed mid-write
            path = _sweep_report(args.dir) if layout.kind == "sweep" else _reproduce_report(args.dir)
    print(f"{path} and {path.with_suffix('.html')}")
    return 0


def _run_report(folder: Path) -> Path:
    """A finished run folder's report, written under its lock (claimed as a run: an older run
    folder's manifest gains the report's names)."""
    from .report.sweep import write_run_report
    from .runs.run import RunConfig, RunDir, RunError, stored_config
    from .storage.files import read_json
    run = RunDir(folder)
    try:
        run.lock()
    except RunError as e:
        raise UsageError(f"{e} (it writes its results when it finishes)") from None
    try:
        config = RunConfig(**stored_config(read_json(folder / "config.json")))
        if not (folder / "metrics.csv").is_file():
            raise UsageError(f"{folder}: the run has not finished; re-run its mogvae train command to finish it")
        return write_run_report(folder, config.label)
    finally:
        run.release()


def _sweep_report(out: Path) -> Path:
    """Any sweep's report, a built-in study's own reading and figures first (given here, from
    studies/, so that report/ does not import the studies that import it)."""
    from .report.sweep import write_sweep_report
    from .studies import present
    return write_sweep_report(out, present)


def _reproduce_report(out: Path) -> Path:
    """The one sweep report, led by the paper's study (an older folder's sweep.json may not name it)."""
    from .report.sweep import write_sweep_report
    from .runs.reproduce import STUDY, TITLE
    from .studies import present
    return write_sweep_report(out, present, study=STUDY, title=TITLE)


def show_config(args) -> int:
    from .config.reference import defaults_toml
    from .runs.run import RunConfig
    print(defaults_toml(RunConfig), end="")
    return 0


COMMANDS = {"reproduce": reproduce, "train": train, "sweep": sweep, "study": study, "report": report,
            "config": show_config}


def _os_error(e: OSError, args) -> tuple[str, int]:
    where = e.filename if e.filename is not None else getattr(args, "out", "")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = getattr(args, "after_interrupt", "nothing half-written was left")
        return f"no space left on the device (writing {where}); {hint}, once there is space", EXIT_FAILURE
    return f"{where}: {e.strerror or e}", EXIT_USAGE if e.errno in INPUT_ERRNOS else EXIT_FAILURE


def _known_fault(e: Exception) -> int | None:
    """The exit code of a fault that is not a bug, whose message is its one line: a folder's
    own file that is not what mogvae wrote, a run or spec refused where only a worker could
    see it (exit 2), a worker or cluster that failed (exit 1). None: a bug. (Looked up among
    the modules already imported: a class that was never imported was never raised.)"""
    def loaded(module: str, name: str):
        return getattr(sys.modules.get(f"mogvae.{module}"), name, None)
    worker = loaded("runs.executors", "WorkerFailed")
    if worker is not None and isinstance(e, worker):
        return EXIT_FAILURE
    refusals = [loaded(module, name) for module, name in (
        ("storage.files", "UnreadableFile"), ("runs.run", "RunError"), ("runs.sweep", "SpecError"),
        ("data.files", "DataError"), ("storage.checkpoints", "CheckpointError"), ("storage.folders", "OutputError"))]
    return EXIT_USAGE if isinstance(e, tuple(r for r in refusals if r is not None)) else None


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    args = None
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return COMMANDS[args.command](args)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        print(f"mogvae: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as e:
        from .config.schema import describe_error
        print(f"mogvae: error: {describe_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        what, code = ("stopped by SIGTERM", EXIT_SIGTERM) if isinstance(e, Terminated) else ("interrupted", EXIT_SIGINT)
        hint = getattr(args, "after_interrupt", None)
        print(f"mogvae: {what}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return code
    except OSError as e:
        message, code = _os_error(e, args)
        print(f"mogvae: error: {message}", file=sys.stderr)
        return code
    except RecursionError:  # mogvae's own code never recurses deeply: the input did (a TOML or JSON nested 1e5 deep)
        print("mogvae: error: an input is nested too deeply to read (a configuration, or a file of the folder)",
              file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a refusal raised below the command's own checks; else a bug: one line either way
        code = _known_fault(e)
        if code is not None:
            print(f"mogvae: error: {(str(e).splitlines() or [''])[0]}", file=sys.stderr)
            return code
        if os.environ.get("MOGVAE_TRACEBACK"):
            raise
        first = (str(e).splitlines() or [""])[0][:200]
        print(f"mogvae: internal error: {type(e).__name__}: {first} (a bug; MOGVAE_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE
    finally:
        signal.signal(signal.SIGTERM, previous)


def command() -> int:
    """The `mogvae` command (and `python -m mogvae.cli`): main in a process of its own, which keeps the
    memory it frees (runs/allocator.py). main itself changes nothing process-wide for that, so a Python
    caller can run it in its own process."""
    keep_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(command())
