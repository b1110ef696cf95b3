"""A rational-quadratic spline flow on a Gaussian base, per point and replica.

    z = loc + scale * T(u),   u ~ N(0, I),
    T: a monotone rational-quadratic spline per coordinate (Durkan et al. 2019) on
       [-bound, bound], the identity outside,
    log q(z) = sum_d [ log N(u_d) - log T'(u_d) - log scale_d ].

The spline is zuko's `MonotonicRQSTransform`, which takes its bin widths, heights
and knot derivatives as tensors of any batch shape: here [R, 1, B, D, bins], so
one flow per replica and point, the encoder's output (no per-replica modules).
With equal widths and heights and unit derivatives T is the identity, so the
family contains the mean-field Gaussian. In D >= 2 the coordinates are
transformed independently (a factorized flow): each marginal may be
multimodal, but q has no correlation between coordinates.

It implements the latent-distribution protocol (distributions.py) with one
stratum: a draw is T of one standard-normal draw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from zuko.transforms import MonotonicRQSTransform

from .distributions import Latent, gauss_legendre

BOUND = 5.0     # the spline acts on [-5, 5] of the base: all but 6e-7 of N(0, 1)'s mass
RESOLVE = 16    # quadrature nodes per bin, in units of 4 (see `resolution`)
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _inside(u: torch.Tensor, span: float) -> torch.Tensor:
    """The breaks u [..., m] within (-span, span), as few per row as the row holding the most needs
    (the rest of a row at span: empty pieces): most of a VampPrior's knots fall far out in a point's
    tails, and each piece costs its rule's nodes."""
    inside = u.abs() < span
    keep = max(int(inside.sum(-1).max()), 1)
    first = torch.sort(torch.where(inside, u, torch.full_like(u, math.inf)), -1).values[..., :keep]
    return first.clamp(-span, span)


