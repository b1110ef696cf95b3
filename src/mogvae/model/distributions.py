"""The latent-distribution protocol: all that evaluation reads from a prior or a posterior.

A prior or a posterior returns a distribution with batch [R, 1, B] and event [D]
(B = 1 for a prior). Quadrature, importance sampling, the gap decomposition and
the figures use only these members, so a new family (mixtures.DiagMixture,
flows.SplineFlow, ...) needs no evaluation code:

    log_prob(z)                 z [R, S, B, D] -> [R, S, B], normalized
    density(z)                  exp(log_prob(z)), as fast as the family allows
    strata                      K: draws are stratified over K pieces (a mixture's
                                components; 1 for a flow)
    stratified_rsample(eps)     standard-normal eps [R, n, K, B, D] -> z [R, n, K, B, D]
    rsample_with_log_prob(eps)  (z, log_prob(z) [R, n, K, B]), exact for a flow
    stratum_weights()           [R, 1, K, B]: stratum k weighted by these gives
                                unbiased expectations (Morningstar et al. 2021)
    reach(span)                 (lo, hi), each [R, B, D]: where the draws of eps in
                                [-span, span] land (the quadrature's window)
    resolution()                [R, B]: the narrowest length on which the density
                                changes (the quadrature's stride resolves it)
    select(index)               the same, for the points `index` of the batch
    pool()                      the equal-weight mixture over the batch, B = 1 (VampPrior)
    smooth                      False for a density that is only piecewise smooth
    base_rule(n)                None, or for a family that is only piecewise smooth, a
                                quadrature rule over eps with nodes on its pieces
    knots()                     None, or for a piecewise-smooth 1-D family, where its pieces
                                meet in z: [R, B, m] (adaptive quadrature's breaks)
    sample(generators, n)       ancestral draws [R, n, D] with B = 1, replica r from generators[r]
    to(dtype)

This module also holds the two ways evaluation combines such distributions:
`Defensive` (the importance sampler's proposal) and `Pooled` (a VampPrior).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class Latent:
    """Members of the protocol that follow from the others."""

    strata: int
    smooth = True       # an analytic density: the trapezoid rule over z converges faster than any power

    def density(self, z: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_prob(z))

    def rsample_with_log_prob(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.stratified_rsample(eps)                     # [R, n, K, B, D]
        R, n, K, B, D = z.shape
        return z, self.log_prob(z.reshape(R, n * K, B, D)).reshape(R, n, K, B)

    def base_rule(self, n: int, span: float = 8.0, breaks=None):
        """A family whose draws are only piecewise smooth in eps (a spline flow) gives
        (eps [R, J, K, B, D], weights [R, J, K, B]) for the expectation over each
        stratum's standard-normal draws, with nodes on its pieces; None (the default)
        means the density is smooth and quadrature over z is exact-quality."""
        return None

    def knots(self) -> torch.Tensor | None:
        """Where a piecewise-smooth 1-D density's pieces meet, in z: [R, B, m]; None if it is smooth."""
        return None

    def pool(self) -> "Latent":
        return Pooled(self)

    def sample(self, generators: list[torch.Generator], n: int) -> torch.Tensor:
        """Draws [R, n, D] (B = 1): per draw a stratum by its weight, then that stratum's
        reparameterized draw (every stratum is drawn and one kept: strata are few)."""
        weights = self.stratum_weights()                     # [R, 1, K, 1]
        R, K, D = weights.shape[0], self.strata, self.dim
        out = []
        for r, g in enumerate(generators):
            k = torch.multinomial(weights[r, 0, :, 0], n, replacement=True, generator=g)   # [n]
            out.append((k, torch.randn((n, D), generator=g, dtype=weights.dtype)))
        eps = torch.stack([e for _, e in out])[:, :, None, None, :].expand(R, n, K, 1, D)
        z = self.stratified_rsample(eps)[:, :, :, 0]         # [R, n, K, D]
        chosen = torch.stack([k for k, _ in out])             # [R, n]
        return z.gather(2, chosen[:, :, None, None].expand(R, n, 1, D))[:, :, 0]


def replicas_of(dist, index):
    """The same distribution with only the replicas `index` (a slice or a list) of each of its tensors,
    which all carry the replica axis first, and of each distribution it holds (a defensive mixture's,
    a pool's members)."""
    if isinstance(dist, torch.Tensor):
        return dist[index]
    if not dataclasses.is_dataclass(dist):
        return dist
    return dataclasses.replace(dist, **{f.name: replicas_of(getattr(dist, f.name), index)
                                        for f in dataclasses.fields(dist) if f.init})


