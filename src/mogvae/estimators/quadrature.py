"""Exact (quadrature) evaluation of a model with a latent of dimension <= 2.

Model marginal log p(y) = log int p(y|z) p(z) dz: trapezoid rule on a uniform
grid covering every prior component to +- `span` scales. For smooth, rapidly
decaying integrands the uniform trapezoid rule converges faster than any power
of the spacing, which is why the default decoder activation is smooth (SiLU).
The decoder is evaluated once on the grid and reused for every y. The grid
has an odd number of nodes so every other node forms a coarse grid of the
same rule: |fine - coarse| bounds the coarse error and so, conservatively, the
fine one.

ELBO over q: on the same grid (extended where q reaches beyond the prior), over
the window holding q's mass, at a stride set by the narrowest scale of q and of
the exact posterior; doubling the stride gives its error bound (see `integrate`).
Gauss-Hermite over each component of q (the tests' `reference.quadrature_elbo`) converges slowly on
the log of a mixture and is kept as the tests' independent rule.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..model.distributions import box, replicas_of
from ..model.grid import F64, MAX_LATENT, Grid, as_batch, latent_grid, trapezoid_log_weights  # noqa: F401 (re-exported)
from ..model.vae import VAE
from ..objectives.bounds import log_weights
from .base import Estimate, Estimator
from .local_rules import each_replica, narrow_prior_log_p, step_bound, step_cost, strata_elbo, zoom_log_p, zoom_log_p_2d

MAX_GRID_NODES = 250_000   # latent nodes per replica: the decoder on the grid and the 2-D ELBO terms stay ~1 GB
RULE_NODES = 16     # Gauss-Legendre nodes per smooth piece of a piecewise-smooth q (model.flows.SplineFlow.base_rule)
DEFAULT_TOLERANCE = 1e-4   # nats per point: eval.tolerance's default, which refinement aims at
KNOTTED_RULE_NODES = 8   # per piece where a prior's knots cut q's pieces too: ~10x more pieces, each narrower
KINKED_BOUND = 3.0   # the piecewise rule's error bound, in |fine - coarse|, where the prior has kinks (see there)


@torch.no_grad()
def _grid_terms(model: VAE, nodes: torch.Tensor):
    """Decoder mean, 1/sigma and log(p(z) / sigma sqrt(2 pi)) at every node [R, G, D],
    so that log p(y|z) p(z) = -0.5 ((y - mean) / sigma)^2 + offset."""
    z = nodes[:, :, None, :]                                   # [R, G, 1, D]
    mean = model.decoder.mean(z)[:, :, 0]                      # [R, G, Y], decoder evaluated once
    log_sigma = model.decoder.log_noise_as(F64)[:, 0]          # [R, 1, Y]
    log_prior = model.prior().to(F64).log_prob(z)[:, :, 0]     # [R, G]
    offset = log_prior - (log_sigma + 0.5 * math.log(2 * math.pi)).sum(-1)  # [R, G]
    return mean, torch.exp(-log_sigma), offset


def _log_terms(y: torch.Tensor, mean, inv_sigma, offset) -> torch.Tensor:
    """log p(y|z_g) p(z_g) for a chunk of y [R, n, Y] -> [R, G, n], computed in place."""
    if y.shape[-1] > 1:
        return _log_terms_wide(y, mean, inv_sigma, offset)
    t = mean[:, :, None, :] - y[:, None]                       # [R, G, n, Y]
    t.mul_(inv_sigma[:, :, None]).square_()
    t = t.sum(-1).mul_(-0.5)
    return t.add_(offset[:, :, None])


def _log_terms_wide(y: torch.Tensor, mean, inv_sigma, offset) -> torch.Tensor:
    """As _log_terms for Y > 1, without its [R, G, n, Y] intermediate (870 MB a chunk at Y = 30,
    whose fresh pages cost more than the arithmetic): |a - b|^2 = |a|^2 + |b|^2 - 2 a.b with
    a, b the mean and y scaled by 1/sigma, one batched product. In float64 the cancellation
    costs about 1e-16 of |a|^2, far below the quadrature's error bound."""
    a, b = mean * inv_sigma, y * inv_sigma                      # [R, G, Y], [R, n, Y]
    t = torch.baddbmm((a * a).sum(-1, keepdim=True), a, b.transpose(1, 2), alpha=-2.0)   # [R, G, n]
    t.add_((b * b).sum(-1)[:, None]).clamp_(min=0.0).mul_(-0.5)
    return t.add_(offset[:, :, None])


