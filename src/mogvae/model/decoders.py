"""Decoders p(y|z) = N(f_phi(z), diag sigma_dec^2)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .distributions import squared_distance
from .layers import MLP


class GaussianDecoder(nn.Module):
    """Known noise sigma_dec by default (the paper's "known covariance");
    learnable (one log-sigma per replica and output) when `learn_noise`."""

    def __init__(self, replicas: int, latent_dim: int, data_dim: int, hidden: tuple[int, ...],
                 activation: str = "tanh", noise: float = 0.1, learn_noise: bool = False, **_):
        super().__init__()
        if not (math.isfinite(noise) and noise > 0):
            raise ValueError(f"decoder noise must be positive and finite, got {noise!r}")
        self.net = MLP(replicas, latent_dim, hidden, data_dim, activation)
        self.data_dim = data_dim
        # A known noise stays an exact Python float (a float32 buffer would round sigma).
        self.known_noise = None if learn_noise else noise
        if learn_noise:
            self.log_noise = nn.Parameter(torch.full(self.shape, math.log(noise)))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(R, 1, 1, Y): log sigma_dec's shape, R read from the network (a replica subset has fewer)."""
        return (self.net.net[0].weight.shape[0], 1, 1, self.data_dim)

    def log_noise_as(self, dtype: torch.dtype) -> torch.Tensor:
        """log sigma_dec, [R, 1, 1, Y], in `dtype`."""
        if self.known_noise is None:
            return self.log_noise.to(dtype)
        device = self.net.net[0].weight.device
        return torch.full(self.shape, math.log(self.known_noise), dtype=dtype, device=device)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """f_phi(z): z [R, S, B, D] -> [R, S, B, Y] (flattened through the MLP as a view)."""
        return self._network_mean(z).to(z.dtype)  # precision follows the data: float64 z gives float64 densities

    def _network_mean(self, z: torch.Tensor) -> torch.Tensor:
        """f_phi(z) in the network's dtype."""
        R, S, B, D = z.shape
        net_dtype = self.net.net[0].weight.dtype
        return self.net(z.reshape(R, S * B, D).to(net_dtype)).reshape(R, S, B, -1)

    def log_prob_from_mean(self, y: torch.Tensor, mean: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """log N(y; mean, sigma^2) summed over data dims: y [R, B, Y], mean [R, S, B, Y] -> [R, S, B], in
        `dtype` (mean's by default). Written out (as DiagMixture.log_prob) rather than torch.distributions'
        Normal, whose log_prob takes five passes over [R, S, B, Y] and a sum over Y; tests/test_densities.py
        holds it to SciPy."""
        log_noise = self.log_noise_as(dtype or mean.dtype)                         # [R, 1, 1, Y]
        log_norm = log_noise.sum(-1) + 0.5 * self.data_dim * math.log(2 * math.pi)   # [R, 1, 1]
        return -0.5 * squared_distance(y[:, None], mean, torch.exp(log_noise)) - log_norm

    def log_prob(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # the network's float32 mean enters y - mean as it is: promoted exactly to y's float64 there, without
        # a float64 copy of [R, S, B, Y] first (bitwise the same)
        dtype = torch.promote_types(y.dtype, z.dtype)          # as y - mean.to(z.dtype) promoted before
        return self.log_prob_from_mean(y.to(dtype), self._network_mean(z), dtype=dtype)

    def noise(self) -> torch.Tensor:
        return torch.exp(self.log_noise_as(self.net.net[0].weight.dtype)[:, 0, 0])  # [R, Y]