def box(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per replica, the box holding every point's reach: [R, B, D] each -> [R, D] each."""
    return lo.amin(1), hi.amax(1)


@dataclass(frozen=True)
class Defensive(Latent):
    """(1 - alpha) q + alpha p: q with batch B, p with B = 1 (Hesterberg 1995).
    Its strata are q's, then p's."""

    q: Any
    p: Any
    alpha: float

    @property
    def strata(self) -> int:
        return self.q.strata + self.p.strata

    @property
    def dim(self) -> int:
        return self.q.dim

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return torch.logaddexp(self.q.log_prob(z) + math.log1p(-self.alpha), self.p.log_prob(z) + math.log(self.alpha))

    def stratified_rsample(self, eps: torch.Tensor) -> torch.Tensor:
        k = self.q.strata
        return torch.cat([self.q.stratified_rsample(eps[:, :, :k]), self.p.stratified_rsample(eps[:, :, k:])], 2)

    def stratum_weights(self) -> torch.Tensor:
        wq = self.q.stratum_weights()                        # [R, 1, Kq, B]
        wp = self.p.stratum_weights().expand(-1, -1, -1, wq.shape[-1])
        return torch.cat([wq * (1 - self.alpha), wp * self.alpha], 2)

    def reach(self, span: float):
        (ql, qh), (pl, ph) = self.q.reach(span), self.p.reach(span)
        return torch.minimum(ql, pl), torch.maximum(qh, ph)

    def resolution(self) -> torch.Tensor:
        return torch.minimum(self.q.resolution(), self.p.resolution())

    def select(self, index) -> "Defensive":
        return Defensive(self.q.select(index), self.p, self.alpha)

    def to(self, dtype: torch.dtype) -> "Defensive":
        return Defensive(self.q.to(dtype), self.p.to(dtype), self.alpha)


@dataclass(frozen=True)
class Pooled(Latent):
    """(1/M) sum_m inner_m: the equal-weight mixture over the M points of `inner`'s
    batch, as a distribution with B = 1 (the VampPrior of any posterior family).
    Its strata are inner's strata for each m, K x M of them."""

    inner: Any

    @property
    def smooth(self) -> bool:
        return self.inner.smooth

    @property
    def members(self) -> int:
        return self.inner.stratum_weights().shape[-1]

    @property
    def strata(self) -> int:
        return self.inner.strata * self.members

    @property
    def dim(self) -> int:
        return self.inner.dim

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        R, S, B, D = z.shape
        M = self.members
        each = self.inner.log_prob(z.reshape(R, S * B, 1, D).expand(R, S * B, M, D))   # [R, S B, M]
        return (torch.logsumexp(each, -1) - math.log(M)).reshape(R, S, B)

    def stratified_rsample(self, eps: torch.Tensor) -> torch.Tensor:
        # the point axis B becomes part of the sample axis: every point draws from all M members
        R, n, _, B, D = eps.shape
        K, M = self.inner.strata, self.members
        e = eps.reshape(R, n, K, M, B, D).permute(0, 1, 4, 2, 3, 5).reshape(R, n * B, K, M, D)
        z = self.inner.stratified_rsample(e)
        return z.reshape(R, n, B, K, M, D).permute(0, 1, 3, 4, 2, 5).reshape(R, n, K * M, B, D)

    def knots(self) -> torch.Tensor | None:
        inner = self.inner.knots()                           # [R, M, m]
        return None if inner is None else inner.reshape(inner.shape[0], 1, -1)

    def stratum_weights(self) -> torch.Tensor:
        w = self.inner.stratum_weights()                     # [R, 1, K, M]
        return (w / self.members).reshape(w.shape[0], 1, -1, 1)

    def reach(self, span: float):
        lo, hi = self.inner.reach(span)                      # [R, M, D]
        return lo.amin(1, keepdim=True), hi.amax(1, keepdim=True)

    def resolution(self) -> torch.Tensor:
        return self.inner.resolution().amin(1, keepdim=True)

    def select(self, index) -> "Pooled":
        return self                                          # one point (B = 1), shared by every point

    def to(self, dtype: torch.dtype) -> "Pooled":
        return Pooled(self.inner.to(dtype))


@functools.lru_cache(maxsize=8)
def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's n-node Gauss-Legendre rule on [-1, 1], computed once (read only): a flow's rule is built on
    every gap-search step, and the adaptive panels on every call; recomputing it was about 6% of a
    VampPrior of flows' search and of its oracle's evaluation."""
    return np.polynomial.legendre.leggauss(n)


SQUARED_BY_AXIS = 8     # up to this many axes are summed one by one (squared_distance); more by torch.sum


def squared_distance(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """sum_d ((z_d - loc_d) / scale_d)^2 over the last axis, broadcast: a diagonal Gaussian's exponent
    (the mixtures' components, the decoder). A sum over a short last axis is torch's slow case (a third
    of a 2-D evaluation's time), so up to SQUARED_BY_AXIS axes are added one by one, in order:
    element-wise, the same rounding whatever the batch."""
    D = z.shape[-1]
    if D > SQUARED_BY_AXIS:
        r = z - loc
        graph = torch.is_grad_enabled() and (r.requires_grad or scale.requires_grad)
        if (not graph and r.dtype == torch.promote_types(r.dtype, scale.dtype)
                and r.shape == torch.broadcast_shapes(r.shape, scale.shape)):
            return r.div_(scale).square_().sum(-1)    # no graph to keep: in place, two [..., D] arrays fewer
        r = r / scale
        return (r * r).sum(-1)
    out = None
    for d in range(D):
        r = (z[..., d] - loc[..., d]) / scale[..., d]
        out = r * r if out is None else out + r * r
    return out
