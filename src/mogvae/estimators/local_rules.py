"""Rules that follow what the shared grid cannot resolve, many points at once (1-D and 2-D latents):
the step between the grid and the per-point panels of adaptive.py (1-D) (issue 21's refinement, made affordable).

A component narrower than the grid's spacing leaves the grid without a bound (quadrature._refined_*),
and the panels then refine every point one at a time: measured on a sigma = 0.01 mixture-prior run,
28 ms a point for log p and 34 ms for the ELBO, 977 s for 10,000 points at R = 10. Here the
integral over each such component is taken by the trapezoid rule on its own standard-normal draws
(quadrature.normal_trapezoid: 61 nodes over +-8 scales, 41 for the bound), whose nodes follow the
component however narrow it is, for all points in one batched pass:

- log p(y) = log [ int p(y|z) p_wide(z) dz  +  sum_{k narrow} pi_k E_{N(0,1)}[p(y | mu_k + s_k eps)] ]:
  the grid keeps the components it resolves (scale >= its spacing), each narrow one gets its rule;
- the ELBO = sum_k pi_k E_{N(0,1)}[log p(y, z) - log q(z)] at z = mu_k + s_k eps, over q's strata;
- log p(y) of a posterior narrower than the grid's spacing (a wide prior stretches a replica's grid:
  0.035 against a posterior width near 0.003 at sigma = 0.01) on a window of its own, the nodes where
  the grid saw its mass, ZOOM_NODES nodes across (zoom_log_p).

|fine - coarse| bounds a rule only where its integrand is smooth on the coarse rule's spacing (0.4 of
the stratum's scale), as one node per scale does on the grid. So a rule is trusted only where

- log p: the likelihood varies slowly over the component: s_k |f'(z)| / sigma <= LIKELIHOOD_SLOPE on
  its nodes (then exp(-(y - f)^2 / 2 sigma^2) has curvature at most that squared in eps, for any y);
- the ELBO: every feature of log p(z) and log q(z) (the prior's and q's narrowest components) is at
  least the coarse spacing in the widest stratum of q; and a step of log w between two fine nodes (a
  decoder f steep enough to make a step in log p(y|z) there, which both rules can alias alike: measured
  up to 2.3x beyond their |fine - coarse|) adds its size times the mass between those nodes to the
  bound (step_bound).

Elsewhere the bound stays inf, and the point goes on to the panels.
"""
from __future__ import annotations

import math

import torch

from ..model.grid import F64, as_batch
from ..model.mixtures import DiagMixture
from ..model.vae import VAE

NODES = (61, 41)            # trapezoid nodes over eps in [-SPAN, SPAN]: the value and its bound
SPAN = 8.0
COARSE_SPACING = 2 * SPAN / (NODES[1] - 1)    # 0.4 scales: the finest feature either rule must resolve
LIKELIHOOD_SLOPE = 1 / COARSE_SPACING         # s |f'| / sigma at most this: the likelihood's own width >= 0.4 s


