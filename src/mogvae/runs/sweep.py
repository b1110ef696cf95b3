"""Sweeps: a grid of runs, each a crash-safe run folder (run.py).

    DIR/sweep.json       the spec, the expanded cells (name, grid values, resolved
                         configuration and its hash) and the versions
    DIR/runs/<name>/     one run folder per cell, as `mogvae train` writes it
    DIR/metrics.csv      one row per (run, replica): the grid axes by their dotted
                         keys, then model, seed and every metric; rebuilt from the
                         run folders, so it is never the only copy
    DIR/report.md, report.html, figures/   made from those files (report/sweep.py)

A SPEC is a `mogvae train` configuration plus a `[grid]` table of dotted keys
mapped to lists, expanded as a Cartesian product; `seeds` is per cell. The
run is the only unit of work: a cell trains, resumes and evaluates exactly as
`mogvae train` would, whichever executor runs it (executors.py).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ..config.files import ConfigError, absolute_data_path, apply_overrides, dotted_fields, read_toml, set_dotted
from ..config.schema import describe_error
from ..model.posteriors import POSTERIORS
from ..objectives import OBJECTIVES
from ..storage import faults
from ..storage.files import read_csv, write_csv, write_json
from ..storage.folders import LOCK, Layout, claim, remove_stale_temporaries, take_lock
from .run import CHECKPOINT_NAME, RUN_LAYOUT, RunConfig, RunDir, differences, upgraded

# names a sweep folder's manifest may hold (timing.json: written by the first sweeps, kept readable)
SWEEP_NAMES = re.compile(r"sweep\.json|metrics\.csv|report\.(md|html)|timing\.json|figures/\*|runs/\*"
                         r"|figures/importance/\*")
# figures/importance/: a study's per-run rows (studies/importance.py), a folder of ours like runs/: named, so
# that it is checked to be a real folder (a link there would send the rows elsewhere) and cleaned of temporaries
SWEEP_LAYOUT = Layout("sweep", files=("sweep.json", "metrics.csv", "report.md", "report.html"),
                      patterns=("figures/*", "runs/*", "figures/importance/*"))


class SpecError(ValueError):
    """A sweep specification that cannot be expanded: one line naming the key."""


@dataclass(frozen=True)
class Cell:
    name: str
    values: dict            # grid key -> value
    config: RunConfig

    @property
    def model(self) -> str:
        """The run's label (RunConfig.label); /exact or /iwae for those objectives."""
        c = self.config
        return c.label if c.train.objective == "elbo" else f"{c.label}/{c.train.objective}"

    def resolved(self) -> dict:
        return self.config.model_dump(mode="json")


def versions() -> dict[str, str]:
    """What produced a result: recorded beside it."""
    import platform

    import matplotlib
    import numpy
    import pydantic
    import scipy
    import torch

    from .. import __version__
    return {"mogvae": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__, "matplotlib": matplotlib.__version__,
            "pydantic": pydantic.VERSION, "platform": platform.platform()}


def config_hash(resolved: dict) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()


def _validate_error(e: ValidationError, where: str) -> SpecError:
    return SpecError(f"{where}{describe_error(e)}")


def _label(value) -> str:
    """A value as part of a folder name: readable, and safe on any filesystem."""
    text = "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text)[:40] or "empty"


def cell_name(values: dict) -> str:
    """Stable and readable, from the grid values only: preset=mfg__data.sigma=0.1."""
    return "__".join(f"{key}={_label(v)}" for key, v in values.items()) or "base"


MAX_CELLS = 10_000
"""The most cells a sweep may have (the main grid's product plus every [[grid.also]]): each is
a run folder; a larger grid is almost surely a mistake, and is refused before anything is written."""
NAME_MAX = 255                        # bytes in one file name, on every common file system
MAX_CELL_NAME = NAME_MAX - len(".NAME-samples.png.XXXXXXXX.tmp") + len("NAME")   # a sample figure's atomic temporary
RECORDED_CELL_NAME = NAME_MAX - len(".NAME.png.XXXXXXXX.tmp") + len("NAME")   # the limit before it counted "-samples"


