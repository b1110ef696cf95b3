"""Exact evaluation speed: one trained replica of each model, 10,000 test points,
log p(y) and the ELBO by quadrature with their error bounds (estimators.quadrature.integrate),
single-threaded. Models are trained briefly here (30 epochs) so that their
posteriors have realistic widths.

    python benchmarks/eval_speed.py
"""
from __future__ import annotations

import statistics
import time

import torch

from mogvae.config.schema import EvalConfig, TrainConfig, preset
from mogvae.data.paper import PaperProcess, make_splits
from mogvae.model.vae import build_model
from mogvae.estimators.quadrature import integrate, latent_grid
from mogvae.model.layers import initialize, replica_seed
from mogvae.training.trainer import fit


def main():
    torch.set_num_threads(1)
    data = make_splits(PaperProcess(), {"train": 10_000, "val": 2_000, "test": 10_000}, 0)
    cfg = EvalConfig()
    print(f"{'model':14s} {'grid nodes':>10s} {'seconds':>8s} {'error bound (nats)':>19s}")
    for name in ("mfg", "mog-prior", "mog-posterior", "mog-both"):
        seeds = [replica_seed(0, 0)]
        model = build_model(preset(name), replicas=1)
        fit(model, data["train"], data["val"], TrainConfig(epochs=30), seeds, initialize(model, seeds))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            grid = latent_grid(model, cfg.grid_size, cfg.grid_span, y=data["test"])
            exact = integrate(model, data["test"], grid)
            times.append(time.perf_counter() - start)
        err = max(float((exact.log_p - exact.log_p_coarse).abs().max()), float((exact.elbo - exact.elbo_coarse).abs().max()))
        print(f"{name:14s} {grid.nodes.shape[1]:10d} {statistics.median(times):8.2f} {err:19.1e}")


if __name__ == "__main__":
    main()