@torch.no_grad()
def narrow_prior_log_p(model: VAE, y, grid, spacing: torch.Tensor, budget: int = 4_000_000):
    """log p(y) and its bound [R, N] with the prior split into the components the 1-D grid resolves
    (on its core, as `integrate`) and those narrower than its `spacing` [R] (each by its own rule);
    None where the prior is not a mixture of Gaussians. The bound is inf where the core's outer 2%, or a
    narrow component's outermost nodes (near +-8 of its scales), hold posterior mass (the mass goes on
    beyond them: a likelihood peaking 10 scales from a component passes the steepness guard, and a rule
    over +-8 scales misses half of it), and where the likelihood is too steep for a narrow component's
    rule (the panels then take those points)."""
    prior = model.prior().to(F64)
    if not isinstance(prior, DiagMixture):
        return None
    from .quadrature import TRUNCATION, _grid_terms, _log_terms, _outer_nodes, normal_trapezoid
    R = grid.log_w.shape[0]
    y = as_batch(y, R, grid.nodes.device)
    log_pi = torch.log_softmax(prior.logits[:, 0, 0], -1)                        # [R, K]
    loc, scale = prior.loc[:, 0, 0, :, 0], prior.scale[:, 0, 0, :, 0]           # [R, K]
    narrow = scale < spacing[:, None]
    mean, inv_sigma, offset = _grid_terms(model, grid.nodes)
    components = torch.distributions.Normal(loc[:, None], scale[:, None]).log_prob(grid.nodes) + log_pi[:, None]
    decoder_only = offset - prior.log_prob(grid.nodes[:, :, None, :])[:, :, 0]   # log p(y|z) without the prior
    wide = decoder_only + torch.logsumexp(components.masked_fill(narrow[:, None], -math.inf), -1)
    rules = []
    for n in NODES:
        eps, w = normal_trapezoid(n, SPAN, 1)                                    # [J, 1], [J]
        z = (loc[:, :, None] + scale[:, :, None] * eps[None, None, :, 0]).reshape(R, -1, 1)   # [R, K J, 1]
        m, inv, off = _grid_terms(model, z)
        off = off - prior.log_prob(z[:, :, None, :])[:, :, 0] + (log_pi[:, :, None] + torch.log(w)).reshape(R, -1)
        off = off.masked_fill(~narrow[:, :, None].expand(-1, -1, n).reshape(R, -1), -math.inf)
        rules.append((m, inv, off))
    steep = _too_steep(rules[0][0], inv_sigma, scale, narrow, NODES[0])          # [R]
    core, coarse = grid.core, grid.coarse
    chunk = max(1, budget // (R * grid.log_w.shape[1]))
    fine_parts, coarse_parts, edge_parts, outer = [], [], [], _outer_nodes(grid)
    for s in range(0, y.shape[1], chunk):
        yc = y[:, s:s + chunk]
        terms = _log_terms(yc, mean, inv_sigma, wide)                              # [R, G, n]
        on_grid = (torch.logsumexp(terms[:, core] + grid.log_w[:, core, None], 1),
                   torch.logsumexp(terms[:, coarse] + grid.log_w_coarse[:, :, None], 1))
        for (m, inv, off), grid_part, parts in zip(rules, on_grid, (fine_parts, coarse_parts)):
            own = _log_terms(yc, m, inv, off)                                       # [R, K J, n]
            parts.append(torch.logaddexp(grid_part, torch.logsumexp(own, 1)))
        ends = own.reshape(R, -1, NODES[1], own.shape[-1])[:, :, [0, 1, -2, -1]]   # each component's outer nodes
        edge_parts.append(torch.exp(torch.logaddexp(
            torch.logsumexp(terms[:, outer] + grid.log_w[:, outer, None], 1),
            torch.logsumexp(ends.flatten(1, 2), 1)) - fine_parts[-1]))
    fine, coarse_value, edge = (torch.cat(p, 1) for p in (fine_parts, coarse_parts, edge_parts))
    bound = torch.maximum((fine - coarse_value).abs(), edge)
    unbounded = steep[:, None] | (edge > TRUNCATION)      # a posterior beyond the core: its window is followed
    return fine, torch.where(unbounded, torch.full_like(bound, math.inf), bound)


def _too_steep(mean: torch.Tensor, inv_sigma: torch.Tensor, scale: torch.Tensor, narrow: torch.Tensor,
               n: int) -> torch.Tensor:
    """Per replica [R]: some narrow component's rule sees the likelihood change faster than its coarse
    spacing resolves, s_k |f'| / sigma > LIKELIHOOD_SLOPE (f' by differences between its nodes)."""
    R, K = scale.shape
    f = (mean * inv_sigma).reshape(R, K, n, -1)                                   # f / sigma on each rule
    step = 2 * SPAN / (n - 1)                                                     # in eps: s_k times this in z
    slope = ((f[:, :, 1:] - f[:, :, :-1]).norm(dim=-1) / step).amax(-1)          # s_k |f'| / sigma: [R, K]
    return ((slope > LIKELIHOOD_SLOPE) & narrow).any(1)


@torch.no_grad()
def strata_elbo(model: VAE, y: torch.Tensor, q, prior, nodes: tuple[int, int] = NODES) -> tuple[torch.Tensor, torch.Tensor]:
    """The ELBO of a smooth q [R, N] (y [R, N, Y]) by the trapezoid rule on each stratum's draws (`nodes`
    per axis over +-SPAN, and fewer for the bound), and its bound: |fine - coarse| plus q's mass beyond
    +-SPAN, inf where a feature of log p(z) or log q(z) is finer than the coarse rule's spacing in q's
    widest stratum; what steps of log w between the fine rule's nodes may cost (step_bound: a decoder
    steeper than them) is added. Any latent dimension (the rule is a product over axes: nodes^D per stratum)."""
    from .quadrature import stratum_trapezoid_elbo
    parts = {"elbo": [], "elbo_coarse": [], "q_mass": [], "elbo_steps": []}
    stratum_trapezoid_elbo(model, y, q, parts, nodes, SPAN)
    fine, coarse, mass, steps = (torch.cat(parts[k], 1) for k in ("elbo", "elbo_coarse", "q_mass", "elbo_steps"))
    bound = (fine - coarse).abs() + (1 - mass).abs() + steps
    finest = torch.minimum(q.resolution(), prior.resolution().amin())            # [R, N]
    resolved = finest >= 2 * SPAN / (nodes[1] - 1) * _widest(q)
    return fine, torch.where(resolved, bound, torch.full_like(bound, math.inf))


STEP_RATIO = 1.0      # |third difference| / the largest |second difference| within two nodes of it


def step_bound(log_w: torch.Tensor, pi: torch.Tensor, w: torch.Tensor, n: int, D: int) -> torch.Tensor:
    """Per replica and point [R, b]: what steps of log w = log p(y, z) - log q(z) between a stratum's n^D
    fine nodes may cost the rule (log_w [R, n^D, K, b], pi [R, 1, K, b], w [n^D], nodes in row-major
    order, D latent axes). Along an axis, a third difference at least STEP_RATIO times every second difference within
    two nodes of it marks a step (a smooth log w of scale l gives a ratio near spacing / l, a linear
    second difference through zero 2/3, a jump between two nodes 2); wherever it lies between the two
    nodes, it moves the integral by at most its size (<= the third difference) times the mass there (the
    node's weight pi_k w_j). Such a step (a decoder steeper than the nodes: measured, a tanh step of width
    1e-4 under a q of scale 1 was 0.10-0.27 nats off with |fine - coarse| up to 2.3x smaller) falls
    between the nodes of both rules alike, so |fine - coarse| alone does not bound it."""
    R, _, K, b = log_w.shape
    x = log_w.reshape(R, *[n] * D, K, b)
    weight = w.reshape(*[n] * D)[None, ..., None, None] * pi.reshape(R, *[1] * D, K, b)
    total = torch.zeros(R, b, dtype=log_w.dtype, device=log_w.device)
    for axis in range(1, D + 1):
        total = total + step_cost(x, weight, axis).flatten(1, D).sum(1).sum(1)
    return total


def step_cost(x: torch.Tensor, weight: torch.Tensor, axis: int) -> torch.Tensor:
    """step_bound's term along one axis of nodes (x and the nodes' weights, the same shape): per node
    i of x's axis but the last three, the third difference d3[i] times the larger weight of nodes i + 1
    and i + 2 where |d3[i]| >= STEP_RATIO x every |d2| within two nodes of it, else 0 (nothing with
    fewer than four nodes)."""
    n = x.shape[axis]
    if n < 4:
        return x.narrow(axis, 0, 0)
    d2, d3 = torch.diff(x, 2, dim=axis), torch.diff(x, 3, dim=axis).abs()                 # n - 2, n - 3 long
    pad = torch.zeros_like(d2.narrow(axis, 0, 1))
    near = torch.cat([pad, d2.abs(), pad], axis)                                         # n long: d2[i] at i + 1
    beside = torch.stack([near.narrow(axis, i, n - 3) for i in range(4)]).amax(0)         # d2[i - 1 .. i + 2]
    mass = torch.maximum(weight.narrow(axis, 1, n - 3), weight.narrow(axis, 2, n - 3))
    return torch.where(d3 >= STEP_RATIO * beside, d3 * mass, torch.zeros_like(d3))


def _widest(q) -> torch.Tensor:
    """The scale of q's widest stratum along any axis per point, [R, N]: half the distance from its -1
    to its +1 draw along that axis."""
    R, K, D = q.stratum_weights().shape[0], q.strata, q.dim
    N = q.resolution().shape[1]
    eps = torch.cat([torch.zeros(1, D, dtype=F64), torch.eye(D, dtype=F64)])      # the centre, +1 on each axis
    z = q.stratified_rsample(eps[None, :, None, None, :].expand(R, D + 1, K, N, D))   # [R, D + 1, K, N, D]
    return (z[:, 1:] - z[:, :1]).norm(dim=-1).amax(dim=(1, 2))


ZOOM_NODES = 257            # nodes over a point's zoomed window (129 for the bound)
ZOOM_SUPPORT = 46.0         # nats below the largest: nodes whose mass is below e^-46 = 1e-20 of it are outside
ZOOM_MARGIN = 2             # node spacings added on either side of the nodes that hold the mass
ZOOM_ROUNDS = 4             # zooms per point at most: each narrows the window to the mass its nodes found


@torch.no_grad()
def zoom_log_p(model: VAE, y, grid, miss: torch.Tensor, tolerance: float, chunk: int = 128):
    """log p(y) and its bound [R, N] at the points and replicas in `miss` [R, N] (inf elsewhere), each on
    a window of its own: the grid's nodes within ZOOM_SUPPORT nats of the posterior's largest mass there,
    ZOOM_MARGIN spacings wider on either side, at ZOOM_NODES uniform nodes; a point whose bound misses
    `tolerance` zooms again into the mass those nodes found, up to ZOOM_ROUNDS times (a posterior 200x
    narrower than the grid's spacing takes two). The bound is the trapezoid rule's |fine - coarse| plus
    the posterior mass left outside the windows (relative), and inf where a prior component narrower than
    the window's spacing lies within it (the two rules could alias it) or the mass reaches the grid's
    ends. Each replica runs alone (layers.replica_subset) on its own points, a chunk at a time."""
    return each_replica(model, y, miss, chunk,
                        lambda one, yc, row, part: _zoom(one, yc, grid.nodes[row], grid.log_w[row], tolerance))


def each_replica(model: VAE, y, miss: torch.Tensor, chunk: int, rule):
    """(values, bounds) [R, N] from `rule(replica alone, y [1, n, Y], its row, the points' indices)` ->
    ([1, n], [1, n]) on each replica's points in `miss` [R, N], `chunk` at a time (NaN and inf elsewhere)."""
    from ..model.layers import replica_subset
    y = as_batch(y, miss.shape[0], miss.device)
    values = torch.full(miss.shape, math.nan, dtype=F64)
    bounds = torch.full(miss.shape, math.inf, dtype=F64)
    for r in torch.nonzero(miss.any(1))[:, 0].tolist():
        one, row = replica_subset(model, [r]).eval(), slice(r, r + 1)
        points = torch.nonzero(miss[r])[:, 0]
        for s in range(0, len(points), chunk):
            part = points[s:s + chunk]
            values[r, part], bounds[r, part] = (t[0] for t in rule(one, y[row, part], row, part))
    return values, bounds


def _zoom(model: VAE, y: torch.Tensor, nodes: torch.Tensor, log_w: torch.Tensor, tolerance: float):
    """zoom_log_p on one chunk of points y [R, n, Y] from the grid's nodes [R, G, 1] and weights [R, G]."""
    from .quadrature import _grid_terms, _log_terms
    prior = model.prior().to(F64)
    z, h = nodes[..., 0][:, None], (nodes[:, 1, 0] - nodes[:, 0, 0])[:, None]          # [R, 1, G], [R, 1]
    grid_h = h[:, 0]
    log_mass = (_log_terms(y, *_grid_terms(model, nodes)) + log_w[:, :, None]).transpose(1, 2)   # [R, n, G]
    lo, hi, outside = _support(z, h, log_mass)
    for _ in range(ZOOM_ROUNDS):
        value, rule_bound, window_nodes, terms = _window_rule(model, y, lo, hi)
        bound = torch.where(_narrow_prior_inside(prior, lo, hi, grid_h), torch.full_like(rule_bound, math.inf),
                            rule_bound + outside)
        again = bound > tolerance
        if not bool(again.any()):
            break
        step = (hi - lo) / (ZOOM_NODES - 1)
        lo2, hi2, outside2 = _support(window_nodes, step, terms + torch.log(step)[..., None])
        lo, hi = torch.where(again, lo2, lo), torch.where(again, hi2, hi)
        outside = torch.where(again, outside + outside2, outside)
    return value, bound


def _support(z: torch.Tensor, h: torch.Tensor, log_mass: torch.Tensor):
    """Per replica and point [R, n]: the window [lo, hi] over the nodes z ([R, n or 1, J], spacing h [R, n
    or 1]) holding the posterior's mass (within ZOOM_SUPPORT nats of its largest; log_mass [R, n, J]),
    ZOOM_MARGIN spacings wider, and the share of the mass outside it (inf where the mass reaches the
    nodes' ends: what lies beyond them is unknown; follow_posteriors widens such windows)."""
    inside = log_mass >= log_mass.amax(-1, keepdim=True) - ZOOM_SUPPORT
    lo = torch.where(inside, z, math.inf).amin(-1) - ZOOM_MARGIN * h
    hi = torch.where(inside, z, -math.inf).amax(-1) + ZOOM_MARGIN * h
    mass = torch.softmax(log_mass, -1)
    within = (z >= lo[..., None]) & (z <= hi[..., None])
    outside = torch.where(within, torch.zeros_like(mass), mass).sum(-1)
    cut = (lo < z[..., 0]) | (hi > z[..., -1])
    return lo, hi, torch.where(cut, torch.full_like(outside, math.inf), outside)


def _window_rule(model: VAE, y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """log int_lo^hi p(y|z) p(z) dz per replica and point (y [R, n, Y], lo and hi [R, n]) by the trapezoid
    rule on ZOOM_NODES nodes, its bound |fine - coarse| (every other node), the nodes [R, n, J] and log
    p(y, z) there. The bound is inf where the likelihood is narrower than the coarse rule's spacing where
    the posterior holds mass: |f(z) - f(z')| / sigma > 1 across a coarse step (measured: a wide posterior
    with a narrow spike, sampled by one node of both rules, was 8e-4 nats off with |fine - coarse| 1e-5)."""
    from .quadrature import _grid_terms
    R, n = lo.shape
    t = torch.linspace(0, 1, ZOOM_NODES, dtype=F64)
    nodes = lo[..., None] + (hi - lo)[..., None] * t                                   # [R, n, J]
    mean, inv_sigma, offset = _grid_terms(model, nodes.reshape(R, -1, 1))
    r = (mean.reshape(R, n, ZOOM_NODES, -1) - y[:, :, None]) * inv_sigma[:, :, None]
    squared = (r * r).sum(-1)                                                          # [R, n, J]
    terms = -0.5 * squared + offset.reshape(R, n, ZOOM_NODES)
    h = ((hi - lo) / (ZOOM_NODES - 1))[..., None]
    edge = torch.zeros(ZOOM_NODES, dtype=F64)
    edge[[0, -1]] = math.log(2)
    fine = torch.logsumexp(terms - edge + torch.log(h), -1)
    coarse = torch.logsumexp(terms[..., ::2] - edge[::2] + torch.log(2 * h), -1)
    # the likelihood's own width: where it holds mass, f / sigma may change by at most 1 per coarse step
    held = terms >= terms.amax(-1, keepdim=True) - ZOOM_SUPPORT
    aa, ad, dd = _segments(r, squared, 2)                                              # per fine step
    best = squared.amin(-1, keepdim=True)
    near = held[..., 1:] | held[..., :-1] | _passes_near(aa, ad, dd, best, ZOOM_SUPPORT)
    steep = ((dd.sqrt() > 0.5) & near).any(-1)
    bound = torch.where(steep, torch.full_like(fine, math.inf), (fine - coarse).abs())
    return fine, bound, nodes, terms


def _segments(r: torch.Tensor, squared: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The segments from a to b, neighbouring nodes along `axis` of r = (f - y) / sigma [..., Y] (Y last;
    `squared` its squared norms, r's shape without Y): |a|^2, a . d and |d|^2 with d = b - a, each one
    shorter along `axis`. They follow from |a|^2, |b|^2 and a . b (|d|^2 = |a|^2 + |b|^2 - 2 a . b), in
    one pass over Y: on digits at d_z = 2 (Y = 61) the steepness guard's passes over [..., Y] took a
    third of the evaluation."""
    n = r.shape[axis]
    aa, bb = squared.narrow(axis, 0, n - 1), squared.narrow(axis, 1, n - 1)
    ab = (r.narrow(axis, 0, n - 1) * r.narrow(axis, 1, n - 1)).sum(-1)
    return aa, ab - aa, (aa + bb - 2 * ab).clamp_min(0.0)


def _passes_near(aa: torch.Tensor, ad: torch.Tensor, dd: torch.Tensor, best: torch.Tensor, nats: float) -> torch.Tensor:
    """Whether the segment from a to b (r = (f - y) / sigma at two neighbouring nodes, given by |a|^2,
    a . d and |d|^2: _segments) passes where the likelihood is within `nats` of its best node (`best`: r's
    smallest squared norm over the point's nodes, broadcast against them): f can cross y between two nodes
    that both see almost nothing, which is where an aliased spike hides. r is taken as linear along the
    segment: its closest point to 0 is a + t d, t = -a . d / |d|^2 within [0, 1]."""
    t = (-ad / dd.clamp_min(1e-300)).clamp(0, 1)
    closest = aa + t * (2 * ad + t * dd)
    return 0.5 * (closest - best) <= nats


def _narrow_prior_inside(prior, lo: torch.Tensor, hi: torch.Tensor, grid_h: torch.Tensor) -> torch.Tensor:
    """[R, n]: a prior component within [lo, hi] (its location +- 8 scales reaching in) is narrower than
    the window's spacing, or one anywhere is narrower than the grid's spacing grid_h [R] (the grid cannot
    see its mass, so the window, built from the grid's mass, may leave it out without counting it)."""
    spacing = (hi - lo) / (ZOOM_NODES - 1)
    unseen = (prior.resolution().amin(1) < grid_h)[:, None]                            # [R, 1]
    if not isinstance(prior, DiagMixture):   # judged by its narrowest scale (a flow's too: its knots' pieces)
        return (prior.resolution()[:, :1] < spacing) | unseen
    loc, scale = prior.loc[:, 0, 0, :, 0][:, None], prior.scale[:, 0, 0, :, 0][:, None]    # [R, 1, K]
    reaches = (loc + SPAN * scale >= lo[..., None]) & (loc - SPAN * scale <= hi[..., None])
    return (reaches & (scale < spacing[..., None])).any(-1) | unseen


ZOOM_NODES_2D = 129         # nodes per axis over a point's zoomed box in 2-D (65 for the bound)
SUPPORT_2D = 30.0           # nats: the box holds the nodes within e^-30 of the largest mass (what is left
                            # outside is at most 161,201 nodes x 1e-13 = 2e-8 of it, and enters the bound)
FINER_BOXES = (257, 513)    # nodes per axis a box tries in turn where 129 were too few (513^2: about 0.3 s a point)
STEEP_2D = 20.0             # nats: the steepness guard looks where the mass is within e^-20 of the largest
                            # (digits at d_z = 2: at 46 nats every box was judged too steep by its far tails)


@torch.no_grad()
def zoom_log_p_2d(model: VAE, y, grid, miss: torch.Tensor, tolerance: float, chunk: int = 8):
    """zoom_log_p for a 2-D latent: each point and replica in `miss` [R, N] on a box of its own (the grid's
    nodes within SUPPORT_2D nats of the posterior's largest mass, ZOOM_MARGIN spacings wider along each
    axis) at ZOOM_NODES_2D^2 nodes, zooming again up to ZOOM_ROUNDS times; (log p, bound) [R, N], inf
    elsewhere. The bound is |fine - coarse| (every other node along both axes) plus the mass left outside
    the boxes; inf where f / sigma changes by more than 1 across a coarse step along either axis where the
    posterior holds mass (within STEEP_2D nats of its largest), where a prior component narrower than the box's spacing reaches into it, or
    where the mass reaches the grid's edge."""
    def rule(one, yc, row, part):
        spacing = torch.stack([a[row, 1] - a[row, 0] for a in grid.axes], -1)[:, None]      # [1, 1, 2]
        return _zoom_2d(one, yc, grid.nodes[row], grid.log_w[row], spacing, tolerance)
    return each_replica(model, y, miss, chunk, rule)


def _zoom_2d(model: VAE, y: torch.Tensor, nodes: torch.Tensor, log_w: torch.Tensor, spacing: torch.Tensor,
             tolerance: float):
    """zoom_log_p_2d on one chunk of points y [1, n, Y] from the grid's nodes [1, G, 2] and weights [1, G]."""
    from .quadrature import _grid_terms, _log_terms
    prior = model.prior().to(F64)
    grid_h = spacing.amin(-1)[:, 0]                                                    # [1]
    log_mass = (_log_terms(y, *_grid_terms(model, nodes)) + log_w[:, :, None]).transpose(1, 2)   # [1, n, G]
    lo, hi, outside = _box(nodes[:, None], spacing, log_mass)
    for _ in range(ZOOM_ROUNDS):
        value, rule_bound, box_nodes, terms, step = _box_rule(model, y, lo, hi)
        bound = _box_bound(prior, rule_bound, lo, hi, step, grid_h, outside)
        again = bound > tolerance
        if not bool(again.any()):
            break
        lo2, hi2, outside2 = _box(box_nodes.flatten(2, 3), step, terms.flatten(2))
        lo, hi = torch.where(again[..., None], lo2, lo), torch.where(again[..., None], hi2, hi)
        outside = torch.where(again, outside + outside2, outside)
    for J in FINER_BOXES:               # a box whose likelihood is too steep for its nodes: more nodes, a point at a time
        for k in torch.nonzero(bound[0] > tolerance)[:, 0].tolist():
            p = slice(k, k + 1)
            v, b, _, _, step = _box_rule(model, y[:, p], lo[:, p], hi[:, p], J)
            b = _box_bound(prior, b, lo[:, p], hi[:, p], step, grid_h, outside[:, p])
            if float(b[0, 0]) < float(bound[0, k]):
                value[0, k], bound[0, k] = v[0, 0], b[0, 0]
    return value, bound


def _box(z: torch.Tensor, h: torch.Tensor, log_mass: torch.Tensor):
    """As _support, in 2-D: the box [lo, hi] ([R, n, 2] each) around the nodes z [R, n or 1, J, 2] holding
    the posterior's mass (log_mass [R, n, J]), ZOOM_MARGIN spacings h [R, n or 1, 2] wider, and the mass
    outside it [R, n] (inf where the box reaches past the nodes' extent)."""
    inside = (log_mass >= log_mass.amax(-1, keepdim=True) - SUPPORT_2D)[..., None]
    lo = torch.where(inside, z, math.inf).amin(-2) - ZOOM_MARGIN * h
    hi = torch.where(inside, z, -math.inf).amax(-2) + ZOOM_MARGIN * h
    mass = torch.softmax(log_mass, -1)
    within = ((z >= lo[..., None, :]) & (z <= hi[..., None, :])).all(-1)
    outside = torch.where(within, torch.zeros_like(mass), mass).sum(-1)
    cut = ((lo < z.amin(-2)) | (hi > z.amax(-2))).any(-1)
    return lo, hi, torch.where(cut, torch.full_like(outside, math.inf), outside)


def _box_rule(model: VAE, y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, J: int = ZOOM_NODES_2D):
    """log of the integral of p(y|z) p(z) over each point's box (lo, hi [R, n, 2]) by the trapezoid rule on
    J^2 nodes; its bound (|fine - coarse|, inf where the likelihood is too steep for the
    coarse nodes where the posterior holds mass); the nodes [R, n, J, J, 2], log p(y, z) there [R, n, J, J]
    and the spacing [R, n, 2]."""
    from .quadrature import _grid_terms
    R, n, _ = lo.shape
    assert J % 2 == 1, "the coarse rule is every other node: an odd count keeps both ends"
    t = torch.linspace(0, 1, J, dtype=F64)
    axes = lo[..., None] + (hi - lo)[..., None] * t                                    # [R, n, 2, J]
    nodes = torch.stack(torch.broadcast_tensors(axes[:, :, 0, :, None], axes[:, :, 1, None, :]), -1)
    mean, inv_sigma, offset = _grid_terms(model, nodes.reshape(R, -1, 2))
    r = (mean.reshape(R, n, J, J, -1) - y[:, :, None, None]) * inv_sigma[:, :, None, None]
    squared = (r * r).sum(-1)                                                          # [R, n, J, J]
    terms = -0.5 * squared + offset.reshape(R, n, J, J)
    step = (hi - lo) / (J - 1)                                                         # [R, n, 2]
    edge = torch.zeros(J, dtype=F64)
    edge[[0, -1]] = math.log(2)
    log_w = torch.log(step).sum(-1)[..., None, None] - edge[:, None] - edge[None, :]
    fine = torch.logsumexp((terms + log_w).flatten(2), -1)
    coarse_w = torch.log(2 * step).sum(-1)[..., None, None] - edge[::2, None] - edge[None, ::2]
    coarse = torch.logsumexp((terms[..., ::2, ::2] + coarse_w).flatten(2), -1)
    held = terms >= terms.amax(dim=(-2, -1), keepdim=True) - STEEP_2D
    steep = torch.zeros_like(fine, dtype=torch.bool)
    best = squared.flatten(2).amin(-1)[..., None, None]
    for axis in (2, 3):
        aa, ad, dd = _segments(r, squared, axis)
        near = held.narrow(axis, 1, J - 1) | held.narrow(axis, 0, J - 1) | _passes_near(aa, ad, dd, best, STEEP_2D)
        steep |= ((dd.sqrt() > 0.5) & near).flatten(2).any(-1)
    bound = torch.where(steep, torch.full_like(fine, math.inf), (fine - coarse).abs())
    return fine, bound, nodes, terms, step


def _box_bound(prior, rule_bound: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, step: torch.Tensor,
               grid_h: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """A box's bound [R, n]: its rule's plus the mass left outside it, inf where a prior component
    narrower than its spacing could hide in it (_narrow_prior_in_box)."""
    return torch.where(_narrow_prior_in_box(prior, lo, hi, step, grid_h), torch.full_like(rule_bound, math.inf),
                       rule_bound + outside)


def _narrow_prior_in_box(prior, lo: torch.Tensor, hi: torch.Tensor, step: torch.Tensor, grid_h: torch.Tensor) -> torch.Tensor:
    """[R, n]: a prior component narrower than the box's spacing along some axis reaches into the box, or
    one anywhere is narrower than the grid's spacing grid_h [R] along some axis (unseen by the grid)."""
    unseen = (prior.resolution().amin(1) < grid_h)[:, None]
    if not isinstance(prior, DiagMixture):
        return (prior.resolution()[:, :1] < step.amin(-1)) | unseen
    loc, scale = prior.loc[:, 0, 0][:, None], prior.scale[:, 0, 0][:, None]            # [R, 1, K, 2]
    reaches = ((loc + SPAN * scale >= lo[:, :, None]) & (loc - SPAN * scale <= hi[:, :, None])).all(-1)
    return (reaches & (scale < step[:, :, None]).any(-1)).any(-1) | unseen