def expand(base: dict, grid: dict, folder: Path | None = None) -> list[Cell]:
    """Every combination of the grid's values over the base configuration, validated;
    then the cells of each `[[grid.also]]` table, itself a small grid (for cells that
    belong beside the product but not in it: the oracle of each prior, say). A relative
    data.path among the grid's values is read from `folder`, the spec's (config/files.py).
    At most MAX_CELLS cells, counted before any is built."""
    if not isinstance(grid, dict):
        raise SpecError("grid: expected a table of dotted keys mapped to lists")
    grid = dict(grid)
    also = grid.pop("also", [])
    if not isinstance(also, list) or not all(isinstance(g, dict) and g for g in also):
        raise SpecError("grid.also: expected [[grid.also]] tables of dotted keys mapped to lists")
    parts = [(grid, "grid."), *((g, f"grid.also[{i}].") for i, g in enumerate(also, 1))]
    for part, where in parts:
        _check_axes(part, where)
    total = sum(math.prod(len(v) for v in part.values()) for part, _ in parts)
    if total > MAX_CELLS:
        raise SpecError(f"grid: {total:,} cells, more than a sweep may have ({MAX_CELLS:,}); split it into "
                        "several sweeps, or grid fewer values")
    cells: dict[str, Cell] = {}
    seen: dict[str, str] = {}
    for part, where in parts:
        _expand_into(cells, seen, base, part, where, folder or Path.cwd())
    return list(cells.values())


def _check_axes(grid: dict, where: str) -> None:
    known = dotted_fields(RunConfig)
    for key, values in grid.items():
        if key not in known:
            raise SpecError(f"{where}{key}: unknown key (a dotted configuration key such as train.lr)")
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}{key}: expected a non-empty list of values")


def _expand_into(cells: dict[str, Cell], seen: dict[str, str], base: dict, grid: dict, where: str,
                 folder: Path) -> None:
    """Add the grid's cells to `cells` (by name) and `seen` (configuration hash -> name):
    each lookup is a dictionary's, so a grid expands in linear time."""
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        raw = copy.deepcopy(base)
        for key, value in values.items():
            set_dotted(raw, key, value, where=f"{where}{key}")
        absolute_data_path(raw.get("data"), folder)
        try:
            config = RunConfig(**raw)
        except ValidationError as e:
            raise _validate_error(e, "grid: ") from None
        cell = Cell(cell_name(values), values, config)
        if len(cell.name.encode()) > MAX_CELL_NAME:
            raise SpecError(f"grid: the cell name {cell.name[:60]}... is {len(cell.name.encode())} bytes; with its "
                            f"figures' suffixes it would pass the file system's {NAME_MAX}-byte limit on a name (at "
                            f"most {MAX_CELL_NAME}): grid fewer keys, or shorter values")
        digest = config_hash(cell.resolved())
        if digest in seen:
            raise SpecError(f"grid: cells {seen[digest]} and {cell.name} are the same configuration")
        if cell.name in cells:
            raise SpecError(f"grid: two cells would share the folder name {cell.name}; use distinct values")
        seen[digest] = cell.name
        cells[cell.name] = cell


def preflight(cells: list[Cell], local: bool = True) -> None:
    """What would make a run fail after others trained is refused before any:
    a device this machine lacks (`local`: the runs train here, not on a cluster),
    evaluation that cannot run, data that cannot be read, and a model the data
    cannot hold (each distinct data section is loaded once)."""
    from ..data.files import DataError
    from ..data.sources import load_source
    from ..estimators.evaluate import check_evaluable
    from ..training.trainer import check_device
    from .run import RunError, check_fits
    sources: dict[str, object] = {}
    for device in sorted({c.config.train.device for c in cells}) if local else ():
        try:
            check_device(device)
        except ValueError as e:
            raise SpecError(str(e)) from None
    for cell in cells:
        try:
            check_evaluable(cell.config.resolved_model(), cell.config.eval, cell.config.train, cell.config.data,
                            cell.config.seeds)
        except ValueError as e:
            raise SpecError(f"{cell.name}: {e}") from None
        key = cell.config.data.model_dump_json()
        try:
            if key not in sources:
                sources[key] = load_source(cell.config.data)
            check_fits(cell.config, sources[key])
        except DataError as e:
            raise SpecError(str(e)) from None
        except RunError as e:
            raise SpecError(f"{cell.name}: {e}") from None


