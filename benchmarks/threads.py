"""Intra-op threads for one training process, idle and under load: the measurement
behind `mogvae train --threads` defaulting to 1 (docs/speed.md).

Times Trainer.run_epoch (5 seeds, 10,000 points, batch 256, MLPs 64-64) at 1 and
2 threads, interleaved, first on an idle machine, then with a CPU-bound process
busy on one core (as when a second job, or a colleague's, shares the machine).

    python benchmarks/threads.py [--repeats 3] [--epochs 2]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch

from mogvae.config.schema import TrainConfig, preset
from mogvae.data.paper import PaperProcess, make_splits
from mogvae.model.vae import build_model
from mogvae.model.layers import initialize, replica_seed
from mogvae.training.trainer import Trainer

MODELS = ("mfg", "mog-posterior")


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def seconds_per_epoch(name: str, threads: int, data, epochs: int) -> float:
    torch.set_num_threads(threads)
    seeds = [replica_seed(0, i) for i in range(5)]
    model = build_model(preset(name), replicas=5)
    trainer = Trainer(model, data["train"], data["val"], TrainConfig(epochs=epochs), seeds, initialize(model, seeds))
    start = time.perf_counter()
    for _ in range(epochs):
        trainer.run_epoch()
    return (time.perf_counter() - start) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    data = make_splits(PaperProcess(), {"train": 10_000, "val": 2_000}, 0)
    results = {}
    for load in ("idle", "one core busy"):
        stop = mp.Event()
        busy = mp.Process(target=_spin, args=(stop,)) if load != "idle" else None
        if busy:
            busy.start()
        for name in MODELS:
            times = {1: [], 2: []}
            for _ in range(args.repeats):
                for t in (1, 2):
                    times[t].append(seconds_per_epoch(name, t, data, args.epochs))
            results[f"{name}, {load}"] = {t: statistics.median(v) for t, v in times.items()}
        if busy:
            stop.set()
            busy.join()
    print(f"{'model, machine':28s} {'1 thread s/epoch':>17s} {'2 threads s/epoch':>18s} {'2 threads / 1':>14s}")
    for key, r in results.items():
        print(f"{key:28s} {r[1]:17.3f} {r[2]:18.3f} {r[2] / r[1]:14.2f}")
    out = Path(__file__).parent / "results" / "threads.json"
    out.write_text(json.dumps({k: {str(t): v for t, v in r.items()} for k, r in results.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
