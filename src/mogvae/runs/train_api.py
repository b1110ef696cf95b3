"""`mogvae.train`: `mogvae train` from Python, with the same RunSession and the same folder rules
(runs/run.py), then the folder loaded as a Run (runs/results.py).

    run = mogvae.train("examples/run.toml", "runs/mog-prior", overrides=["train.epochs=50"])
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .run import RunConfig, RunError

if TYPE_CHECKING:      # results.py imports this module for mogvae.train: no import cycle at run time
    from .results import Run


def _run_config(config, overrides: list[str]) -> RunConfig:
    """config (a TOML file's path, a dict, or a RunConfig) with `--set`-style overrides."""
    from pydantic import ValidationError

    from ..config.files import ConfigError, apply_overrides
    from ..config.schema import describe_error
    from .run import load_run_config
    if isinstance(config, (str, os.PathLike)):
        try:
            return load_run_config(Path(config), overrides)      # a relative data.path: from the file's folder
        except ValidationError as e:
            raise RunError(describe_error(e)) from None
    if isinstance(config, RunConfig):
        raw = config.model_dump(mode="json")
    elif isinstance(config, dict):
        raw = copy.deepcopy(config)
    else:
        raise TypeError(f"config: expected a TOML file's path, a dict or a RunConfig, got {type(config).__name__}")
    try:
        return RunConfig(**apply_overrides(raw, overrides))
    except ConfigError as e:
        raise RunError(str(e)) from None
    except ValidationError as e:
        raise RunError(describe_error(e)) from None


def _open_session(config: RunConfig, out: Path, log):
    """RunSession(config, out), each refusal a one-line RunError raised outside the except block:
    the refused session's frames (and the folder lock they hold) are then freed at once, so that a
    notebook that keeps the last traceback can still train into the folder."""
    from ..storage.folders import OutputError
    from .run import RunSession
    try:
        return RunSession(config, out, log=log)
    except (RunError, OutputError) as e:
        message = str(e)
    raise RunError(message)


def _release(session) -> None:
    """Give up the folder's lock now, not when the session is collected: a notebook may hold it
    (or a traceback through it) for hours, and the next train of the same folder would be refused."""
    session.run.release()


@contextlib.contextmanager
def torch_threads(n: int):
    """PyTorch's intra-op threads set to n for the block, as `mogvae train` sets them (docs/speed.md:
    one thread is faster on these small matrices; the numbers are the same), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(config, out: str | os.PathLike, *, overrides=(), log=print) -> Run:
    """Train a configuration into a run folder exactly as `mogvae train` does, and load it.

    `config` is a TOML file's path, a dict, or a RunConfig; `overrides` are `--set`'s
    "key=value" strings. The folder rules are `mogvae train`'s: `out` is new, empty or a run
    folder; the same configuration resumes from its newest checkpoint (bitwise as if never
    stopped); a finished run returns at once without training; another configuration is
    refused (RunError) naming the fields that differ. Training uses one PyTorch thread, as
    `mogvae train` does by default, and restores the caller's setting after.

        run = mogvae.train("examples/run.toml", "runs/mog-prior", overrides=["train.epochs=50"])
        run = mogvae.train({"preset": "mog-prior", "seeds": 3}, "runs/small")
        run.metrics
    """
    from ..storage.folders import OutputError, check_out_path
    from ..training.trainer import check_device
    from .results import load
    if isinstance(overrides, str):
        raise TypeError("overrides: a list of 'key=value' strings, e.g. ['train.epochs=3']")
    config = _run_config(config, list(overrides))
    try:
        out = check_out_path(out, option="out")
        check_device(config.train.device)
    except (OutputError, ValueError) as e:
        raise RunError(str(e)) from None
    session = _open_session(config, out, log)
    try:
        if session.complete:
            log(f"{out}: run complete ({config.train.epochs} epochs); results in {out / 'metrics.csv'}")
        else:
            _train(session, log)
    except KeyboardInterrupt:
        log(f"{out} keeps its last checkpoint: run the same mogvae.train again to resume")
        raise
    finally:
        _release(session)
    return load(out)


def _train(session, log) -> None:
    """Train and evaluate, saying about every tenth of the epochs how far it is."""
    epochs = session.config.train.epochs
    every = max(1, epochs // 10)
    log(f"training {session.config.seeds} replicas for {epochs} epochs (from epoch {session.trainer.epoch}) "
        f"-> {session.run.path}")

    def on_epoch(epoch: int | str) -> None:
        if isinstance(epoch, str):       # evaluation's phase lines
            log(epoch)
        elif epoch % every == 0 and epoch < epochs:
            log(f"epoch {epoch} of {epochs}")
    with torch_threads(1):
        metrics = session.train(on_epoch=on_epoch)
    log(f"done: {metrics}")