def load_spec(path: Path, overrides: list[str]) -> tuple[dict, dict, list[Cell]]:
    """(base configuration, grid, cells) from a SPEC file and `--set` overrides."""
    try:
        raw = apply_overrides(read_toml(path), overrides)
    except ConfigError as e:
        raise SpecError(str(e)) from None
    grid = raw.pop("grid", {})
    try:
        RunConfig(**raw)                      # the base alone must be valid: errors name its own keys
    except ValidationError as e:
        raise _validate_error(e, "") from None
    return raw, grid, expand(raw, grid, Path(path).parent)


CELL_NAME = re.compile(r"[A-Za-z0-9._+=-]{1,%d}" % RECORDED_CELL_NAME)   # what cell_name makes: safe as a file name


def read_record(out: Path) -> dict:
    """DIR/sweep.json, read as carefully as a checkpoint and checked before any of it is used:
    its cell names become paths (runs/NAME, figures/NAME.png), so one that is not a name
    cell_name could have made (../.., a slash) is damage, never a path to follow."""
    from ..storage.files import UnreadableFile, read_json
    path = Path(out) / "sweep.json"
    record = read_json(path)
    cells = record.get("cells") if isinstance(record, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) and isinstance(c.get("values"), dict)
                                              and isinstance(c.get("config"), dict) for c in cells):
        raise UnreadableFile(f"{path}: damaged (no list of cells with their values and configuration)")
    for c in cells:
        if not (isinstance(c.get("name"), str) and CELL_NAME.fullmatch(c["name"]) and c["name"] not in (".", "..")):
            raise UnreadableFile(f"{path}: damaged (a cell name that mogvae never writes: {str(c.get('name'))[:60]!r})")
    if not isinstance(record.get("title", ""), str) or not isinstance(record.get("study") or "", str):
        raise UnreadableFile(f"{path}: damaged (its title or study is not text)")
    return record


