"""Adaptive refinement of a 1-D latent's exact numbers, point by point, until each meets
`eval.tolerance` (issue 21): only the points whose bound on the shared grid misses it (or
whose q the grid cannot resolve) are integrated again, so the work goes where it is needed.

One rule serves log p(y) = log int p(y|z) p(z) dz and the ELBO = int q(z) (log p(y, z) -
log q(z)) dz: Gauss-Legendre on panels of the point's own window. The panels' breaks are

- uniform over the window (PANELS of them),
- quantiles of the point's posterior mass on the shared grid (PANELS more, many where the
  posterior is narrow),
- each component of the prior and, for the ELBO, of q at its location +- 1, 2, 4, 8 of its
  scales (a component narrower than the grid's spacing gets panels of its own size; so does
  the bump a narrow component puts into log q under a wide one),
- the knots of a piecewise-smooth prior or q (a spline flow's, a VampPrior of flows'), where
  the rule on a panel would otherwise converge only as its derivatives' jumps allow.

Each panel has a 16-node rule and an 8-node one; the sum over panels of |16 - 8| bounds the
error (conservatively: it is the 8-node rule's error), relative to p(y) for log p. Panels whose
share misses the tolerance are halved, until the sum meets it or MAX_NODES is reached; the bound
that is left is reported, and a replica it leaves above the tolerance is flagged by its report.
A refined value replaces the grid's only where its bound is smaller.
"""
from __future__ import annotations

import functools

import torch

from ..model.distributions import box, gauss_legendre, replicas_of
from ..model.grid import F64, as_batch
from ..model.layers import replica_subset
from ..model.vae import VAE

PANELS = 32              # uniform panels over the window, and as many between posterior-mass quantiles
BREAKS = (-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0)   # each component's, in its own scales
MAX_NODES = 200_000      # latent nodes per point and replica, the two rules together: about 0.1 s per point
MAX_ROUNDS = 40          # halvings: 2^-40 of a window is below float64's resolution of its position
FINE, COARSE = 16, 8     # Gauss-Legendre nodes per panel for the value and for its error bound
Q_SPAN = 10.0            # the ELBO's window: q's components to +- 10 scales (as the grid's ELBO)


