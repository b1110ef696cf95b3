"""`mogvae reproduce`: the paper's study as a built-in sweep over the model presets.

Its output keeps the contract of the paper's study (README): config.json,
data/{train,val,test}.npy, metrics.csv (model, seed, metrics), figures/*.png
with their CSVs, report.md and report.html. Underneath it is a sweep folder
(sweep.py): one run folder per model under runs/, so a killed reproduce
resumes where it stopped, and a finished one is only re-reported.
"""
from __future__ import annotations

import re
from pathlib import Path


from ..config.schema import ReproduceConfig
from ..data.paper import PaperProcess
from ..storage.files import MAX_ARRAY_BYTES, atomic_write_bytes, read_bytes, read_npy, write_json
from ..storage.folders import Layout
from .run import RUN_NAMES
from .sweep import Cell, SweepDir, execute, expand, run_layout_files, versions

SPLITS = ("train", "val", "test")
TITLE = "mogvae reproduce: expressive prior vs expressive posterior"
STUDY = "paper"   # the built-in study it is (studies/paper.py): its reading leads the report
FIGURES = ("truth", "comparison", "training")
NAMES = re.compile(r"(config|truth|sweep|timing)\.json|metrics\.csv|report\.(md|html)|data/(train|val|test)\.npy"
                   r"|figures/[a-z0-9-]+\.(png|csv)|runs/preset=[a-z0-9-]+/(\.mogvae-manifest\.json|\.lock|"
                   + RUN_NAMES.pattern + ")")     # each model's run folder: the names a run folder may hold


def spec(config: ReproduceConfig) -> tuple[dict, dict]:
    """The sweep behind a study: its shared settings, and a grid over the presets."""
    base = {"seeds": config.seeds, "base_seed": config.base_seed, "checkpoint_every": 1,
            "model": config.model.model_dump(mode="json"), "data": config.data.model_dump(mode="json"),
            "train": config.train.model_dump(mode="json"), "eval": config.eval.model_dump(mode="json")}
    return base, {"preset": list(config.models)}


def output_layout(config: ReproduceConfig) -> Layout:
    """Every file `reproduce` writes for this configuration, and nothing else."""
    runs = [run_layout_files(f"runs/preset={m}") for m in config.models]
    return Layout("reproduce", files=(
        "config.json", "truth.json", "sweep.json", "metrics.csv", "report.md", "report.html",
        *(f"data/{s}.npy" for s in SPLITS),
        *(f"figures/{name}.{ext}" for name in (*FIGURES, *config.models) for ext in ("png", "csv")),
        *(f for files, _ in runs for f in files)), patterns=tuple(p for _, patterns in runs for p in patterns))


def claim_output(out: Path, config: ReproduceConfig, overwrite: bool) -> SweepDir:
    """A new or empty folder, an earlier reproduce output (resumed), or with
    `overwrite` one whose files alone are deleted; anything else is refused untouched."""
    return SweepDir(out, output_layout(config), NAMES, overwrite=overwrite)


def cells_of(config: ReproduceConfig) -> list[Cell]:
    return expand(*spec(config))


def run(config: ReproduceConfig, sweep: SweepDir, progress=None, scheduler: str | None = None,
        tensorboard: bool = False, after: dict | None = None) -> dict[str, Path]:
    """Train what is not finished, then write the contract's files (but the report, which `mogvae report`
    makes from them; `after`: as execute's, where the workers draw each run's figures); return model ->
    run folder."""
    from ..model.layers import replica_seed
    cells = cells_of(config)
    base, grid = spec(config)
    sweep.bind({**base, "grid": grid}, cells, versions(), title=TITLE, study=STUDY)
    write_json(sweep.path / "config.json", {"study": config.model_dump(mode="json"), "versions": versions(),
                                            "replica_seeds": [replica_seed(config.base_seed, i)
                                                              for i in range(config.seeds)]})
    execute(sweep, cells, workers=config.workers, scheduler=scheduler, progress=progress, tensorboard=tensorboard,
            after=after)
    runs = {c.config.preset: sweep.run_path(c) for c in cells}
    first = next(iter(runs.values()))
    for split in SPLITS:  # every run trained on the same data: the first run's copy is the study's
        atomic_write_bytes(sweep.path / "data" / f"{split}.npy", read_bytes(first / "data" / f"{split}.npy", MAX_ARRAY_BYTES))
    process = PaperProcess(config.data.sigma)
    write_json(sweep.path / "truth.json", {f"{s}_log_likelihood": float(process.log_prob(
        read_npy(sweep.path / "data" / f"{s}.npy")).mean()) for s in ("val", "test")} | {"sigma": process.sigma})
    return runs