class SweepDir:
    """DIR: claimed (new, empty, or a sweep folder), locked against a second
    sweep, and bound to one set of cells (a changed spec is refused)."""

    def __init__(self, path: Path, layout: Layout = SWEEP_LAYOUT, names: re.Pattern = SWEEP_NAMES,
                 overwrite: bool = False, option: str = "--out"):
        self.path = Path(path)
        claim(self.path, layout, names, resume=True, overwrite=overwrite, option=option)
        self._lock = take_lock(self.path, "sweep")
        remove_stale_temporaries(self.path, layout)   # of a report or record killed mid-write

    def release(self) -> None:
        """Give the folder's lock up now, not when this object is collected (a caller of the CLI's
        main in one process, a notebook, runs the next command on the same folder at once)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def run_path(self, cell: Cell) -> Path:
        return self.path / "runs" / cell.name

    def check(self, cells: list[Cell], extend: bool = False) -> None:
        """Refuse cells other than those this folder was started with (naming what changed);
        with `extend`, cells may be added (the grid grows, its finished runs stay)."""
        saved = self.path / "sweep.json"
        if not saved.exists():
            return
        try:
            old_cells = {c["name"]: c["config"] for c in read_record(self.path)["cells"]}
        except ValueError as e:      # UnreadableFile
            raise SpecError(f"{e}; a sweep folder holds one grid: use a new folder") from None
        new_cells = {c.name: c.resolved() for c in cells}
        added, gone = sorted(set(new_cells) - set(old_cells)), sorted(set(old_cells) - set(new_cells))
        if gone or (added and not extend):
            raise SpecError(f"{self.path}: the spec changed: cells added {added}, removed {gone} "
                            "(a sweep folder holds one grid: use a new folder, or --extend to add cells)")
        for name in set(new_cells) & set(old_cells):
            diff = differences(upgraded(old_cells[name]), new_cells[name])
            if diff:
                raise SpecError(f"{self.path}: the spec changed for {name}: " + ", ".join(diff)
                                + " (use a new folder)")

    def bind(self, spec: dict, cells: list[Cell], versions: dict, title: str = "mogvae sweep",
             study: str | None = None, extend: bool = False) -> None:
        """Record the sweep (with the report's title, and the built-in study it is, if
        any), or check that a re-run asks for the same cells (or, with `extend`, more)."""
        self.check(cells, extend)
        write_json(self.path / "sweep.json", {
            "title": title, "study": study, "spec": spec, "versions": versions,
            "cells": [{"name": c.name, "values": c.values, "config": c.resolved(),
                       "config_sha256": config_hash(c.resolved())} for c in cells]})

    def pending(self, cells: list[Cell]) -> list[Cell]:
        return [c for c in cells if not RunDir(self.run_path(c)).is_complete(c.config.train.epochs)]

    def describe(self, cells: list[Cell]) -> str:
        """'N runs (F finished, P to resume)', for the first line of a (re-)run."""
        pending = self.pending(cells)
        partial = sum(any((self.run_path(c) / "checkpoints").glob(CHECKPOINT_NAME)) for c in pending)
        return (f"{len(cells)} runs ({len(cells) - len(pending)} finished"
                + (f", {partial} to resume from a checkpoint" if partial else "") + ")")

    def gather(self, cells: list[Cell]) -> list[dict]:
        """DIR/metrics.csv from the run folders: grid axes, model, seed, metrics."""
        faults.point("gather")
        rows = []
        for cell in cells:
            for row in read_csv(self.run_path(cell) / "metrics.csv"):
                rows.append({**cell.values, "run": cell.name, "model": cell.model, **row})
        columns = list(dict.fromkeys(k for r in rows for k in r))
        write_csv(self.path / "metrics.csv", rows, columns)
        return rows


def run_layout_files(prefix: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A run folder's own names (and its manifest and lock) under `prefix`."""
    files = tuple(f"{prefix}/{f}" for f in (*RUN_LAYOUT.files, ".mogvae-manifest.json", LOCK))
    return files, tuple(f"{prefix}/{p}" for p in RUN_LAYOUT.patterns)


def _cost(cell: Cell) -> float:
    """Relative training cost, for longest-first scheduling (a mixture posterior
    decodes M points per data point)."""
    m, c = cell.config.resolved_model(), cell.config
    # a mixture decodes a draw per component; a flow measured 1.2x a Gaussian's step
    per_point = getattr(POSTERIORS[m.posterior], "decoded_per_point", lambda k: 1)(m.n_components)
    per_point = max(per_point, OBJECTIVES[c.train.objective].step_cost(c.train))
    return per_point * c.seeds * c.train.epochs * (c.data.n_train or 10_000)   # a file's split: known once read


def execute(sweep: SweepDir, cells: list[Cell], workers: int = 0, scheduler: str | None = None,
            progress=None, tensorboard: bool = False, after: dict | None = None) -> list[dict]:
    """Train every unfinished cell (resuming partial ones), then rebuild metrics.csv. `after`: for a cell's
    name, what its worker does once the run is finished, given its folder (a picklable callable: the
    report's figure drawing, executors._then)."""
    import os

    from .executors import run_dask, run_in_process, run_local
    pending = sorted(sweep.pending(cells), key=_cost, reverse=True)
    jobs = [(c.name, c.resolved(), str(sweep.run_path(c)), (after or {}).get(c.name)) for c in pending]
    on_progress = progress.epoch if progress else None
    on_done = progress.finished if progress else None
    if scheduler:
        run_dask(jobs, scheduler, on_done=on_done, tensorboard=tensorboard)
    else:
        workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
        if workers == 1:
            run_in_process(jobs, on_progress, on_done, tensorboard=tensorboard)
        else:
            run_local(jobs, workers, on_progress, on_done, tensorboard=tensorboard)
    return sweep.gather(cells)
