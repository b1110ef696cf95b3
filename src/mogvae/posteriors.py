"""Amortized posteriors q(z|y): an encoder MLP maps y to a `DiagMixture`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mixtures import DiagMixture
from .replicas import MLP

MIN_SCALE = 1e-4


class MixturePosterior(nn.Module):
    """q(z|y) = sum_i pi_i N(mu_i(y), diag sigma_i(y)^2). Equal weights unless
    `learn_weights` (then the encoder also outputs the logits). K = 1 is the
    mean-field Gaussian."""

    def __init__(self, replicas: int, latent_dim: int, data_dim: int, hidden: tuple[int, ...],
                 activation: str = "tanh", n_components: int = 1, learn_weights: bool = False, **_):
        super().__init__()
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components!r}")
        self.k, self.d = n_components, latent_dim
        self.learn_weights = learn_weights and n_components > 1
        out = n_components * latent_dim * 2 + (n_components if self.learn_weights else 0)
        self.encoder = MLP(replicas, data_dim, hidden, out, activation)

    def forward(self, y: torch.Tensor) -> DiagMixture:
        """y [R, B, Y] -> mixture with batch [R, 1, B]."""
        R, B, _ = y.shape
        h = self.encoder(y.to(self.encoder.net[0].weight.dtype))  # [R, B, out]
        kd = self.k * self.d
        loc = h[..., :kd].reshape(R, 1, B, self.k, self.d)
        scale = F.softplus(h[..., kd:2 * kd]).reshape(R, 1, B, self.k, self.d) + MIN_SCALE
        if self.learn_weights:
            logits = h[..., 2 * kd:].reshape(R, 1, B, self.k)
        else:
            logits = torch.zeros(R, 1, B, self.k, dtype=y.dtype, device=y.device)
        return DiagMixture(logits, loc, scale)


def GaussianPosterior(replicas, latent_dim, data_dim, hidden, activation="tanh", **_):
    """Mean-field Gaussian q(z|y) = N(mu(y), diag sigma(y)^2)."""
    return MixturePosterior(replicas, latent_dim, data_dim, hidden, activation, n_components=1)


POSTERIORS = {"gaussian": GaussianPosterior, "mog": MixturePosterior}