@functools.lru_cache(maxsize=4)
def _legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n-node Gauss-Legendre rule on [0, 1] as tensors, computed once (read only)."""
    x, w = gauss_legendre(n)
    return torch.as_tensor((x + 1) / 2, dtype=F64), torch.as_tensor(w / 2, dtype=F64)   # on [0, 1]


def _component_breaks(dist) -> torch.Tensor:
    """Each stratum (component) of a latent distribution with one batch element at its location
    +- BREAKS of its scales, and the knots of a piecewise-smooth one (a spline's): [R, m]."""
    eps = torch.tensor(BREAKS, dtype=F64)
    R, K = dist.stratum_weights().shape[0], dist.strata
    breaks = dist.stratified_rsample(eps[None, :, None, None, None].expand(R, -1, K, 1, 1)).reshape(R, -1)
    knots = dist.knots()
    return breaks if knots is None else torch.cat([breaks, knots.reshape(R, -1)], 1)


def _mass_quantiles(point: torch.Tensor, grid, grid_terms) -> torch.Tensor:
    """PANELS + 1 quantiles of the point's posterior mass on the shared 1-D grid: [R, PANELS + 1].
    `grid_terms`: the decoder on the grid (quadrature._grid_terms), computed once for every point."""
    from .quadrature import _log_terms
    mass = torch.softmax(_log_terms(point, *grid_terms)[..., 0] + grid.log_w, 1)           # [R, G]
    cdf = torch.cumsum(mass, 1)
    levels = torch.linspace(0, 1, PANELS + 1, dtype=F64).expand(len(cdf), -1).contiguous()
    index = torch.searchsorted(cdf.contiguous(), levels).clamp(max=grid.nodes.shape[1] - 1)
    return torch.gather(grid.nodes[..., 0], 1, index)


def _panels(integrand, lo: torch.Tensor, hi: torch.Tensor, breaks: list[torch.Tensor], tolerance: float,
            log: bool, max_nodes: int):
    """int_lo^hi of `integrand` (nodes [R, M, 1] -> values [R, M]; their logs where `log`) per replica
    [R], by adaptive Gauss-Legendre panels starting from PANELS uniform ones and `breaks` ([R, m] each,
    clipped to the window), and its error bound [R]: the value's own (a log where `log`, its error
    relative), and the bound. Each round evaluates only the halves of the panels it split (a panel's
    two rules are kept, not recomputed)."""
    t = torch.linspace(0, 1, PANELS + 1, dtype=F64)
    edges = torch.sort(torch.cat([lo + (hi - lo) * t, *(b.clamp(lo, hi) for b in breaks)], 1), 1).values
    a, width = edges[:, :-1], edges[:, 1:] - edges[:, :-1]                          # [R, P]
    fine, coarse = _panel_rules(integrand, a, width, log)
    for _ in range(MAX_ROUNDS):
        total, err = _panel_error(fine, coarse, log)
        if float(err.sum(1).max()) <= tolerance or 2 * a.shape[1] * (FINE + COARSE) > max_nodes:
            break
        split = (err > tolerance / (2 * err.shape[1])).any(0)                       # [P]: halve where a replica needs it
        if not bool(split.any()):          # nothing left to halve (a NaN compares false): more rounds change nothing
            break
        half = width[:, split] / 2
        halves = (torch.cat([a[:, split], a[:, split] + half], 1), torch.cat([half, half], 1))
        new_fine, new_coarse = _panel_rules(integrand, *halves, log)
        keep = ~split
        a, width = torch.cat([a[:, keep], halves[0]], 1), torch.cat([width[:, keep], halves[1]], 1)
        fine, coarse = torch.cat([fine[:, keep], new_fine], 1), torch.cat([coarse[:, keep], new_coarse], 1)
    total, err = _panel_error(fine, coarse, log)
    return total, err.sum(1)


def _panel_rules(integrand, a: torch.Tensor, width: torch.Tensor, log: bool):
    """Each panel's integral [R, P] by the FINE- and the COARSE-node Gauss-Legendre rule (logs where `log`)."""
    out = []
    for x, w in (_legendre(FINE), _legendre(COARSE)):
        values = integrand((a[:, :, None] + width[:, :, None] * x).reshape(len(a), -1, 1)).reshape(*a.shape, -1)
        if log:
            out.append(torch.logsumexp(values + torch.log(width.clamp_min(1e-300))[:, :, None] + torch.log(w), 2))
        else:
            out.append((values * w).sum(2) * width)
    return out


def _panel_error(fine: torch.Tensor, coarse: torch.Tensor, log: bool):
    """The integral [R] and each panel's share of its error bound [R, P] (relative to the integral where `log`)."""
    if log:
        total = torch.logsumexp(fine, 1)
        return total, (torch.exp(fine - total[:, None]) - torch.exp(coarse - total[:, None])).abs()
    return fine.sum(1), (fine - coarse).abs()


@torch.no_grad()
def refine_log_p(model: VAE, y, log_p: torch.Tensor, bound: torch.Tensor, windows: torch.Tensor, held: torch.Tensor,
                 grid, tolerance: float, max_nodes: int = MAX_NODES, phases=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """log p and its bound [R, N] with every point whose bound exceeds `tolerance` integrated again over
    its window `windows` [R, N, 2], on the replicas that miss it and whose window holds its posterior
    (`held` [R, N]: no rule on a window that cut the posterior off can help, and its bound stays). A
    point's bound only falls: where the adaptive rule's is not smaller, the grid's value stays. Returns
    (log_p, bound, points refined)."""
    from .quadrature import log_joint
    todo = _to_refine(bound, tolerance, held)
    if not todo:
        return log_p, bound, 0
    log_p, bound = log_p.clone(), bound.clone()
    for i, r, one, yi, breaks in _refinements(model, y, grid, todo, phases, "log p", tolerance):
        row = slice(r, r + 1)
        value, err = _panels(lambda z: log_joint(one, yi, z)[..., 0], windows[row, i, :1], windows[row, i, 1:],
                             breaks, tolerance, True, max_nodes)
        _keep_better(log_p, bound, r, i, value, err)
    return log_p, bound, len(todo)


@torch.no_grad()
def refine_elbo(model: VAE, y, elbo: torch.Tensor, bound: torch.Tensor, q, grid, tolerance: float,
                max_nodes: int = MAX_NODES, phases=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The ELBO and its bound [R, N] with every point whose bound exceeds `tolerance` integrated again,
    on the replicas that miss it, over its q's window (`q`: batch over y, or None for the encoder's). The
    bound adds the mass of q the panels miss. A piecewise-smooth q or prior (a spline flow's, a VampPrior
    of flows) puts its knots among the breaks. Returns (elbo, bound, points refined)."""
    from .quadrature import log_joint
    todo = _to_refine(bound, tolerance)
    if not todo:
        return elbo, bound, 0
    q = (model.posterior(as_batch(y, elbo.shape[0], elbo.device)) if q is None else q).to(F64)
    elbo, bound = elbo.clone(), bound.clone()
    for i, r, one, yi, breaks in _refinements(model, y, grid, todo, phases, "the ELBO", tolerance):
        qi = replicas_of(q.select(slice(i, i + 1)), slice(r, r + 1))
        lo, hi = box(*qi.reach(Q_SPAN))
        breaks = [*breaks, _component_breaks(qi)]

        def integrand(z, one=one, qi=qi, yi=yi):
            log_q = qi.log_prob(z[:, :, None, :])[..., 0]                             # [1, M]
            return torch.exp(log_q) * (log_joint(one, yi, z)[..., 0] - log_q)

        value, err = _panels(integrand, lo, hi, breaks, tolerance, False, max_nodes)
        mass, mass_err = _panels(lambda z: qi.density(z[:, :, None, :])[..., 0], lo, hi, breaks, tolerance,
                                 False, max_nodes)
        _keep_better(elbo, bound, r, i, value, err + (1 - mass).abs() + mass_err)     # q's mass beyond +-10 scales: ~1e-23
    return elbo, bound, len(todo)


def _refinements(model: VAE, y, grid, todo: list[tuple[int, list[int]]], phases, what: str, tolerance: float):
    """For each point i and replica r to refine: (i, r, that replica alone, its y [1, 1, Y], the breaks its
    panels share: the prior's components and the point's posterior-mass quantiles, [1, m] each). Each
    replica runs alone (layers.replica_subset), so a point's value does not depend on which others did.
    With `phases` (evaluate.Phases), the refinement is a phase of its own, with progress and an ETA."""
    from .quadrature import _grid_terms
    y = as_batch(y, grid.log_w.shape[0], grid.nodes.device)
    prior_breaks, grid_terms = _component_breaks(model.prior().to(F64)), _grid_terms(model, grid.nodes)
    alone: dict[int, VAE] = {}
    total = sum(len(needing) for _, needing in todo)
    if phases:
        phases.start(f"refining {what}", f"{what} of {total:,} point-replicas whose bound misses eval.tolerance = "
                                         f"{tolerance:g}, on panels, one at a time")
    done = 0
    for i, needing in todo:
        if phases:
            phases.step(done, total, "point-replicas")
        done += len(needing)
        point = y[:, i:i + 1]
        quantiles = _mass_quantiles(point, grid, grid_terms)
        for r in needing:
            if r not in alone:
                alone[r] = replica_subset(model, [r]).eval()
            row = slice(r, r + 1)
            yield i, r, alone[r], point[row], [prior_breaks[row], quantiles[row]]


def _to_refine(bound: torch.Tensor, tolerance: float, held: torch.Tensor | None = None) -> list[tuple[int, list[int]]]:
    """(point, the replicas whose bound there misses `tolerance` and, with `held`, whose window holds it)."""
    miss = (bound > tolerance) & ~torch.isnan(bound)
    if held is not None:
        miss &= held
    return [(int(i), torch.nonzero(miss[:, i])[:, 0].tolist()) for i in torch.nonzero(miss.any(0))[:, 0]]


def _keep_better(values: torch.Tensor, bound: torch.Tensor, r: int, i: int, value: torch.Tensor,
                 err: torch.Tensor) -> None:
    """Replica r's value and bound at point i replaced if the new bound ([1]) is smaller."""
    if float(err[0]) < float(bound[r, i]):
        values[r, i], bound[r, i] = value[0], err[0]
