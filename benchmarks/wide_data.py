"""Wide observations: seed-epochs per second on digits (D = 61 after dropping its 3 constant
pixels), mogvae's replica axis against the plain per-seed loop, one core, interleaved.

Each engine runs in its own process pinned to the same core with one thread (see engines.py
for why not in one process); rounds alternate between them; medians are reported. Models:
mfg and mog-posterior at latent_dim 2 and 5, MLPs 64-64, batch 256, 5 seeds for mogvae
(one process trains them together) and one seed at a time for the loop.

    python benchmarks/wide_data.py [--quick] [--rounds N] [--epochs E]
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

import torch

sys.path.insert(0, str(Path(__file__).parent))
from baseline_loop import PlainVAE, plain_epochs  # noqa: E402

from mogvae.config.schema import TrainConfig, preset  # noqa: E402
from mogvae.model.vae import build_model  # noqa: E402
from mogvae.model.layers import initialize, replica_seed  # noqa: E402
from mogvae.data.tabular import split_standardized  # noqa: E402
from mogvae.training.trainer import Trainer  # noqa: E402

MODELS = {"mfg": ("normal", "gaussian"), "mog-posterior": ("normal", "mog")}
RESULTS = Path(__file__).parent / "results" / "wide_data.json"
QUICK_RESULTS = RESULTS.with_name("wide_data.quick.json")
REPLICAS, BATCH = 5, 256


class Mogvae:
    def __init__(self, model, latent_dim, data):
        seeds = [replica_seed(0, i) for i in range(REPLICAS)]
        vae = build_model(preset(model, latent_dim=latent_dim), replicas=REPLICAS, data_dim=data["train"].shape[1])
        gens = initialize(vae, seeds)
        self.trainer = Trainer(vae, data["train"], data["val"], TrainConfig(epochs=10_000, compile="off"), seeds, gens)
        self.trainer.run_epoch()
        self.seeds = REPLICAS

    def epochs(self, n):
        for _ in range(n):
            self.trainer.run_epoch()


class PerSeedLoop:
    def __init__(self, model, latent_dim, data):
        torch.manual_seed(0)
        self.vae = PlainVAE(*MODELS[model], data_dim=data["train"].shape[1], latent_dim=latent_dim)
        self.opt = torch.optim.Adam(self.vae.parameters(), lr=1e-3)
        y = torch.as_tensor(data["train"], dtype=torch.float32)
        self.loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(y), batch_size=BATCH, shuffle=True)
        self.seeds = 1
        self.epochs(1)

    def epochs(self, n):
        plain_epochs(self.vae, self.opt, self.loader, n)


ENGINES = {"mogvae": Mogvae, "per-seed loop": PerSeedLoop}


def serve(conn, engine, model, latent_dim, core):
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    data = split_standardized("digits", {"train": 0.6, "val": 0.2, "test": 0.2}, 0).splits
    runner = ENGINES[engine](model, latent_dim, data)
    conn.send(None)
    while (n := conn.recv()) is not None:
        start = time.perf_counter()
        runner.epochs(n)
        conn.send((time.perf_counter() - start) / (n * runner.seeds))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round of 1 epoch, latent_dim 2 only")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--epochs", type=int)
    args = ap.parse_args()
    rounds, epochs = args.rounds or (1 if args.quick else 3), args.epochs or (1 if args.quick else 3)
    latents = (2,) if args.quick else (2, 5)
    ctx, core = mp.get_context("spawn"), min(os.sched_getaffinity(0))
    rows = []
    for model in MODELS:
        for d in latents:
            workers = {}
            for engine in ENGINES:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=serve, args=(child, engine, model, d, core), daemon=True)
                proc.start()
                workers[engine] = (proc, parent)
            for _, conn in workers.values():
                conn.recv()
            times = {engine: [] for engine in workers}
            for _ in range(rounds):
                for engine, (_, conn) in workers.items():
                    conn.send(epochs)
                    times[engine].append(conn.recv())
            for proc, conn in workers.values():
                conn.send(None)
                proc.join()
            rate = {e: 1 / statistics.median(t) for e, t in times.items()}
            rows.append({"model": model, "latent_dim": d, "seed_epochs_per_s": rate,
                         "ratio": rate["mogvae"] / rate["per-seed loop"]})
            print(f"{model:14s} d_z={d}  mogvae {rate['mogvae']:7.2f}  per-seed loop {rate['per-seed loop']:7.2f} "
                  f"seed-epochs/s  ({rows[-1]['ratio']:.1f}x)", flush=True)
    target = QUICK_RESULTS if args.quick else RESULTS
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps({"data": "digits, D = 61, 1078 training rows", "replicas": REPLICAS,
                                  "rounds": rounds, "epochs": epochs, "rows": rows}, indent=2) + "\n")
    print(f"written {target}")


if __name__ == "__main__":
    main()