class _Knots:
    """The spline's knots [R, B, D, K + 1] (zuko's parametrization: `MonotonicRQSTransform` turns the
    unconstrained widths, heights and derivatives into them) and its two directions, for values
    [R, B, D, S]: S per spline, on the last axis.

    zuko finds a value's bin by summing a [..., K + 1] comparison, once in `inv` and again in
    `call_and_ladj`, through a `broadcast` whose first use imports sympy (0.6 s). On a VampPrior of
    flows, whose every density is M flows at every node, those searches and gathers were most of the
    evaluation (the likelihoods 7.3 of 17.7 s at --quick). Here `torch.searchsorted` finds the bin
    once per direction, with a spline's S values on the last axis so that its knots are not copied
    S times, and the inverse's log T' comes from the same bin position as the inverse itself. The
    formulas are zuko's (Durkan et al. 2019), in its order of operations."""

    def __init__(self, spline: MonotonicRQSTransform):
        self._set(*(t[:, 0] for t in (spline.horizontal, spline.vertical, spline.derivatives)))

    def _set(self, x: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> None:
        self.x, self.y, self.d = x, y, d
        self.bins = self.x.shape[-1] - 1

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> "_Knots":
        """Knots given as tensors [R, B, D, K + 1] (SplineFlow.per_node's copies)."""
        knots = cls.__new__(cls)
        knots._set(x, y, d)
        return knots

    def _bin(self, knots: torch.Tensor, values: torch.Tensor):
        k = torch.searchsorted(knots.contiguous(), values.contiguous()) - 1      # [R, B, D, S]
        inside = (k >= 0) & (k < self.bins)
        k = k.clamp(0, self.bins - 1)
        x0, x1, y0, y1, d0, d1 = (t.gather(-1, i) for t in (self.x, self.y, self.d) for i in (k, k + 1))
        return inside, x0, x1, y0, y1, d0, d1, (y1 - y0) / (x1 - x0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """T(x) and log T'(x); the identity outside the knots."""
        inside, x0, x1, y0, y1, d0, d1, s = self._bin(self.x, x)
        t = inside * (x - x0) / (x1 - x0)
        y = y0 + (y1 - y0) * (s * t**2 + d0 * t * (1 - t)) / (s + (d0 + d1 - 2 * s) * t * (1 - t))
        return torch.where(inside, y, x), inside * _log_slope(t, s, d0, d1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u = T^-1(y) and log T'(u); the identity outside the knots."""
        inside, x0, x1, y0, y1, d0, d1, s = self._bin(self.y, y)
        y_ = inside * (y - y0)
        a = (y1 - y0) * (s - d0) + y_ * (d0 + d1 - 2 * s)
        b = (y1 - y0) * d0 - y_ * (d0 + d1 - 2 * s)
        c = -s * y_
        t = 2 * c / (-b - (b**2 - 4 * a * c).sqrt())                       # u's position within its bin
        return torch.where(inside, x0 + t * (x1 - x0), y), inside * _log_slope(t, s, d0, d1)


def _log_slope(t: torch.Tensor, s, d0, d1) -> torch.Tensor:
    """log T' at position t of a bin of slope s with knot derivatives d0, d1."""
    jacobian = s**2 * (2 * s * t * (1 - t) + d0 * (1 - t) ** 2 + d1 * t**2) / (s + (d0 + d1 - 2 * s) * t * (1 - t)) ** 2
    return jacobian.log()


def _last(x: torch.Tensor) -> torch.Tensor:
    """[R, S, B, D] -> [R, B, D, S]: a spline's values on the last axis (_Knots)."""
    return x.permute(0, 2, 3, 1)


def _back(x: torch.Tensor) -> torch.Tensor:
    """[R, B, D, S] -> [R, S, B, D]."""
    return x.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class SplineFlow(Latent):
    loc: torch.Tensor          # [R, 1, B, D]
    scale: torch.Tensor        # [R, 1, B, D]
    widths: torch.Tensor       # [R, 1, B, D, bins]   unconstrained
    heights: torch.Tensor      # [R, 1, B, D, bins]   unconstrained
    derivatives: torch.Tensor  # [R, 1, B, D, bins - 1]  unconstrained
    strata = 1
    smooth = False      # C1 only: the second derivative jumps at the knots

    @property
    def dim(self) -> int:
        return self.loc.shape[-1]

    @property
    def _knots(self) -> _Knots:
        """T's knots, from zuko's `MonotonicRQSTransform` of the parameters [R, 1, B, D, .]. Where no gradient
        flows through them they are built once per distribution: evaluation reads a VampPrior of flows at
        thousands of node sets with the same parameters (building the transform each time was 6% of it).
        Where one does, they are built for each use: a backward pass frees the graph a kept copy holds."""
        params = (self.widths, self.heights, self.derivatives)
        if torch.is_grad_enabled() and any(t.requires_grad for t in params):
            return _Knots(MonotonicRQSTransform(*params, bound=BOUND))
        if "_kept_knots" not in self.__dict__:              # frozen: set past the dataclass's __setattr__
            self.__dict__["_kept_knots"] = _Knots(MonotonicRQSTransform(*params, bound=BOUND))
        return self.__dict__["_kept_knots"]

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """z [R, S, B, D] -> [R, S, B], by T's analytic inverse."""
        v = ((z - self.loc) / self.scale).expand(z.shape[0], z.shape[1], *self.loc.shape[2:])
        u, log_slope = self._knots.inverse(_last(v))                             # [R, B, D, S]
        log_q = -0.5 * u * u - LOG_SQRT_2PI - log_slope - torch.log(_last(self.scale))
        return log_q.sum(2).permute(0, 2, 1)

    def stratified_rsample(self, eps: torch.Tensor) -> torch.Tensor:
        """eps [R, n, 1, B, D] -> z [R, n, 1, B, D]."""
        return self.rsample_with_log_prob(eps)[0]

    def rsample_with_log_prob(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The draw and its log density from the forward pass alone (no inverse):
        exact, and differentiable in the flow's parameters."""
        e = eps[:, :, 0].expand(*eps.shape[:2], *self.loc.shape[2:])               # [R, n, B, D]
        v, log_slope = (_back(t)[:, :, None] for t in self._knots.forward(_last(e)))
        loc, scale = self.loc[:, :, None], self.scale[:, :, None]
        z = loc + scale * v
        log_q = (-0.5 * eps * eps - LOG_SQRT_2PI - log_slope - torch.log(scale)).sum(-1)
        return z, log_q

    def stratum_weights(self) -> torch.Tensor:
        return torch.ones_like(self.loc[..., 0])[:, :, None]        # [R, 1, 1, B]

    def reach(self, span: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Where u = -+span lands: [R, B, D] each (T is increasing)."""
        ends = torch.tensor([-span, span], dtype=self.loc.dtype, device=self.loc.device)
        v, _ = self._knots.forward(ends.expand(*self.loc[:, 0].shape, 2))                # [R, B, D, 2]
        loc, scale = self.loc[:, 0], self.scale[:, 0]
        return loc + scale * v[..., 0], loc + scale * v[..., 1]

    def resolution(self) -> torch.Tensor:
        """The narrowest bin's width in z (each bin is one smooth rational-quadratic
        piece; the identity tails count as width scale), over RESOLVE: [R, B].

        The spline is only C1 (its second derivative jumps at the knots), so the
        trapezoid rule converges as h^2 on q, not faster than any power as on a
        Gaussian: measured on untrained flows, 4 nodes per bin left 4e-4 of q's mass
        unaccounted, 64 nodes per bin (4 per resolution) 2e-6. The fine and coarse
        rules still bound the error (|fine - coarse| is 3x the fine rule's error at h^2)."""
        heights = self._knots.y.diff(dim=-1).amin(-1)[:, None]         # [R, 1, B, D]
        return (self.scale * heights.clamp(max=1.0)).amin(-1)[:, 0] / RESOLVE

    def base_rule(self, n: int, span: float = 8.0, breaks: torch.Tensor | None = None):
        """A rule for E_{u ~ N(0, 1)}[g(z(u))] that respects the spline's pieces:
        Gauss-Legendre with n nodes on each bin and on each tail [-span, -BOUND],
        [BOUND, span] (g is smooth on each, only C1 across the knots, where a rule
        over the whole line converges slowly). `breaks` [R, m]: more places in z where
        g is not smooth (a VampPrior of flows' knots), mapped into each point's u by
        T's inverse and cut there too. Returns eps [R, J, 1, B, 1] and weights
        [R, J, 1, B] (the N(0, 1) density folded in); None for D > 1, where the
        tensor product would be (bins + 2)^2 n^2 nodes per point."""
        if self.dim != 1:
            return None
        knots = self._knots.x[:, None, :, 0]                          # [R, 1, B, bins + 1]
        ends = torch.full_like(knots[..., :1], span)
        if breaks is not None:                                       # z [R, m] -> u [R, 1, B, m]
            v = (breaks[:, None, None, :] - self.loc) / self.scale          # [R, 1, B, m] (D = 1)
            inside = self._knots.inverse(v.clamp(-BOUND, BOUND)[:, 0, :, None])[0][:, None, :, 0]
            u = torch.where(v.abs() < BOUND, inside, v)              # the identity beyond the spline's bound
            knots = torch.sort(torch.cat([knots, _inside(u, span)], -1), -1).values
        edges = torch.cat([-ends, knots, ends], -1)
        a, b = edges[..., :-1, None], edges[..., 1:, None]           # [R, 1, B, P, 1]
        x, w = (torch.as_tensor(t, dtype=knots.dtype, device=knots.device) for t in gauss_legendre(n))
        u = (a + b) / 2 + (b - a) / 2 * x                            # [R, 1, B, P, n]
        weights = (b - a) / 2 * w * torch.exp(-0.5 * u * u - LOG_SQRT_2PI)
        R, _, B = knots.shape[:3]
        eps = u.reshape(R, 1, B, -1).permute(0, 3, 1, 2)[..., None]  # [R, J, 1, B, 1]
        return eps, weights.reshape(R, 1, B, -1).permute(0, 3, 1, 2)

    def knots(self) -> torch.Tensor | None:
        """The spline's knots in z (T maps the horizontal knots onto the vertical ones): [R, B, bins + 1];
        None for D > 1."""
        if self.dim != 1:
            return None
        return (self.loc[:, 0, ..., None] + self.scale[:, 0, ..., None] * self._knots.y)[..., 0, :]   # D = 1

    def per_node(self, copies: int) -> tuple["SplineFlow", list[torch.Tensor], list[torch.Tensor]]:
        """Each of the B points repeated `copies` (J) times, copy j B + b being point b, for a sum over J
        nodes per point whose gradient is summed by the caller, in its own order (estimators/gaps.py's
        _flow_value_and_gradient): (the flow of the J B copies; the tensors it copies, this flow's location,
        scale and knots x, y, d; the copies, leaves that autograd can give a gradient). The knots are built
        once per point and copied, not built J times (their softmax was most of a step's time that way)."""
        knots = self._knots
        sources = [self.loc, self.scale, knots.x, knots.y, knots.d]

        def copied(t, axis):                 # the J copies on the point axis, as a leaf of their own
            shape = list(t.shape)
            repeated = t.detach().unsqueeze(axis).expand(*shape[:axis], copies, *shape[axis:])
            return repeated.reshape(*shape[:axis], copies * shape[axis], *shape[axis + 1:]).requires_grad_(True)

        leaves = [copied(t, 2) for t in sources[:2]] + [copied(t, 1) for t in sources[2:]]
        raw = [copied(t, 2).detach() for t in (self.widths, self.heights, self.derivatives)]
        flow = SplineFlow(*leaves[:2], *raw)
        flow.__dict__["_kept_knots"] = _Knots.of(*leaves[2:])   # as _knots keeps one (frozen dataclass)
        return flow, sources, leaves

    def select(self, index) -> "SplineFlow":
        return SplineFlow(*(t[:, :, index] for t in self._tensors()))

    def to(self, dtype: torch.dtype) -> "SplineFlow":
        if self.loc.dtype == dtype:
            return self
        return SplineFlow(*(t.to(dtype) for t in self._tensors()))

    def _tensors(self):
        return self.loc, self.scale, self.widths, self.heights, self.derivatives
