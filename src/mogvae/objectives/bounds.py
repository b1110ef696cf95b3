"""Objectives: pure functions of (model, data, noise), one value per data point
per replica, [R, B]. The caller reduces.

Noise is passed in, not drawn here, so that each replica's draws come from its
own generator (see model/layers.py) and so that tests can fix it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..model.layers import randn_per_replica
from ..model.vae import VAE


def noise_shape(model: VAE, batch: int, n_samples: int = 1) -> tuple[int, int, int, int]:
    """Shape of one replica's standard-normal noise: [n, K, B, D]."""
    return (n_samples, model.posterior.k, batch, model.latent_dim)


def draw_noise(model: VAE, generators, batch: int, n_samples: int = 1, dtype=torch.float32):
    return randn_per_replica(generators, noise_shape(model, batch, n_samples), dtype=dtype)


def log_weights(model: VAE, y: torch.Tensor, eps: torch.Tensor, q=None):
    """log p(y|z) + log p(z) - log q(z|y) at stratified draws z ~ q_k, with q the
    encoder's posterior unless given (the gap decomposition's per-point optimum).
    y [R, B, Y], eps [R, n, K, B, D] -> (log_w [R, n, K, B], stratum weights [R, 1, K, B])."""
    # Densities are computed in y's precision: float32 in training, float64 when
    # quadrature evaluates the (float32) networks.
    q = (model.posterior(y) if q is None else q).to(y.dtype)
    z, log_q = q.rsample_with_log_prob(eps.to(y.dtype))   # [R, n, K, B, D], [R, n, K, B]
    R, n, K, B, D = z.shape
    z = z.reshape(R, n * K, B, D)                     # [R, S, B, D], a view
    log_w = (model.decoder.log_prob(y, z) + model.prior().to(y.dtype).log_prob(z) - log_q.reshape(R, n * K, B))
    return log_w.reshape(R, n, K, B), q.stratum_weights()


def elbo(model: VAE, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Reparameterized ELBO per point, [R, B]. For a mixture q this is the
    stratified estimator sum_k pi_k mean_j log w(z_jk), z_jk ~ q_k: unbiased,
    with the full-mixture log q and no score-function term."""
    log_w, pi = log_weights(model, y, eps)
    return (log_w * pi).sum(2).mean(1)


def iwae_bound(model: VAE, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Importance-weighted bound per point, [R, B]:
    log (1/n) sum_j sum_k pi_k w(z_jk), a lower bound on log p(y) that tightens with n."""
    log_w, pi = log_weights(model, y, eps)
    n = log_w.shape[1]
    return torch.logsumexp(log_w + torch.log(pi), dim=(1, 2)) - math.log(n)


@dataclass(frozen=True)
class SampledBound:
    """A training objective that is a lower bound on log p(y), estimated per point from
    reparameterized draws of q: the trainer draws the noise, chunks the batch, and
    compiles the loss where that repays (training/compiled.py)."""
    name: str
    per_point: Callable[[VAE, torch.Tensor, torch.Tensor], torch.Tensor]   # (model, y, eps) -> [R, B]
    summary: str
    sampled: ClassVar[bool] = True
    oracle: ClassVar[bool] = False      # it trains a VAE, not the maximum-likelihood reference

    def check(self, model, train) -> None:
        """Every model a bound can train, evaluation can evaluate: nothing to refuse."""

    def training_grid(self, train) -> None:
        """No quadrature in training: evaluation has no training grid to check."""
        return None

    def step_cost(self, train) -> float:
        """A step's cost in decoder passes per data point and posterior component."""
        return 1.0


ELBO = SampledBound("elbo", elbo, "the VAE's evidence lower bound")
IWAE = SampledBound("iwae", iwae_bound, "the importance-weighted bound with n_samples draws per component "
                    "(stratified over a mixture posterior)")