@torch.no_grad()
def integrate(model: VAE, y, grid: Grid, elbo: bool = True, budget: int = 4_000_000,
              elbo_chunk: int = 128, elbo_budget: int = 16_000_000, q=None, progress=None) -> "Integrals":
    """log p(y) and, if `elbo`, the ELBO of every point by the fine and the coarse
    rule on one grid: the decoder is evaluated once, and the gap log p - ELBO is
    KL(q(z|y) || p(z|y)) computed on the same nodes. `q` (batch over y, [R, 1, N, K, D])
    replaces the encoder's posterior in the ELBO (the gap decomposition's optimized q).
    q is read through the latent-distribution protocol only (model/distributions.py).
    `progress(points done)` is called after each chunk (a 2-D grid takes minutes: 401^2 nodes
    and q's strata for 359 points x 10 replicas took about 20 minutes on digits)."""
    mean, inv_sigma, offset = _grid_terms(model, grid.nodes)
    R, G = grid.log_w.shape
    y = as_batch(y, R, grid.nodes.device)
    order = torch.argsort(y[0, :, 0])          # sorted y: a chunk's points have like posteriors (strides)
    y = y[:, order]
    if q is not None:
        q = q.select(order).to(F64)
    chunk = max(1, budget // (R * G))          # keeps the [R, G, n] terms a few MB
    outer = _outer_nodes(grid)
    parts: dict[str, list] = {k: [] for k in Integrals.__dataclass_fields__}
    for s in range(0, y.shape[1], chunk):
        yc = y[:, s:s + chunk]
        terms = _log_terms(yc, mean, inv_sigma, offset)                     # log p(y|z) p(z): [R, G, n]
        log_p = torch.logsumexp(terms[:, grid.core] + grid.log_w[:, grid.core, None], dim=1)
        parts["log_p"].append(log_p)
        parts["log_p_coarse"].append(torch.logsumexp(terms[:, grid.coarse] + grid.log_w_coarse[:, :, None], 1))
        parts["edge_mass"].append(torch.exp(torch.logsumexp(terms[:, outer] + grid.log_w[:, outer, None], 1) - log_p))
        # ELBO in sub-chunks of 128 sorted points (measured best, 0.4-0.6 s per model; each point has its own window)
        for e in range(0, yc.shape[1] if elbo else 0, elbo_chunk):
            sub = slice(e, e + elbo_chunk)
            q_sub = None if q is None else q.select(slice(s + e, s + min(e + elbo_chunk, yc.shape[1])))
            _elbo_chunk(model, yc[:, sub], grid, terms[:, :, sub], log_p[:, sub], parts, elbo_budget, q_sub)
        if progress:
            progress(min(s + chunk, y.shape[1]))
    out = {k: torch.cat(v, 1) if v else None for k, v in parts.items()}
    inverse = torch.argsort(order)
    return Integrals(**{k: v[:, inverse] if v is not None else None for k, v in out.items()})


def _elbo_chunk(model: VAE, y: torch.Tensor, grid: Grid, terms: torch.Tensor, log_p: torch.Tensor,
                parts: dict, budget: int, q=None, span: float = 10.0, per_scale: float = 4.0):
    """E_q[log p(y|z) p(z) - log q(z|y)] on the grid, for a chunk of sorted y.

    The cost is K mixture terms per node, so in 1-D only the window holding q's
    mass (+- `span` scales of every component) is used, at a stride that still
    puts `per_scale` nodes within q's and the prior's resolution (their narrowest
    scale) and the exact
    posterior (the trapezoid rule's error on a Gaussian of scale s with spacing
    h is ~2 exp(-2 pi^2 s^2 / h^2): 1e-137 at 4 nodes per scale). The coarse
    rule doubles the stride; |fine - coarse| is the reported error. Points are
    taken a few at a time, one replica at a time, so that the [nodes, points, K]
    terms stay within `budget` elements, however wide the window (memory is bounded;
    the result does not depend on the split: every point's sum is its own). In 2-D the nodes
    follow each stratum of q instead (stratum_trapezoid_elbo)."""
    q = model.posterior(y).to(F64) if q is None else q
    if q.base_rule(1) is not None:
        return _piecewise_elbo_chunk(model, y, q, parts)
    if len(grid.axes) > 1:
        return stratum_trapezoid_elbo(model, y, q, parts)
    axis = grid.axes[0]
    h = axis[:, 1] - axis[:, 0]                                         # [R]
    core = grid.core
    mass = torch.exp(terms[:, core] + grid.log_w[:, core, None] - log_p[:, None])   # posterior mass per node
    strides = _strides(model, q, mass, h, per_scale)                    # [n], per point
    n = y.shape[1]
    out = {key: torch.empty(y.shape[0], n, dtype=F64) for key in ("elbo", "elbo_coarse", "q_mass", "elbo_steps")}
    for stride in strides.unique().tolist():
        points = torch.nonzero(strides == stride)[:, 0]
        _elbo_at_stride(grid, q.select(points), terms[:, :, points], int(stride), span, budget,
                        {key: (value, points) for key, value in out.items()})
    for key, value in out.items():
        parts[key].append(value)


def _strides(model: VAE, q, mass: torch.Tensor, h: torch.Tensor, per_scale: float) -> torch.Tensor:
    """Each point's stride over the grid's nodes [n]: the largest power of two that keeps
    `per_scale` nodes within its narrowest scale (of its q, of the prior, of its exact posterior;
    the smallest over replicas). A point's own scales alone set it, so its ELBO does not depend
    on the points evaluated beside it (issue 21: it did, by up to 2.6e-6 nats)."""
    prior = model.prior().to(F64)        # a prior with kinks (a VampPrior of flows) sets a stride too
    scale = torch.minimum(torch.minimum(q.resolution().amin(0), _posterior_scale(mass, h).amin(0)),
                          prior.resolution().min())                     # [n]
    raw = (scale / (per_scale * h.max())).clamp(min=1.0)
    return torch.exp2(torch.floor(torch.log2(raw))).long()


def _elbo_at_stride(grid: Grid, q, terms: torch.Tensor, stride: int, span: float, budget: int, out: dict) -> None:
    """The ELBO by the fine (every `stride`-th node) and the coarse (every 2 `stride`-th) rule of
    points sharing a stride, each point and replica over its own window: the grid's multiples of the
    stride (of twice it, for the coarse rule) that hold its q's mass (_own_windows). A point's nodes
    are its own whichever points are evaluated beside it. (The window was the union over the chunk's
    points and replicas: on a D = 20 mixture of the dimension study 5.2x the nodes of a point's own,
    where q is ~0, and 89% of its evaluation's time.)"""
    axis = grid.axes[0]                                                  # [R, G]
    first, stop = _own_windows(axis, q, stride, span)                   # [R, n] each
    for r in range(axis.shape[0]):
        q_r = replicas_of(q, slice(r, r + 1))
        for sub in _by_window_length((stop[r] - first[r] + stride - 1) // stride, q.strata, budget):
            qs = q_r.select(sub)
            for suffix, spacing in (("", stride), ("_coarse", 2 * stride)):
                z, t, inside = _gathered_window(axis[r], terms[r, :, sub], first[r, sub], stop[r, sub], spacing)
                w = (axis[r, 1] - axis[r, 0]) * spacing
                q_dens = qs.density(z[None, ..., None])[0]                  # [L, m]
                positive = q_dens > 0
                log_q = torch.log(torch.where(positive, q_dens, torch.ones_like(q_dens)))
                integrand = torch.where(positive & inside, q_dens * (t - log_q), torch.zeros_like(q_dens))
                _put(out["elbo" + suffix], (integrand * w).sum(0), r, sub)
                if suffix == "":
                    mass = torch.where(inside, q_dens * w, torch.zeros_like(q_dens))
                    _put(out["q_mass"], mass.sum(0), r, sub)
                    # a decoder step between two nodes (local_rules.step_bound), on the four nodes i .. i + 3 of
                    # a point's own window only: its padding repeats its last node, which would read as a step
                    steps = step_cost(t - log_q, mass, 0)                   # [L - 3, m]
                    _put(out["elbo_steps"], torch.where(inside[3:], steps, torch.zeros_like(steps)).sum(0), r, sub)


def _own_windows(axis: torch.Tensor, q, stride: int, span: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's window per replica on the 1-D grid `axis` [R, G], [R, n] each: its first node, a
    multiple of 2 `stride` (so that the coarse rule's nodes are every other one of the fine rule's),
    and the node past its last, which lies within +- `span` scales of every component of its q."""
    h, G = (axis[:, 1] - axis[:, 0])[:, None], axis.shape[1]
    lo, hi = (edge[..., 0] for edge in q.reach(span))                   # [R, n]
    # in floating point until clamped to the grid: a q with a non-finite reach (a diverged replica's)
    # gets the whole grid, so that its ELBO is what its density makes it (NaN), not an empty window's 0
    first = ((lo - axis[:, :1]) / h).floor().nan_to_num(nan=0.0).clamp(0, G - 1).long() // (2 * stride) * (2 * stride)
    stop = (((hi - axis[:, :1]) / h).ceil() + 1).nan_to_num(nan=float(G)).clamp(0, G).long()
    return first, torch.maximum(stop, first)


def _by_window_length(length: torch.Tensor, per_node: int, budget: int):
    """The points' indices in groups of similar window length (`length` [n], in nodes), each group's
    longest window x its size x `per_node` within `budget` elements: a group pads every window to its
    longest, and windows range from tens of nodes to thousands (a mixture's widest component)."""
    order = torch.argsort(length, stable=True)
    s, n = 0, len(order)
    while s < n:
        m = max(1, budget // (per_node * max(1, int(length[order[s]]))))
        while m > 1 and int(length[order[min(n, s + m) - 1]]) * m * per_node > budget:
            m = max(1, budget // (per_node * max(1, int(length[order[min(n, s + m) - 1]]))))
        yield order[s:s + m]
        s += m


def _gathered_window(axis: torch.Tensor, terms: torch.Tensor, first: torch.Tensor, stop: torch.Tensor,
                     spacing: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One replica's nodes first, first + spacing, ... before stop of each point's window (axis [G],
    terms [G, m], first and stop [m]), gathered: z, terms and whether the node is the point's, [L, m]
    each, L the most nodes of the m windows. Past a point's window (padding, which no sum may read) z
    and the term repeat its last node's."""
    last = (stop - first - 1).clamp(min=0) // spacing                   # [m]: the last node's offset
    j = torch.arange(int(last.max()) + 1, device=axis.device)[:, None]  # [L, 1]
    index = first + spacing * torch.minimum(j, last)                     # [L, m]
    return axis[index], torch.gather(terms, 0, index), (j <= last) & (stop > first)


def _put(target: tuple, values: torch.Tensor, replica: int, sub: torch.Tensor) -> None:
    """Write a group's values [m] of one replica into the chunk's result at its points' places."""
    array, points = target
    array[replica, points[sub]] = values


def _piecewise_elbo_chunk(model: VAE, y: torch.Tensor, q, parts: dict, budget: int = 16_000_000) -> None:
    """The ELBO of a q that is only piecewise smooth (a spline flow), by its own rule
    over the standard-normal draws (`base_rule`): Gauss-Legendre on each piece, with
    RULE_NODES nodes per piece for the value and half as many for the error bound.
    On a normal or mixture prior the integrand is smooth on each piece, and the rule
    matched a 400,001-node trapezoid reference to 2e-6 nats (the float32 decoder).
    A prior with knots of its own (a VampPrior of flows) has them cut q's pieces too,
    so that the integrand is smooth on every piece again. (Before, its knots fell
    inside q's pieces: the 16-node rule was off by up to 3e-5 nats, |16 - 8| fell
    short of that by up to 1.5x, and the bound was moved out to three times the
    difference, KINKED_BOUND, which flagged every such replica at 1e-4.) A kinked
    prior that cannot say where its knots are keeps KINKED_BOUND. Points go a few at a
    time, so that the prior's densities at every node (R x nodes x points x its strata)
    stay within `budget` elements, however many knots cut the pieces."""
    prior = model.prior().to(F64)
    knots = None if prior.smooth else prior.knots()
    breaks = None if knots is None else knots.reshape(knots.shape[0], -1)
    n = RULE_NODES if breaks is None else KNOTTED_RULE_NODES
    own = q.knots()
    pieces = 2 + (1 if own is None else own.shape[-1]) + (0 if breaks is None else breaks.shape[1])
    step = max(1, budget // (y.shape[0] * pieces * n * prior.strata))
    values: dict[str, list] = {"elbo": [], "elbo_coarse": [], "q_mass": []}
    for s in range(0, y.shape[1], step):
        qs, ys = q.select(slice(s, s + step)), y[:, s:s + step]
        rule = qs.base_rule(n, breaks=breaks)
        fine, coarse = (rule_elbo(model, ys, qs, r) for r in (rule, qs.base_rule(n // 2, breaks=breaks)))
        if not prior.smooth and knots is None:
            coarse = fine + KINKED_BOUND * (coarse - fine)
        for key, value in zip(values, (fine, coarse, (rule[1] * qs.stratum_weights()).sum((1, 2)))):
            values[key].append(value)
    for key, value in values.items():
        parts[key].append(torch.cat(value, 1))


STRATUM_SPAN = 8.0          # the 2-D ELBO's rule per stratum: eps in [-8, 8]^2,
STRATUM_NODES = (61, 41)    # 61^2 nodes, and 41^2 for the error bound. Measured on trained 2-D models (15
                            # points x 10 replicas): 61 nodes within 1e-6 of a 401^2 grid that resolved q;
                            # |61 - 41| up to 1.5e-4 on diabetes, 1.6e-6 on breast cancer; |61 - 21| 3.5e-3


def normal_trapezoid(nodes: int, span: float, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The trapezoid rule over eps in [-span, span]^dim weighted by N(eps; 0, I): (eps [J, dim],
    weights [J]). The weights sum to 1 less the mass beyond +-span (2e-15 per axis at 8); on a
    Gaussian times a smooth function its error falls like exp(-2 pi^2 / h^2), h the spacing."""
    t = torch.linspace(-span, span, nodes, dtype=F64)
    eps = torch.stack(torch.meshgrid(*[t] * dim, indexing="ij"), -1).reshape(-1, dim)
    h = float(t[1] - t[0])
    return eps, torch.exp(-0.5 * (eps * eps).sum(-1)) * (h / math.sqrt(2 * math.pi)) ** dim


def stratum_trapezoid_elbo(model: VAE, y: torch.Tensor, q, parts: dict, nodes: tuple[int, int] = STRATUM_NODES,
                           span: float = STRATUM_SPAN, budget: int = 250_000) -> None:
    """The ELBO of a smooth q in 2-D, by the trapezoid rule over each stratum's standard-normal
    draws: the nodes follow q, however narrow its components (a uniform grid over the prior did
    not resolve them: up to 11 nats between its fine and coarse rules on breast cancer with 401^2
    nodes). The second, coarser rule gives the error bound. Points go a few at a time, so that
    R x nodes x K x points stays within `budget`."""
    R, B, K, D = y.shape[0], y.shape[1], q.strata, model.latent_dim
    for suffix, n in zip(("", "_coarse"), nodes):
        eps, w = normal_trapezoid(n, span, D)
        J, values = len(w), []
        step = max(1, budget // (R * J * K))
        for s in range(0, B, step):
            b = min(step, B - s)
            log_w, pi = log_weights(model, y[:, s:s + b], eps[None, :, None, None, :].expand(R, J, K, b, D),
                                    q.select(slice(s, s + b)))                  # [R, J, K, b], [R, 1, K, b]
            values.append((log_w * pi * w[None, :, None, None]).sum((1, 2)))
            if suffix == "":
                parts["q_mass"].append(w.sum() * pi.sum((1, 2)))
                parts.setdefault("elbo_steps", []).append(step_bound(log_w, pi, w, n, D))
        parts["elbo" + suffix].append(torch.cat(values, 1))


def rule_elbo(model: VAE, y: torch.Tensor, q, rule) -> torch.Tensor:
    """The ELBO by a rule over each stratum's standard-normal draws, (eps, weights): [R, B], each point's
    bitwise the same in any batch (node_sum)."""
    eps, w = rule
    log_w, pi = log_weights(model, y, eps, q)                              # [R, J, K, B]
    return node_sum((log_w * pi * w).flatten(1, 2))


def node_sum(terms: torch.Tensor) -> torch.Tensor:
    """terms [R, J, B] summed over the nodes J, pairwise by element-wise additions: [R, B]. A reduction
    over J (torch.sum) rounds differently with the number of points B beside it (1e-14 measured); the
    gap search's L-BFGS amplified that about tenfold per step, so a point's ELBO* depended on its batch.
    Here each point's additions are the same whatever B, the threads or the other points."""
    while terms.shape[1] > 1:
        half = terms.shape[1] // 2
        paired = terms[:, :half] + terms[:, half:2 * half]
        terms = torch.cat([paired, terms[:, 2 * half:]], 1) if terms.shape[1] % 2 else paired
    return terms[:, 0]


def _posterior_scale(mass: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The exact posterior's width from its mass per node [R, G, n] on a grid of
    spacing h [R]: [R, n]. Not its standard deviation, which a bimodal posterior
    inflates to the distance between its modes, but h / (2 sqrt(pi) sum_g p_g^2):
    a Gaussian's sigma, and for m well-separated equal modes m times their sigma
    (a safe resolution scale)."""
    return h[:, None] / (2 * math.sqrt(math.pi) * (mass * mass).sum(1))


@dataclass(frozen=True)
class Integrals:
    """Per replica and point, [R, N]: log p(y) and the ELBO by the fine and the
    coarse rule (|fine - coarse| bounds the error); the posterior mass in the
    grid's outer 2% (near 1e-30 when the grid covers the posterior, large when
    it truncates it); and the mass of q(z|y) on the grid (1 when q is covered)."""
    log_p: torch.Tensor
    log_p_coarse: torch.Tensor
    edge_mass: torch.Tensor
    elbo: torch.Tensor | None = None
    elbo_coarse: torch.Tensor | None = None
    q_mass: torch.Tensor | None = None
    window: torch.Tensor | None = None     # [R, N, 2]: each point's window of log p in 1-D (follow_posteriors)
    elbo_steps: torch.Tensor | None = None  # [R, N]: what steps of log w between the ELBO's nodes may cost


TRUNCATION = 1e-9   # posterior mass in a window's outer 2% above which a point's window follows its posterior
WIDENINGS = 8       # at most this many widenings of one point's window
EDGE = 0.02         # the outer fraction of a window on either side whose mass is watched (as _outer_nodes)


@torch.no_grad()
def follow_posteriors(model: VAE, y, grid: Grid, exact: Integrals, size: int, span: float,
                      max_nodes: int = 20_001) -> Integrals:
    """`exact` with log p(y) integrated again, on a window of its own, for each point whose posterior
    reaches the edge of the prior's window (mass above TRUNCATION in its outer 2%, on some replica):
    the window, first the prior's reach to +- `span` scales at the spacing of `size` nodes over it (as
    `grid`'s core, but independent of the other points), is widened by its own width on each side that still holds
    that mass, until neither does, or WIDENINGS or `max_nodes` is reached. The mass left at the edge
    is kept in `edge_mass`, and enters the point's error bound (`log_p_bound`): a window that cut off
    part of the posterior has a bound that says so (issue 21: a point's log p moved 16x its bound when
    integrated over a wider window). A point's window depends on that point alone. 1-D latents only;
    a 2-D grid is returned as it is (its edge mass enters its bound all the same)."""
    if len(grid.axes) > 1:
        return exact
    y = as_batch(y, grid.log_w.shape[0], grid.nodes.device)
    p_lo, p_hi = (b[:, 0] for b in box(*model.prior().to(F64).reach(span)))
    window = torch.stack([p_lo, p_hi], -1)[:, None].repeat(1, y.shape[1], 1)       # [R, N, 2]
    todo = torch.nonzero(exact.edge_mass.amax(0) > TRUNCATION)[:, 0].tolist()
    h = (p_hi - p_lo) / (size - 1)
    log_p, coarse, edge = exact.log_p.clone(), exact.log_p_coarse.clone(), exact.edge_mass.clone()
    for i in todo:
        point, lo, hi = y[:, i:i + 1], p_lo, p_hi
        *_, left, right = _window_log_p(model, point, lo, hi, h)       # which sides of the prior's window hold mass
        for _ in range(WIDENINGS):
            width = hi - lo
            wider = (torch.where(left > TRUNCATION, lo - width, lo), torch.where(right > TRUNCATION, hi + width, hi))
            result = _window_log_p(model, point, *wider, h, max_nodes)
            if result is None:          # the window would outgrow max_nodes: keep the last one and its edge mass
                break
            (lo, hi), (log_p[:, i], coarse[:, i], left, right) = wider, result
            edge[:, i] = left + right
            window[:, i] = torch.stack([lo, hi], -1)
            if not bool((edge[:, i] > TRUNCATION).any()):
                break
    return replace(exact, log_p=log_p, log_p_coarse=coarse, edge_mass=edge, window=window)


def _window_nodes(lo: torch.Tensor, hi: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """An odd number n of uniform nodes over [lo, hi] per replica, at most the spacing h: ([R, n, 1], spacing [R], n)."""
    n = int(((hi - lo) / h).max().ceil()) + 1
    n += 1 - n % 2
    t = torch.linspace(0, 1, n, dtype=F64, device=lo.device)
    return (lo[:, None] + (hi - lo)[:, None] * t)[..., None], (hi - lo) / (n - 1), n


def _window_log_p(model: VAE, y: torch.Tensor, lo, hi, h, max_nodes: float = math.inf):
    """log p(y) of one point on the window [lo, hi] by the fine and the coarse (every other node)
    trapezoid rule, and the posterior mass in the window's outer EDGE on its left and on its right
    side, [R] each; None beyond max_nodes."""
    nodes, spacing, n = _window_nodes(lo, hi, h)
    if n > max_nodes:
        return None
    terms = log_joint(model, y, nodes)[..., 0]                                          # [R, n]
    weighted = terms + trapezoid_log_weights(spacing, n)
    fine = torch.logsumexp(weighted, 1)
    coarse = torch.logsumexp(terms[:, ::2] + trapezoid_log_weights(2 * spacing, (n + 1) // 2), 1)
    k = max(1, int(EDGE * n))
    return (fine, coarse, torch.exp(torch.logsumexp(weighted[:, :k], 1) - fine),
            torch.exp(torch.logsumexp(weighted[:, -k:], 1) - fine))


def log_p_bound(exact: Integrals, followed: bool = True) -> torch.Tensor:
    """Each point's error bound on log p, [R, N]: the rule's |fine - coarse|, or the posterior mass
    left in the window's outer 2% where that is larger. A 1-D window that `follow_posteriors` could not
    widen until that mass was below TRUNCATION holds no bound at all (the posterior goes on beyond
    it, by an unknown amount): inf, which flags the replica. On a 2-D grid (not followed) the edge mass
    is an estimate of what the grid cut off, not a bound (issue 21: 2-D windows per point are to come)."""
    bound = torch.maximum((exact.log_p - exact.log_p_coarse).abs(), exact.edge_mass)
    if followed:
        bound = torch.where(exact.edge_mass > TRUNCATION, torch.full_like(bound, math.inf), bound)
    return bound


def log_marginal(model: VAE, y, grid: Grid) -> Integrals:
    """log p(y) only (no ELBO): see `integrate`."""
    return integrate(model, y, grid, elbo=False)


def _outer_nodes(grid: Grid, fraction: float = 0.02) -> torch.Tensor:
    """Indices of the outer `fraction` of the core on either side (of each axis)."""
    if len(grid.axes) == 1:
        start, stop, _ = grid.core.indices(grid.axes[0].shape[1])
        k = max(1, int(fraction * (stop - start)))
        return torch.cat([torch.arange(start, start + k), torch.arange(stop - k, stop)])
    n = grid.axes[0].shape[1]
    k = max(1, int(fraction * n))
    idx = torch.arange(n)
    edge_1d = (idx < k) | (idx >= n - k)
    return (edge_1d[:, None] | edge_1d[None, :]).reshape(-1).nonzero().flatten()


@torch.no_grad()
def log_joint(model: VAE, y, nodes: torch.Tensor) -> torch.Tensor:
    """log p(y|z) + log p(z) for every node z [R, G, D] and every y [N]: [R, G, N]."""
    mean, inv_sigma, offset = _grid_terms(model, nodes)
    return _log_terms(as_batch(y, nodes.shape[0], nodes.device), mean, inv_sigma, offset)


@torch.no_grad()
def posterior_on_grid(model: VAE, y, grid: Grid) -> torch.Tensor:
    """The model's exact posterior density p(z|y) at the grid nodes: [R, N, G]."""
    terms = log_joint(model, y, grid.nodes)
    log_p = torch.logsumexp(terms + grid.log_w[:, :, None], dim=1, keepdim=True)
    return torch.exp(terms - log_p).transpose(1, 2)


@functools.lru_cache(maxsize=16)
def hermite_rule(n: int, dim: int, dtype=torch.float64):
    """Nodes [J, D] and weights [J] for E_{N(0, I_D)}[g] with J = n^D (computed once: the gap
    search asks for them on every step; callers must not modify them in place)."""
    x, w = np.polynomial.hermite.hermgauss(n)
    x, w = x * math.sqrt(2.0), w / math.sqrt(math.pi)
    grids = np.meshgrid(*([x] * dim), indexing="ij")
    nodes = np.stack([g.reshape(-1) for g in grids], -1)
    weights = np.prod(np.stack(np.meshgrid(*([w] * dim), indexing="ij"), -1).reshape(-1, dim), -1)
    return torch.as_tensor(nodes, dtype=dtype), torch.as_tensor(weights, dtype=dtype)


def quadrature_terms(model: VAE, y_test, y_grid, config, seeds=None, phases=None, elbo: bool = True) -> dict:
    """Evaluation's terms on the latent grid: log p and (if `elbo`; else NaN) the ELBO per point, the
    model's density on y_grid, and the rule's error bounds (the standard error is NaN: the bound is the
    error). In 1-D, each point whose bound misses config.tolerance is refined (local_rules.py, then
    adaptive.py, whose panels report their progress to `phases`)."""
    grid = latent_grid(model, config.grid_size, config.grid_span, y=y_test)
    n = len(y_test)
    on_grid = integrate(model, y_test, grid, elbo=elbo,
                        progress=phases and (lambda done: phases.step(done, n, "points")))
    exact = follow_posteriors(model, y_test, grid, on_grid, config.grid_size, config.grid_span)
    nan = np.full(len(exact.log_p), math.nan)
    log_p, bound = _refined_log_p(model, y_test, grid, exact, config.tolerance, phases)
    if elbo:
        values, elbo_bound = _refined_elbo(model, y_test, grid, exact, config.tolerance, phases=phases)
    else:
        values = elbo_bound = torch.full_like(log_p, math.nan)
    density = None if y_grid is None else torch.exp(log_marginal(model, y_grid, grid).log_p).numpy()
    return {"log_p": log_p, "elbo": values, "grid": grid, "model_density": density,
            "log_p_error": bound.numpy(), "elbo_error": elbo_bound.numpy(),
            "quadrature_error": bound.amax(1).numpy(),
            "grid_edge_mass": exact.edge_mass.amax(1).numpy(),
            "elbo_quadrature_error": elbo_bound.amax(1).numpy(),
            "test_log_likelihood_stderr": nan, "test_elbo_stderr": nan}


def _refined_log_p(model: VAE, y, grid: Grid, exact: Integrals, tolerance: float | None, phases=None):
    """log p and its bound [R, N], 1-D points whose bound misses `tolerance` refined (adaptive.refine_log_p;
    the mass the window left out still enters the bound). Under a prior with a component narrower than
    the grid's spacing the grid gives no bound at any point (its two rules sample the component at a
    node or two and can agree while both are off: measured, |fine - coarse| 4.4e-7 against an error of
    4.6e-7 at a scale of a quarter of the spacing), so every point of that replica is refined. (At a
    scale of one spacing or more the fine rule's error on a Gaussian is below 2 exp(-2 pi^2) = 5e-9 of
    its mass, and the coarse rule's, at twice the spacing, is the larger: |fine - coarse| bounds it.)"""
    one_d = len(grid.axes) == 1
    bound = log_p_bound(exact, followed=one_d)
    if tolerance is None:
        return exact.log_p, bound
    if not one_d:                        # 2-D: a box of its own for each point that misses the tolerance
        bound = torch.where(_unresolved_prior(model, grid)[:, None], torch.full_like(bound, math.inf), bound)
        miss = bound > tolerance
        if not bool(miss.any()):
            return exact.log_p, bound
        return _keep_smaller(exact.log_p, bound, *zoom_log_p_2d(model, y, grid, miss, tolerance), miss)
    from .adaptive import refine_log_p
    held = exact.edge_mass <= TRUNCATION                                               # [R, N]
    unresolved = _unresolved_prior(model, grid)
    log_p = exact.log_p
    bound = torch.where(unresolved[:, None] & held, torch.full_like(bound, math.inf), bound)
    if bool(unresolved.any()):           # the narrow components by rules of their own, every point at once
        split = narrow_prior_log_p(model, y, grid, _spacing(grid))
        if split is not None:
            log_p, bound = _keep_smaller(log_p, bound, *split, unresolved[:, None] & held)
    miss = (bound > tolerance) & held                       # resolved points keep theirs
    if bool(miss.any()):                 # a posterior narrower than the grid: a window of its own, many points at once
        log_p, bound = _keep_smaller(log_p, bound, *zoom_log_p(model, y, grid, miss, tolerance), miss)
    log_p, refined, _ = refine_log_p(model, y, log_p, bound, exact.window, held, grid, tolerance, phases=phases)
    return log_p, torch.maximum(refined, exact.edge_mass)


def _spacing(grid: Grid) -> torch.Tensor:
    """A grid's spacing per replica [R] (in 2-D, the smaller of its two)."""
    return torch.stack([a[:, 1] - a[:, 0] for a in grid.axes]).amin(0)


def _unresolved_prior(model: VAE, grid: Grid) -> torch.Tensor:
    """Per replica [R]: the prior is smooth (a mixture of Gaussians, whose narrow component the grid can
    alias) and has a component narrower than the grid's spacing (in 2-D, along either axis). (A piecewise-smooth prior, a
    flow's, converges as h^2 between its knots, where |fine - coarse| does bound the error.)"""
    prior = model.prior().to(F64)
    return prior.resolution()[:, 0] < _spacing(grid) if prior.smooth else torch.zeros(len(grid.axes[0]), dtype=torch.bool)


def _refined_elbo(model: VAE, y, grid: Grid, exact: Integrals, tolerance: float | None, q=None, phases=None):
    """The ELBO and its bound [R, N] (|fine - coarse|, or q's mass missing from the window where larger), 1-D
    points whose bound misses `tolerance` refined on panels that follow q (adaptive.refine_elbo). A point
    whose q (or prior) has a component narrower than the grid's spacing has no bound on the grid: both
    rules then sample the component at a node or two, and can agree while both are off (measured: 50
    nats off, with |fine - coarse| 0.33, for a component of scale 1e-3 at spacing 0.01)."""
    bound = torch.maximum((exact.elbo - exact.elbo_coarse).abs(), (1 - exact.q_mass).abs())
    if exact.elbo_steps is not None:     # what steps of log w between the ELBO's nodes may cost (step_bound)
        bound = bound + exact.elbo_steps
    if tolerance is None:
        return exact.elbo, bound
    from .adaptive import refine_elbo
    q_all = (model.posterior(as_batch(y, bound.shape[0], bound.device)) if q is None else q).to(F64)
    if len(grid.axes) > 1:               # 2-D: the rule on q's strata again, with 2x the nodes per axis
        if not q_all.smooth:
            return exact.elbo, bound
        elbo = exact.elbo
        for nodes in FINER_STRATA:
            elbo, bound = _strata_pass(model, y, q_all, elbo, bound, tolerance, nodes)
        return elbo, bound
    narrow_q = q_all.resolution() < _spacing(grid)[:, None] if q_all.base_rule(1) is None else False  # else: its own rule
    unresolved = narrow_q | _unresolved_prior(model, grid)[:, None]
    bound = torch.where(unresolved, torch.full_like(bound, math.inf), bound)
    elbo = exact.elbo
    if q_all.base_rule(1) is None:       # a smooth q: first a rule on each stratum, every point at once
        elbo, bound = _strata_pass(model, y, q_all, elbo, bound, tolerance)
    elbo, bound, _ = refine_elbo(model, y, elbo, bound, q_all, grid, tolerance, phases=phases)
    return elbo, bound


FINER_STRATA = ((121, 81),)   # 2-D: the strata's rule a point tries after (61, 41): 4x the nodes (about
                               # 0.4 GB a point at 10 components; 241^2 would need 1.5 GB)


def _strata_pass(model: VAE, y, q, elbo: torch.Tensor, bound: torch.Tensor, tolerance: float,
                 nodes: tuple[int, int] = STRATUM_NODES):
    """The points and replicas whose ELBO bound misses `tolerance`, by local_rules.strata_elbo (nodes that
    follow each component of q, `nodes` per axis), each replica alone (layers.replica_subset) on its own
    points, kept where its bound is the smaller."""
    from ..model.distributions import replicas_of
    miss = bound > tolerance
    if not bool(miss.any()):
        return elbo, bound
    new = each_replica(model, y, miss, miss.shape[1], lambda one, yc, row, part: strata_elbo(
        one, yc, replicas_of(q.select(part), row), one.prior().to(F64), nodes))
    return _keep_smaller(elbo, bound, *new, miss)


def _keep_smaller(values: torch.Tensor, bound: torch.Tensor, new_values: torch.Tensor, new_bound: torch.Tensor,
                  where: torch.Tensor):
    """The values and bounds [R, N] with the new ones taken where `where` holds and the new bound is smaller:
    a refinement only ever lowers a bound, and a point it did not try keeps its value bit for bit."""
    take = where & (new_bound < bound)
    return torch.where(take, new_values, values), torch.where(take, new_bound, bound)


def quadrature_log_likelihood(model: VAE, y, *, grid_size: int = 2001, grid_span: float = 8.0,
                              tolerance: float | None = DEFAULT_TOLERANCE, **_) -> Estimate:
    """log p(y) on the latent grid, each point's window following its posterior and, in 1-D, refined
    until its bound (log_p_bound) meets `tolerance` (None: the grid's rule alone)."""
    grid = latent_grid(model, grid_size, grid_span, y=y)
    exact = follow_posteriors(model, y, grid, integrate(model, y, grid, elbo=False), grid_size, grid_span)
    return Estimate(*_refined_log_p(model, y, grid, exact, tolerance), "quadrature")


QUADRATURE = Estimator("quadrature", exact=True, fits=lambda latent_dim, grid_size: latent_dim <= MAX_LATENT,
                       log_likelihood=quadrature_log_likelihood, evaluation_terms=quadrature_terms,
                       needs=f"latent_dim <= {MAX_LATENT}",
                       # "auto" takes it where the grid stays within evaluation's memory (asked by name, it runs larger)
                       affordable=lambda latent_dim, grid_size: grid_size ** latent_dim <= MAX_GRID_NODES)
