"""A study: every model of the 2x2 design x every seed, trained, evaluated
exactly, and saved. Figures and the report are made afterwards from the saved
files only (see plots.py, report.py).

One job per model trains all its seeds as replicas in one process; jobs run in
single-threaded worker processes, one per core (see README, "Using both cores").
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import queue as queues
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from . import __version__, faults
from .config import StudyConfig
from .data import PaperProcess, make_splits
from .evaluate import METRICS, evaluate, metric_rows
from .io import atomic_write_bytes, write_csv, write_json, write_npy, write_npz
from .model import build_model
from .outdir import Layout, claim
from .replicas import initialize, replica_seed
from .train import fit

METRIC_COLUMNS = ["model", "seed", *METRICS, "diverged", "diverged_epoch", "train_seconds", "final_val_elbo"]
SPLITS = ("train", "val", "test")
FIGURES = ("truth", "comparison", "training")
RUN_FILES = ("model.safetensors", "history.csv", "curves.npz", "status.json")
OUTPUT_NAMES = re.compile(r"(config|truth|timing)\.json|metrics\.csv|report\.md|data/(train|val|test)\.npy"
                          r"|figures/[a-z0-9-]+\.(png|csv)|runs/[a-z0-9-]+/(model\.safetensors|history\.csv"
                          r"|curves\.npz|status\.json)")


def output_layout(config: StudyConfig) -> Layout:
    """Every file `reproduce` writes for this configuration, and nothing else."""
    return Layout("reproduce", files=(
        "config.json", "truth.json", "timing.json", "metrics.csv", "report.md",
        *(f"data/{s}.npy" for s in SPLITS),
        *(f"figures/{name}.{ext}" for name in (*FIGURES, *config.models) for ext in ("png", "csv")),
        *(f"runs/{m}/{f}" for m in config.models for f in RUN_FILES)))


def claim_output(out: Path, config: StudyConfig, overwrite: bool) -> Path:
    """A new or empty folder, or (with overwrite) an earlier reproduce output whose
    files alone are deleted; anything else is refused untouched (outdir.py)."""
    return claim(out, output_layout(config), OUTPUT_NAMES, resume=False, overwrite=overwrite)


@dataclass(frozen=True)
class Job:
    model: str
    config: StudyConfig
    out: str
    threads: int


def versions() -> dict[str, str]:
    import matplotlib, pydantic, scipy
    return {"mogvae": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "matplotlib": matplotlib.__version__,
            "pydantic": pydantic.VERSION, "platform": platform.platform()}


def prepare(config: StudyConfig, out: Path) -> dict[str, np.ndarray]:
    """Write the resolved configuration and the exact data used."""
    process = PaperProcess(config.data.sigma)
    d = config.data
    data = make_splits(process, {"train": d.n_train, "val": d.n_val, "test": d.n_test}, d.seed)
    write_json(out / "config.json", {"study": config.model_dump(mode="json"), "versions": versions(),
                                     "replica_seeds": seeds_of(config)})
    for name in SPLITS:
        write_npy(out / "data" / f"{name}.npy", data[name])
    # The truth on the saved splits, for the figures and the report to read.
    write_json(out / "truth.json", {f"{name}_log_likelihood": float(process.log_prob(data[name]).mean())
                                    for name in ("val", "test")} | {"sigma": process.sigma})
    return data


def seeds_of(config: StudyConfig) -> list[int]:
    return [replica_seed(config.base_seed, i) for i in range(config.seeds)]


def run_job(job: Job, data: dict[str, np.ndarray], progress=None) -> list[dict]:
    """Train one model's replicas, evaluate them, save the run; return metric rows."""
    torch.set_num_threads(job.threads)
    cfg = job.config
    seeds = seeds_of(cfg)
    process = PaperProcess(cfg.data.sigma)
    model = build_model(cfg.model_for(job.model), replicas=len(seeds), noise=cfg.data.sigma)
    generators = initialize(model, seeds)

    def on_epoch(epoch, history):
        if progress is not None:
            progress.put((job.model, epoch + 1))

    history = fit(model, data["train"], data["val"], cfg.train, seeds, generators, on_epoch)
    evaluation = evaluate(model, process, data["test"], cfg.eval, seeds, history.diverged)
    run_dir = Path(job.out) / "runs" / job.model
    _save_run(run_dir, model, history, evaluation)
    return [{"model": job.model, **row, "train_seconds": history.seconds / len(seeds)}
            for row in metric_rows(evaluation, history)]


