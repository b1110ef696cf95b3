"""Diagonal Gaussian mixtures with a leading replica axis, on torch.distributions.

Priors and posteriors both produce a `DiagMixture`; a single Gaussian is the
K = 1 case. Layout (the sample axis sits second so that the replica axis stays
first and the decoder can flatten without a copy):

    logits [R, 1, B, K]      loc, scale [R, 1, B, K, D]      (B = 1 for a prior)
    a latent sample z [R, S, B, D]; log_prob(z) -> [R, S, B]

It implements the latent-distribution protocol (distributions.py): its strata
are its components.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from .distributions import Latent, squared_distance


@dataclass(frozen=True)
class DiagMixture(Latent):
    logits: torch.Tensor  # [R, 1, B, K]  mixture weights, unnormalized
    loc: torch.Tensor     # [R, 1, B, K, D]
    scale: torch.Tensor   # [R, 1, B, K, D]

    @property
    def strata(self) -> int:
        return self.loc.shape[-2]

    @property
    def dim(self) -> int:
        return self.loc.shape[-1]

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)  # [R, 1, B, K]

    def to(self, dtype: torch.dtype) -> "DiagMixture":
        """The same mixture with parameters in `dtype` (evaluation computes densities
        in float64 from a network trained in float32)."""
        if self.loc.dtype == dtype:
            return self
        return DiagMixture(self.logits.to(dtype), self.loc.to(dtype), self.scale.to(dtype))

    def distribution(self):
        """The torch distribution: batch shape [R, 1, B], event shape [D]; the reference that
        tests/test_densities.py holds `log_prob` to (log_prob itself takes fewer passes)."""
        if self.strata == 1:
            return Independent(Normal(self.loc[..., 0, :], self.scale[..., 0, :], validate_args=False), 1)
        return MixtureSameFamily(
            Categorical(logits=self.logits, validate_args=False),
            Independent(Normal(self.loc, self.scale, validate_args=False), 1),
            validate_args=False,
        )

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized log density, z [R, S, B, D] -> [R, S, B]: what `distribution().log_prob` gives
        (tests/test_densities.py holds it to that, values and gradients), in fewer passes over the
        [R, S, B, K] elements (_log_components), then log-sum-exp over K. Measured on a 2-D evaluation
        (tabular --quick, mog-both, d_z = 2), where the mixtures' densities took three quarters of the
        time: 18.3 -> 8.2 s."""
        log_comp = self._log_components(z)
        return log_comp[..., 0] if self.strata == 1 else torch.logsumexp(log_comp, -1)

    def density(self, z: torch.Tensor) -> torch.Tensor:
        """exp(log_prob(z)) summed directly, without log-sum-exp's max pass: 2x
        faster on the quadrature grids, and exact there, where a density that
        underflows contributes nothing. z [R, S, B, D] -> [R, S, B]."""
        return torch.exp(self._log_components(z)).sum(-1)

    def _log_components(self, z: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(z; loc_k, scale_k) for each component: z [R, S, B, D] -> [R, S, B, K]. Each
        component's squared standardized distance is summed axis by axis (distributions.squared_distance),
        then its constant added (log_softmax of one logit is exactly 0: K = 1 needs no log-sum-exp)."""
        log_norm = torch.log(self.scale).sum(-1) + 0.5 * self.dim * math.log(2 * math.pi)     # [R, 1, B, K]
        squared = squared_distance(z[..., None, :], self.loc, self.scale)                   # [R, S, B, K]
        return -0.5 * squared + (torch.log_softmax(self.logits, -1) - log_norm)

    def reach(self, span: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Every component's loc -+ span * scale, lowest and highest: [R, B, D] each."""
        return ((self.loc - span * self.scale).amin(-2)[:, 0], (self.loc + span * self.scale).amax(-2)[:, 0])

    def resolution(self) -> torch.Tensor:
        """The narrowest component's scale: [R, B]."""
        return self.scale.amin(dim=(-2, -1))[:, 0]

    def select(self, index) -> "DiagMixture":
        return DiagMixture(self.logits[:, :, index], self.loc[:, :, index], self.scale[:, :, index])

    def pool(self) -> "DiagMixture":
        """(1/B) sum_b q_b, itself a mixture (of B x K components) with B = 1."""
        R, _, B, K, D = self.loc.shape
        logits = torch.log_softmax(self.logits, -1) - math.log(B)          # [R, 1, B, K]
        return DiagMixture(logits.reshape(R, 1, 1, B * K), self.loc.reshape(R, 1, 1, B * K, D),
                           self.scale.reshape(R, 1, 1, B * K, D))

    def stratified_rsample(self, eps: torch.Tensor) -> torch.Tensor:
        """Reparameterized draws, n per component: eps [R, n, K, B, D] -> z [R, n, K, B, D].
        Weighting stratum k by weights[k] gives unbiased expectations under the
        mixture with no score-function term (Morningstar et al., 2021)."""
        loc = self.loc.transpose(2, 3)      # [R, 1, K, B, D]
        scale = self.scale.transpose(2, 3)
        return loc + scale * eps

    def stratum_weights(self) -> torch.Tensor:
        return self.weights.transpose(2, 3)  # [R, 1, K, B]

    def sample(self, generators: list[torch.Generator], n: int) -> torch.Tensor:
        """Ancestral draws (no gradient) for a mixture with B = 1: -> [R, n, D]."""
        out = []
        for r, g in enumerate(generators):
            w = self.weights[r, 0, 0]                                     # [K]
            k = torch.multinomial(w, n, replacement=True, generator=g)    # [n]
            eps = torch.randn((n, self.loc.shape[-1]), generator=g, dtype=self.loc.dtype)
            out.append(self.loc[r, 0, 0, k] + self.scale[r, 0, 0, k] * eps)
        return torch.stack(out)
