"""A prior from outside mogvae: independent Student-t coordinates with a learnable location
and scale per replica, p(z) = prod_d t_nu((z_d - loc_d) / scale_d) / scale_d. Built only
on the latent-distribution protocol (mogvae.model.distributions); docs/how-to/add-a-family.md
builds the same prior, and tests/test_plugins.py checks it against SciPy."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import ndtr, stdtrit
from torch import nn
from torch.distributions import StudentT

from mogvae.model.distributions import Latent

DF = 10.0   # heavier tails widen the quadrature's window: reach(8) is +-84 scales at nu = 10


@dataclass(frozen=True)
class StudentTLatent(Latent):
    loc: torch.Tensor     # [R, 1, 1, D]: batch [R, 1, B = 1], event [D]
    scale: torch.Tensor   # [R, 1, 1, D]
    strata = 1            # one piece: every draw comes from the inverse CDF

    @property
    def dim(self) -> int:
        return self.loc.shape[-1]

    def log_prob(self, z):                                   # z [R, S, 1, D] -> [R, S, 1]
        return StudentT(DF, self.loc, self.scale, validate_args=False).log_prob(z).sum(-1)

    def _quantile(self, eps):
        """The t quantile at the normal CDF of eps: a standard-normal draw becomes a t draw. Taken
        in the lower tail and mirrored (exact symmetry, no 1 - tiny), |eps| capped at 37, past
        which the normal CDF underflows."""
        e = eps.detach().cpu().double().clamp(-37, 37).numpy()
        t = -stdtrit(DF, ndtr(-abs(e))) * np.sign(e)
        return torch.as_tensor(t, dtype=self.loc.dtype, device=self.loc.device)

    def stratified_rsample(self, eps):                       # eps [R, n, 1, 1, D]
        return self.loc[:, :, None] + self.scale[:, :, None] * self._quantile(eps)

    def stratum_weights(self):
        return torch.ones(self.loc.shape[0], 1, 1, 1, dtype=self.loc.dtype, device=self.loc.device)

    def reach(self, span):                                   # [R, 1, D] each
        t = float(self._quantile(torch.tensor(float(span))))
        return (self.loc - t * self.scale)[:, 0], (self.loc + t * self.scale)[:, 0]

    def resolution(self):
        return self.scale.amin(-1)[:, 0]                     # [R, 1]

    def select(self, index):
        return self                                          # a prior has one point (B = 1)

    def to(self, dtype):
        return StudentTLatent(self.loc.to(dtype), self.scale.to(dtype))


class StudentTPrior(nn.Module):
    """The registry's side: built as PRIORS[name](replicas, latent_dim, ...), returns the latent."""

    def __init__(self, replicas, latent_dim, **_):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(replicas, 1, 1, latent_dim))
        self.raw_scale = nn.Parameter(torch.full((replicas, 1, 1, latent_dim), 0.5413))  # softplus: 1.0

    def forward(self):
        return StudentTLatent(self.loc, F.softplus(self.raw_scale) + 1e-4)