def _save_run(run_dir: Path, model, history, evaluation) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(run_dir / "model.safetensors", safetensors_bytes(state))
    R = len(history.divergence)
    rows = [{"epoch": e + 1, "seed": r, "train_loss": history.train_loss[e][r], "val_elbo": history.val_elbo[e][r]}
            for e in range(len(history.val_elbo)) for r in range(R)]
    write_csv(run_dir / "history.csv", rows, ["epoch", "seed", "train_loss", "val_elbo"])
    write_npz(run_dir / "curves.npz", evaluation.curves)
    write_json(run_dir / "status.json", {
        "seconds": history.seconds,
        "divergence": [None if d is None else vars(d) for d in history.divergence]})


def choose_workers(config: StudyConfig) -> int:
    if config.workers:
        return config.workers
    return max(1, min(len(config.models), os.cpu_count() or 1))


def run_study(config: StudyConfig, out: Path, on_progress=None) -> list[dict]:
    """Run every job; return the metric rows (also written to metrics.csv).
    Every process runs one intra-op thread: measured faster than two for these
    small matrices, and far faster on a loaded machine (README, "Speed")."""
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(config, out)
    workers = choose_workers(config)
    # Longest jobs first (mixture posteriors decode M samples per point).
    order = sorted(config.models, key=lambda m: -config.model_for(m).n_components
                   * (config.model_for(m).posterior == "mog"))
    start = time.perf_counter()
    if workers == 1:
        rows = []
        for name in order:
            rows += run_job(Job(name, config, str(out), 1), data, _Direct(on_progress))
    else:
        rows = _run_pool(config, out, data, order, workers, on_progress)
    rows.sort(key=lambda r: (config.models.index(r["model"]), r["seed"]))
    write_csv(out / "metrics.csv", rows, METRIC_COLUMNS)
    write_json(out / "timing.json", {"wall_seconds": time.perf_counter() - start, "workers": workers})
    return rows


class WorkerFailed(RuntimeError):
    """A worker process raised, or died without a word (killed, out of memory)."""


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (even by kill -9),
    so no orphan goes on writing into a folder its driver has left."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # elsewhere: the parent-pid watch below still ends it
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    import threading
    threading.Thread(target=watch, daemon=True).start()


def _worker(job: Job, data: dict, messages) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides; Ctrl-C reaches the whole group
    try:
        rows = run_job(job, data, _Tagged(messages))
        messages.put(("done", job.model, rows))
    except BaseException as e:
        messages.put(("error", job.model, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"))


def _run_pool(config, out, data, order, workers, on_progress) -> list[dict]:
    """Jobs in spawned worker processes (a clean interpreter: no inherited thread
    pools or locks), at most `workers` at once. On any exception here, SIGTERM
    included, every worker is killed before this returns."""
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    pending, running, results = list(order), {}, {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                name = pending.pop(0)
                running[name] = ctx.Process(target=_worker, args=(Job(name, config, str(out), 1), data, messages),
                                            daemon=True, name=f"mogvae-{name}")
                running[name].start()
            try:
                kind, name, payload = messages.get(timeout=0.2)
            except queues.Empty:
                for name, proc in running.items():  # a message is sent before a worker exits: none came
                    if proc.exitcode is not None:
                        raise WorkerFailed(f"the worker training {name} died (exit code {proc.exitcode})")
                continue
            if kind == "progress":
                faults.point("progress")
                if on_progress:
                    on_progress(name, payload)
            elif kind == "error":
                raise WorkerFailed(f"training {name} failed: {payload}")
            else:
                results[name] = payload
                running.pop(name).join()
    finally:
        for proc in running.values():
            proc.kill()
            proc.join()
    return [row for name in order for row in results[name]]


class _Tagged:
    """What run_job reports through: progress messages on the workers' queue."""
    def __init__(self, messages):
        self.messages = messages

    def put(self, item):
        self.messages.put(("progress", *item))


class _Direct:
    """A queue stand-in for in-process runs: calls the callback at once."""
    def __init__(self, callback):
        self.callback = callback

    def put(self, item):
        if self.callback:
            self.callback(*item)
