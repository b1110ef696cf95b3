"""One readable training loop for R replicas at once.

Each replica has its own generator (data order and noise), its own loss, and
its own divergence status: a replica whose loss or gradients stop being finite
is frozen at its last finite parameters and recorded; its siblings go on.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import TrainConfig
from .model import VAE
from .objectives import draw_noise, elbo
from .replicas import make_generators

VAL_NOISE_OFFSET = 7919  # val noise generators: seed + offset, reset each epoch


@dataclass
class Divergence:
    epoch: int
    step: int
    reason: str


@dataclass
class History:
    """Per-epoch curves, [epochs, R], and per-replica divergence records."""
    train_loss: list[list[float]] = field(default_factory=list)
    val_elbo: list[list[float]] = field(default_factory=list)
    divergence: list[Divergence | None] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def diverged(self) -> list[bool]:
        return [d is not None for d in self.divergence]


def _per_replica_finite_grads(model: VAE) -> torch.Tensor:
    checks = [torch.isfinite(p.grad.flatten(1).sum(1)) for p in model.parameters() if p.grad is not None]
    return torch.stack(checks).all(0)


def _freeze(model: VAE, optimizer: torch.optim.Optimizer, mask: torch.Tensor) -> None:
    """Make the optimizer leave the replicas in `mask` where they are: zero
    gradients and Adam moments give an update of exactly zero."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad[mask] = 0.0
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][mask] = 0.0


def validation_elbo(model: VAE, y_val: torch.Tensor, seeds: list[int], n_samples: int = 1) -> torch.Tensor:
    """Mean ELBO on the validation set per replica, [R], with noise fixed per replica
    (the same draws every epoch, so the curve shows the model, not the noise)."""
    gens = make_generators([s + VAL_NOISE_OFFSET for s in seeds])
    R = len(seeds)
    y = y_val.expand(R, *y_val.shape[1:])
    with torch.no_grad():
        eps = draw_noise(model, gens, y.shape[1], n_samples).to(y.device)
        return elbo(model, y, eps).mean(1)


def fit(model: VAE, y_train: np.ndarray, y_val: np.ndarray, config: TrainConfig,
        seeds: list[int], generators: list[torch.Generator], on_epoch=None) -> History:
    """Train the R replicas of `model` (R = len(seeds)) by Adam on the negative ELBO."""
    device = torch.device(config.device)
    model.to(device)
    R, n = len(seeds), len(y_train)
    data = torch.as_tensor(np.asarray(y_train), dtype=torch.float32, device=device).reshape(n, 1)
    val = torch.as_tensor(np.asarray(y_val), dtype=torch.float32, device=device).reshape(1, -1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    schedule = _schedule(optimizer, config)
    active = torch.ones(R, dtype=torch.bool, device=device)
    history = History(divergence=[None] * R)
    start, step = time.perf_counter(), 0
    for epoch in range(config.epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)  # [R, N]
        losses = torch.zeros(R, device=device)
        for begin in range(0, n, config.batch_size):
            y = data[order[:, begin:begin + config.batch_size]]                                # [R, B, 1]
            eps = draw_noise(model, generators, y.shape[1], config.n_samples).to(device)
            loss = -elbo(model, y, eps).mean(1)                                               # [R]
            optimizer.zero_grad(set_to_none=False)
            torch.where(active, loss, torch.zeros_like(loss)).sum().backward()
            ok = torch.isfinite(loss) & _per_replica_finite_grads(model)
            newly = active & ~ok
            if newly.any():
                for r in newly.nonzero().flatten().tolist():
                    what = "loss" if not torch.isfinite(loss[r]) else "gradient"
                    history.divergence[r] = Divergence(epoch, step, f"non-finite {what}")
                active &= ok
            if not active.all():
                _freeze(model, optimizer, ~active)
            optimizer.step()
            losses += torch.where(active, loss.detach(), torch.zeros_like(loss)) * y.shape[1]
            step += 1
        if schedule is not None:
            schedule.step()
        val_elbo = validation_elbo(model, val, seeds, config.n_samples)
        for r in (active & ~torch.isfinite(val_elbo)).nonzero().flatten().tolist():
            history.divergence[r] = Divergence(epoch, step, "non-finite validation ELBO")
            active[r] = False
        history.train_loss.append(_masked(losses / n, active))
        history.val_elbo.append(_masked(val_elbo, active))
        if on_epoch is not None:
            on_epoch(epoch, history)
    history.seconds = time.perf_counter() - start
    return history


def _schedule(optimizer, config: TrainConfig):
    if config.lr_schedule == "constant":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs, eta_min=config.lr * config.final_lr_factor)


def _masked(values: torch.Tensor, active: torch.Tensor) -> list[float]:
    return [float(v) if a else math.nan for v, a in zip(values.tolist(), active.tolist())]
