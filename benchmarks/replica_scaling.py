"""Does packing cells as replicas pay on this machine? Seconds per seed-step of training at
R = 5, 10, 50 and 200 replicas, one core, one intra-op thread.

Issue 20 asks to pack a sweep's cells that share an architecture into one replica batch (the
noise study's 20 cells as 4 packs of R = 50). That only pays if a larger R trains each seed
faster. Each (model, R, compile) trains in its own process, pinned to one core: one warm epoch
(and the compile), then `--epochs` timed epochs of 2,560 points (10 steps of the studies' batch
of 256; a step costs the same whatever the epoch's length) and a 512-point validation. Rounds
interleave the configurations; the table gives medians, and each R's time relative to R = 10,
the noise study's R today (above 1: slower per seed).

    python benchmarks/replica_scaling.py [--quick] [--rounds N] [--epochs E]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "replica_scaling.json"
STEPS, BATCH, VAL = 10, 256, 512


def _time_one(model: str, replicas: int, compile: str, epochs: int, queue) -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import torch
    torch.set_num_threads(1)
    from mogvae.config.schema import TrainConfig, preset
    from mogvae.data.paper import PaperProcess, make_splits
    from mogvae.model.layers import initialize, replica_seed
    from mogvae.model.vae import build_model
    from mogvae.training.trainer import Trainer
    data = make_splits(PaperProcess(), {"train": STEPS * BATCH, "val": VAL}, 0)
    seeds = [replica_seed(0, i) for i in range(replicas)]
    vae = build_model(preset(model), replicas=replicas)
    trainer = Trainer(vae, data["train"], data["val"], TrainConfig(epochs=1000, batch_size=BATCH, compile=compile),
                      seeds, initialize(vae, seeds))
    trainer.run_epoch()                                            # warm: the allocator, and the compile
    start = time.perf_counter()
    for _ in range(epochs):
        trainer.run_epoch()
    queue.put((time.perf_counter() - start) / (epochs * STEPS * replicas))


def measure(model: str, replicas: int, compile: str, epochs: int) -> float:
    spawn = mp.get_context("spawn")          # a fresh interpreter per measurement: nothing cached from the last
    queue = spawn.Queue()
    proc = spawn.Process(target=_time_one, args=(model, replicas, compile, epochs, queue))
    proc.start()
    seconds = queue.get()
    proc.join()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="R = 5, 10 and 50, one round of one epoch (about a minute)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--epochs", type=int)
    args = ap.parse_args()
    sizes = (5, 10, 50) if args.quick else (5, 10, 50, 200)
    rounds, epochs = args.rounds or (1 if args.quick else 3), args.epochs or (1 if args.quick else 2)
    configs = [(m, c) for m in ("mfg", "mog-posterior") for c in ("off", "on")]
    times: dict[tuple, list[float]] = {}
    for r in range(rounds):
        for model, compile in configs:
            for replicas in sizes:
                times.setdefault((model, compile, replicas), []).append(measure(model, replicas, compile, epochs))
                print(f"round {r + 1}: {model} compile={compile} R={replicas}: "
                      f"{times[model, compile, replicas][-1] * 1e3:.3f} ms a seed-step", flush=True)
    rows = []
    for (model, compile, replicas), values in times.items():
        median = statistics.median(values)
        rows.append({"model": model, "compile": compile, "replicas": replicas, "ms_per_seed_step": median * 1e3,
                     "rounds_ms": [v * 1e3 for v in values],
                     "relative_to_r10": median / statistics.median(times[model, compile, 10])})
    print("\n| model | compile | " + " | ".join(f"R = {n}" for n in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for model, compile in configs:
        cells = [next(r for r in rows if (r["model"], r["compile"], r["replicas"]) == (model, compile, n)) for n in sizes]
        print(f"| {model} | {compile} | " + " | ".join(f"{c['ms_per_seed_step']:.3f} ms ({c['relative_to_r10']:.2f}x)"
                                                   for c in cells) + " |")
    if not args.quick:
        RESULTS.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "threads": 1}, "rounds": rounds,
                                       "epochs": epochs, "steps_per_epoch": STEPS, "rows": rows}, indent=1))
        print(f"saved {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
