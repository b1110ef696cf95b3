"""Amortized posteriors q(z|y): an encoder MLP maps y to the raw parameters of a
latent distribution (the protocol in distributions.py).

Every posterior is `from_raw(raw(y))`: `raw` is the encoder's output vector per
point and `from_raw` the family's map from it to a distribution. The gap
decomposition optimizes that vector per point (estimators/gaps.py), so it needs nothing
else from a family. `k` is the number of strata of its distributions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .flows import SplineFlow
from .layers import MLP
from .mixtures import DiagMixture

MIN_SCALE = 1e-4


def raw_scale(scale: torch.Tensor) -> torch.Tensor:
    """The raw parameter whose scale is `scale` (softplus's inverse, past MIN_SCALE; scales below
    2 MIN_SCALE or above 30 are taken as those)."""
    return torch.log(torch.expm1((scale - MIN_SCALE).clamp(min=MIN_SCALE, max=30.0)))


class _Amortized(nn.Module):
    """An encoder y [R, B, Y] -> raw [R, B, out] in the encoder's precision."""

    def __init__(self, replicas: int, data_dim: int, hidden: tuple[int, ...], out: int, activation: str):
        super().__init__()
        self.encoder = MLP(replicas, data_dim, hidden, out, activation)

    def raw(self, y: torch.Tensor) -> torch.Tensor:
        return self.encoder(y.to(self.encoder.net[0].weight.dtype))

    def forward(self, y: torch.Tensor):
        """y [R, B, Y] -> a distribution with batch [R, 1, B]."""
        return self.from_raw(self.raw(y))


class MixturePosterior(_Amortized):
    """q(z|y) = sum_i pi_i N(mu_i(y), diag sigma_i(y)^2). Equal weights unless
    `learn_weights` (then the encoder also outputs the logits). K = 1 is the
    mean-field Gaussian."""

    @staticmethod
    def decoded_per_point(n_components: int) -> int:
        """Latent draws a training step decodes per data point: one per component (the sweep's
        cost estimate; a family without this attribute decodes one)."""
        return n_components

    def __init__(self, replicas: int, latent_dim: int, data_dim: int, hidden: tuple[int, ...],
                 activation: str = "tanh", n_components: int = 1, learn_weights: bool = False, **_):
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components!r}")
        learn_weights = learn_weights and n_components > 1
        out = n_components * latent_dim * 2 + (n_components if learn_weights else 0)
        super().__init__(replicas, data_dim, hidden, out, activation)
        self.k, self.d, self.learn_weights = n_components, latent_dim, learn_weights

    def from_raw(self, h: torch.Tensor) -> DiagMixture:
        R, B, _ = h.shape
        kd = self.k * self.d
        loc = h[..., :kd].reshape(R, 1, B, self.k, self.d)
        scale = F.softplus(h[..., kd:2 * kd]).reshape(R, 1, B, self.k, self.d) + MIN_SCALE
        if self.learn_weights:
            logits = h[..., 2 * kd:].reshape(R, 1, B, self.k)
        else:
            logits = torch.zeros(R, 1, B, self.k, dtype=h.dtype, device=h.device)
        return DiagMixture(logits, loc, scale)


def GaussianPosterior(replicas, latent_dim, data_dim, hidden, activation="tanh", **_):
    """Mean-field Gaussian q(z|y) = N(mu(y), diag sigma(y)^2) (one draw per point, whatever n_components)."""
    return MixturePosterior(replicas, latent_dim, data_dim, hidden, activation, n_components=1)


class FlowPosterior(_Amortized):
    """q(z|y): a rational-quadratic spline flow (flows.SplineFlow) with `flow_bins`
    bins per latent coordinate, all of whose parameters the encoder outputs:
    per coordinate a location, a scale, and the spline's bins widths, bins heights
    and bins - 1 knot derivatives."""

    def __init__(self, replicas: int, latent_dim: int, data_dim: int, hidden: tuple[int, ...],
                 activation: str = "tanh", flow_bins: int = 8, **_):
        if flow_bins < 2:
            raise ValueError(f"flow_bins must be >= 2, got {flow_bins!r}")
        super().__init__(replicas, data_dim, hidden, latent_dim * (3 * flow_bins + 1), activation)
        self.k, self.d, self.bins = 1, latent_dim, flow_bins

    def from_raw(self, h: torch.Tensor) -> SplineFlow:
        R, B, _ = h.shape
        h = h.reshape(R, 1, B, self.d, 3 * self.bins + 1)
        n = self.bins
        return SplineFlow(h[..., 0], F.softplus(h[..., 1]) + MIN_SCALE, h[..., 2:2 + n], h[..., 2 + n:2 + 2 * n],
                          h[..., 2 + 2 * n:])


POSTERIORS = {"gaussian": GaussianPosterior, "mog": MixturePosterior, "flow": FlowPosterior}
