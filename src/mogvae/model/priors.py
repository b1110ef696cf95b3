"""Priors p(z): each returns a normalized latent distribution (distributions.py)
with B = 1: a `DiagMixture`, or for a VampPrior the pool of its posterior's family."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mixtures import DiagMixture

MIN_SCALE = 1e-4  # keeps densities finite if a learnable scale collapses


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I)."""

    def __init__(self, replicas: int, latent_dim: int, **_):
        super().__init__()
        self.register_buffer("loc", torch.zeros(replicas, 1, 1, 1, latent_dim))
        self.register_buffer("scale", torch.ones(replicas, 1, 1, 1, latent_dim))
        self.register_buffer("logits", torch.zeros(replicas, 1, 1, 1))

    def forward(self) -> DiagMixture:
        return DiagMixture(self.logits, self.loc, self.scale)


class MixturePrior(nn.Module):
    """p(z) = sum_i pi_i N(mu_i, diag s_i^2) with learnable mu_i, s_i; equal
    weights pi_i = 1/M as in the paper unless `learn_weights`."""

    def __init__(self, replicas: int, latent_dim: int, n_components: int = 10,
                 learn_weights: bool = False, **_):
        super().__init__()
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components!r}")
        shape = (replicas, n_components, latent_dim)
        self.loc = nn.Parameter(torch.zeros(shape))
        self.raw_scale = nn.Parameter(torch.zeros(shape))
        logits = torch.zeros(replicas, n_components)
        if learn_weights:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    def reset_replica(self, r: int, generator: torch.Generator) -> None:
        # Means spread like draws from N(0, 1), unit scales: an initial prior
        # close to the standard normal, with components that can separate.
        with torch.no_grad():
            self.loc[r].normal_(0.0, 1.0, generator=generator)
            self.raw_scale[r].fill_(_inverse_softplus(1.0 - MIN_SCALE))

    def forward(self) -> DiagMixture:
        scale = F.softplus(self.raw_scale) + MIN_SCALE
        return DiagMixture(self.logits[:, None, None, :], self.loc[:, None, None],
                           scale[:, None, None])


class VampPrior(nn.Module):
    """p(z) = (1/M) sum_m q(z | u_m): the posterior's encoder applied to M learnable
    pseudo-inputs u_m in data space (Tomczak & Welling 2018), of whatever family
    the posterior is (`pool`): a mixture posterior makes it a mixture of M x K
    components, a flow posterior a mixture of M flows. The encoder is
    the posterior's own (attached by `build_model`, not a sub-module: its
    parameters belong to the posterior, once)."""

    uses_training_points = True   # its n_components pseudo-inputs stand in for training points: at most n_train

    def __init__(self, replicas: int, latent_dim: int, data_dim: int = 1, n_components: int = 10, **_):
        super().__init__()
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components!r}")
        self.pseudo_inputs = nn.Parameter(torch.zeros(replicas, n_components, data_dim))
        self._encoder = None

    def attach(self, posterior: nn.Module) -> None:
        object.__setattr__(self, "_encoder", posterior)   # not registered: no second copy in state_dict

    def reset_replica(self, r: int, generator: torch.Generator) -> None:
        # spread over the paper's data range, [0, 1] plus noise; the encoder maps them into z
        with torch.no_grad():
            self.pseudo_inputs[r].normal_(0.5, 0.5, generator=generator)

    def forward(self):
        if self._encoder is None:
            raise RuntimeError("a VampPrior needs its posterior's encoder: build it with build_model")
        return self._encoder(self.pseudo_inputs).pool()               # batch [R, 1, M] -> B = 1


def _inverse_softplus(x: float) -> float:
    return float(torch.log(torch.expm1(torch.tensor(x))))


PRIORS = {"normal": StandardNormalPrior, "mog": MixturePrior, "vamp": VampPrior}
