"""The gap search's rule for a Gaussian q in 1-D: Gauss-Hermite on q's own scale where q is narrow, the
trapezoid on a fixed grid that resolves the decoder where q is wide, and a smooth blend between.

Gauss-Hermite's nodes follow q, so they resolve a narrow q wherever it sits; but over a wide q they are
spread at about a third of q's scale, and a steep decoder's log p(y, z) has features far narrower than that.
The search climbed that rule's errors: on the noise study (main 19e6290) the search's 64-node rule and
evaluation's grid rule disagreed by over 1e-2 nats at 57-513 of 5,000 point-replicas of each run at sigma =
0.05, 0.03 and 0.02, and of mog-prior's at 0.01 (up to 6.8 nats, a q of scale 4 scored 0.589 where it is
-2.437), and the 12-node rule the
search climbed was off by 1e-3 to 5e-3 at the best q's of sigma = 0.03 (scale about 0.4), so the saved
ELBO* fell short of a brute-force search by 1.6e-4 nats on average (benchmarks/experiments/
gap_search_gaussian_rule.py).

Here, with lambda(s) rising smoothly from 0 to 1 as q's scale s goes from BLEND[0] to BLEND[1] spacings of
the replica's grid,

    ELBO(q) = (1 - lambda) E_q[log p(y, z) - log q(z)]           by Gauss-Hermite, HERMITE_NODES nodes
            + lambda (sum_g w_g q(z_g) log p(y, z_g)            the trapezoid on the grid's nodes z_g
                      + sum_edges P_q(beyond the edge) (log p(y, edge) - TAIL_PENALTY) + H(q)),

with H(q) = log s + (1 + log 2 pi) / 2 exact. Each replica's grid spans the prior's reach (+-GRID_SPAN of
its components' scales) with GRID_SIZE nodes, or more where its prior or its likelihood has narrower
features (grid_axes); it is the same for every point, so a point's value does not depend on the others, and
log p(y, z) on it is computed once per chunk of points (_Cache, emptied by every gaps.best_posterior). From
BLEND[0] spacings up the trapezoid of q itself is off by at most 1e-19 of q's mass (2 exp(-2 pi^2 (s /
h)^2)); up to BLEND[1] Gauss-Hermite's nodes lie closer than a spacing; both are accurate between (within
1e-6 nats of SciPy's quad, tests/test_gaussian_rule.py). The gradient is closed-form on the grid and
autograd's through Gauss-Hermite's nodes.

For a q with mass beyond the grid (beyond the prior's 8 scales) this is not its ELBO: that mass is charged
the edge's log p less TAIL_PENALTY nats, where the true log p falls on with the prior (so such a q is
scored too high; too low where the likelihood rises beyond the edge), and for a scale beyond about 1e3 the
score grows again like log s. Such q's score far below any q within the prior's reach, and no start is near
them. ELBO* is scored afterwards by evaluation's own rule (gaps.gap_metrics), as for every family.

Re-evaluating the noise study's ten Gaussian-posterior runs with it (500 points x 10 replicas each; main
e8d58e2) moved no number but their approximation/amortization split: the approximation gap fell by up to
0.124 nats on a run's mean (mog-prior at sigma = 0.01: 0.162 -> 0.038; a replica by up to 1.2), a replica
by at most 2.3e-4 at sigma = 0.1 (docs/findings.md). Its value agreed with evaluation's grid rule within 1.2e-5 at
every q it found (the first 40 points of each run; inside that rule's own bound), and its ELBO* with an
independent brute force within 2.7e-6 on three replicas checked (40 points each). It costs 3.8-8.4x the old
search's time (docs/speed.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.flows import LOG_SQRT_2PI
from ..model.mixtures import DiagMixture
from ..model.posteriors import MIN_SCALE, raw_scale
from ..model.grid import trapezoid_log_weights
from .quadrature import F64, _grid_terms, hermite_rule, latent_grid, node_sum

HERMITE_NODES = 64
GRID_SIZE, GRID_SPAN = 2001, 8.0
BLEND = (1.5, 3.0)
TAIL_PENALTY = 100.0
PRIOR_SPACINGS, LIKELIHOOD_SPACINGS = 10, 5   # grid_axes
MAX_GRID = 8001
CUT = 12.0       # q's scales beyond which a node's term is taken as 0
BLOCK = 64       # nodes per block of the grid's sum (_blocked_sum)


def is_gaussian_1d(q) -> bool:
    """Whether q is one Gaussian over a 1-D latent: the family this rule serves."""
    return isinstance(q, DiagMixture) and q.dim == 1 and q.strata == 1


def gaussian_elbo(model, y: torch.Tensor, q: DiagMixture) -> torch.Tensor:
    """ELBO(q) by the blended rule: y [R, B, Y], q with batch [R, 1, B] -> [R, B]."""
    loc, scale = q.loc[:, 0, :, 0, 0], q.scale[:, 0, :, 0, 0]                    # [R, B]
    return _blended(model, y, loc, scale, None)


def gaussian_value_and_gradient(model, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-ELBO by the blended rule and its gradient in q's raw parameters x [R, B, 2] (location, raw scale,
    the scale softplus(raw) + MIN_SCALE), each point's bitwise the same in any batch (every sum over nodes
    is node_sum's, within the point's own column) and its value bitwise gaussian_elbo's."""
    x = x.detach()
    loc, scale = x[..., 0], F.softplus(x[..., 1]) + MIN_SCALE
    grads = []
    value = _blended(model, y, loc, scale, grads)
    d_loc, d_scale = grads
    return -value, -torch.stack([d_loc, d_scale * torch.sigmoid(x[..., 1])], -1)


def _blended(model, y: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, grads: list | None,
             coarse: bool = False) -> torch.Tensor:
    """(1 - lambda) Gauss-Hermite + lambda grid, per point [R, B], from loc and scale [R, B]; with `grads` a
    list, appends d/d loc and d/d scale; `coarse`, on a quarter of the grid's nodes. Each part is computed
    only for the points (columns) that use it in some replica; a point's value is the same whether its
    column was computed or not (the unused part is multiplied by an exact 0)."""
    grid = _CACHE.axes(model, coarse)
    h = torch.stack([axis.h for axis in grid])                                       # [R]
    ratio = math.log(BLEND[1] / BLEND[0])
    u = ((torch.log(scale / h[:, None]) - math.log(BLEND[0])) / ratio).clamp(0, 1)
    blend = u * u * (3 - 2 * u)                                                      # smoothstep: [R, B]
    parts = []
    for used, part in (((blend < 1).any(0), _hermite_part), ((blend > 0).any(0), _grid_part)):
        value, d_loc, d_scale = (torch.zeros_like(loc) for _ in range(3))
        at = torch.nonzero(used)[:, 0]
        if len(at):
            v, *d = part(model, y[:, at], loc[:, at], scale[:, at], grid, grads is not None)
            value[:, at] = v
            if grads is not None:
                d_loc[:, at], d_scale[:, at] = d
        parts.append((value, d_loc, d_scale))
    (a, a_loc, a_scale), (b, b_loc, b_scale) = parts
    if grads is not None:
        d_blend = 6 * u * (1 - u) / (scale * ratio)
        grads += [(1 - blend) * a_loc + blend * b_loc, (1 - blend) * a_scale + blend * b_scale + (b - a) * d_blend]
    return (1 - blend) * a + blend * b


def _hermite_part(model, y: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, axes, grad: bool):
    """E_q[log p(y, z) - log q(z)] by Gauss-Hermite on q's own scale, [R, B], and with `grad` its derivatives
    in loc and scale: every node holds its own copy of its point's parameters, so autograd sums nothing over
    nodes, and node_sum adds the copies' gradients."""
    t, w = (a.to(y.device) for a in hermite_rule(HERMITE_NODES, 1))
    t, w = t[:, 0][None, :, None], w[None, :, None]                                  # [1, n, 1]
    R, B = loc.shape
    m, s = (a[:, None].expand(R, t.shape[1], B) for a in (loc, scale))
    if grad:
        m, s = m.clone().requires_grad_(True), s.clone().requires_grad_(True)
    with torch.set_grad_enabled(grad):
        z = (m + s * t)[..., None]                                                   # [R, n, B, 1]
        log_p = model.decoder.log_prob(y, z) + model.prior().to(z.dtype).log_prob(z)
        value = node_sum(w * (log_p + 0.5 * t * t + torch.log(s) + LOG_SQRT_2PI))
    if not grad:
        return (value,)
    d_loc, d_scale = torch.autograd.grad(value.sum(), [m, s])
    return value.detach(), node_sum(d_loc), node_sum(d_scale)


def _grid_part(model, y: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, axes, grad: bool):
    """sum_g w_g q(z_g) log p(y, z_g) on each replica's grid + q's mass beyond each edge x (log p(y, edge) -
    TAIL_PENALTY) + H(q), [R, B], and with `grad` its derivatives in loc and scale, in closed form (with
    u = (z - loc) / scale, d q / d loc = q u / scale and d q / d scale = q (u^2 - 1) / scale). Per replica,
    only the nodes within CUT scales of some point's q are computed: every point's terms beyond its own CUT
    scales are 0 (they would be below 1e-31 of its largest), so the blocks of nodes left out add exactly 0
    to it (_blocked_sum)."""
    joints = _CACHE.joints(model, y, axes)                                           # per replica [G_r, B]
    out = [_replica_grid_part(axis, joint, loc[r], scale[r], grad) for r, (axis, joint) in enumerate(zip(axes, joints))]
    return tuple(torch.stack(part) for part in zip(*out))


def _replica_grid_part(axis, joint: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, grad: bool):
    """_grid_part for one replica: its grid `axis`, log p(y, z) on it [G, B], loc and scale [B]."""
    # in grid indices; a point whose q is not finite (a search's wild step) widens the hull, not raises
    reach = torch.stack([(loc - CUT * scale - axis.lo) / axis.h, (loc + CUT * scale - axis.lo) / axis.h])
    reach = torch.nan_to_num(reach, nan=0.0, posinf=float(axis.size), neginf=0.0).clamp(0, axis.size)
    first = int(reach[0].amin().floor()) // BLOCK * BLOCK
    stop = max(first, min(axis.size, int(reach[1].amax().ceil()) + 1))
    u = (axis.nodes[first:stop, None] - loc) / scale                                  # [n, B]
    terms = torch.where(u.abs() <= CUT, torch.exp(axis.log_w[first:stop, None] - 0.5 * u * u - torch.log(scale)
                                                  - LOG_SQRT_2PI), 0.0) * joint[first:stop]
    blocks = -(-axis.size // BLOCK)
    below, above = (axis.nodes[0] - loc) / scale, (loc - axis.nodes[-1]) / scale      # [B]
    edge_lo, edge_hi = joint[0] - TAIL_PENALTY, joint[-1] - TAIL_PENALTY
    value = (_blocked_sum(terms, first, blocks) + torch.special.ndtr(below) * edge_lo
             + torch.special.ndtr(above) * edge_hi + torch.log(scale) + 0.5 + LOG_SQRT_2PI)
    if not grad:
        return (value,)
    density_lo, density_hi = (torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi) for a in (below, above))
    d_loc = _blocked_sum(terms * u, first, blocks) / scale + (density_hi * edge_hi - density_lo * edge_lo) / scale
    d_scale = (_blocked_sum(terms * (u * u - 1), first, blocks) - density_lo * below * edge_lo
               - density_hi * above * edge_hi + 1) / scale
    return value, d_loc, d_scale


def _blocked_sum(terms: torch.Tensor, first: int, blocks: int) -> torch.Tensor:
    """The sum over a grid's nodes of terms [n, B] given on nodes first ... first + n - 1 (first a multiple
    of BLOCK), the rest 0: node_sum within each block of BLOCK nodes, then over all `blocks` blocks of the
    grid, the blocks not given as 0. A point's sum is then the same bits whichever blocks were given, as
    long as its own nonzero terms lie in them."""
    n, B = terms.shape
    given = -(-n // BLOCK)
    padded = F.pad(terms, (0, 0, 0, given * BLOCK - n))
    partial = node_sum(padded.reshape(given, BLOCK, B))                               # [given, B]
    start = first // BLOCK
    return node_sum(F.pad(partial, (0, 0, start, blocks - start - given))[None])[0]


@dataclass(frozen=True)
class Axis:
    """One replica's grid: `size` uniform nodes from lo, spacing h, with the trapezoid's log weights."""
    lo: torch.Tensor
    h: torch.Tensor
    nodes: torch.Tensor
    log_w: torch.Tensor

    @property
    def size(self) -> int:
        return self.nodes.shape[0]


def grid_axes(model, coarse: bool = False) -> list[Axis]:
    """Each replica's grid over the prior's reach (+-GRID_SPAN of its components' scales): GRID_SIZE nodes, or
    more where the replica's features are narrower than that spacing can follow: the prior's narrowest
    scale must span PRIOR_SPACINGS of them (a mixture prior's log density bends over far less than its
    component's scale, where the component gives way to the others), and the likelihood's narrowest
    width, 1 / |f'(z) / sigma| at its steepest (the norm over the observed coordinates),
    LIKELIHOOD_SPACINGS; at most MAX_GRID. Measured on the noise study's sigma = 0.01 mixture-prior run,
    whose replica 9 has a component of scale 0.038 and a likelihood width of 0.018: the rule on 2,001
    nodes (spacing 0.008) was up to 2.3e-4 nats off that on 16,001, on 4,001 3.3e-6, on 8,001 1.2e-7;
    every other replica of the study within 2.4e-6 on 2,001. `coarse`: a quarter of the nodes (the
    lattice's starts)."""
    base = latent_grid(model, GRID_SIZE, GRID_SPAN)
    axis = base.axes[0]                                                              # [R, G]
    h, width = axis[:, 1] - axis[:, 0], axis[:, -1] - axis[:, 0]                     # [R]
    mean, inv_sigma, _ = _grid_terms(model, base.nodes)                             # [R, G, Y], [R, 1, Y]
    slope = (mean[:, 1:] - mean[:, :-1]) * inv_sigma / h[:, None, None]             # [R, G - 1, Y]
    steepest = slope.square().sum(-1).sqrt().amax(1)        # the log likelihood's curvature is the sum's: [R]
    prior = model.prior().to(F64).resolution().amin(-1)                             # [R]
    spacing = torch.minimum(prior / PRIOR_SPACINGS, 1 / (LIKELIHOOD_SPACINGS * steepest.clamp_min(1e-300)))
    axes = []
    for r in range(len(h)):
        need = int((width[r] / spacing[r]).ceil()) + 1
        size = min(MAX_GRID, max(GRID_SIZE, need + (need + 1) % 2))
        size = (size - 1) // 4 + 1 if coarse else size
        nodes = torch.linspace(float(axis[r, 0]), float(axis[r, -1]), size, dtype=F64, device=axis.device)
        step = width[r] / (size - 1)
        axes.append(Axis(axis[r, 0], step, nodes, trapezoid_log_weights(step[None], size)[0]))
    return axes


class _Cache:
    """Per model (a search's table, its network), each replica's grid, and log p(y, z) on it for the
    points of the last search: the search asks for the same points' values at every step, in changing
    subsets (the points still moving), and they do not depend on q. A subset of a cached batch is gathered
    from it; any other batch is computed (element by element, _grid_log_joints, so that a point's values do
    not depend on the points beside it) and replaces the model's entry. It assumes that a model does not
    change while cached: gaps.best_posterior empties it before and after each search (forget_cache)."""

    def __init__(self):
        self.grids = {}          # (id(model), coarse) -> (model, axes)
        self.values = {}         # (id(model), grid sizes) -> (model, the points y [R, N, Y], their joints)

    def forget(self) -> None:
        self.grids, self.values = {}, {}

    def axes(self, model, coarse: bool) -> list[Axis]:
        entry = self.grids.get((id(model), coarse))
        if entry is None or entry[0] is not model:
            entry = (model, grid_axes(model, coarse))
            if len(self.grids) >= 4:
                self.grids.clear()
            self.grids[(id(model), coarse)] = entry
        return entry[1]

    def joints(self, model, y: torch.Tensor, axes: list[Axis]) -> list[torch.Tensor]:
        key = (id(model), tuple(axis.size for axis in axes))
        entry = self.values.get(key)
        if entry is not None and entry[0] is model:
            columns = _columns_in(entry[1], y)
            if columns is not None:
                return [joint[:, columns] for joint in entry[2]]
        joints = _grid_log_joints(model, y, axes)
        if len(self.values) >= 4:
            self.values.clear()
        self.values[key] = (model, y.detach().clone(), joints)
        return joints


def _columns_in(cached: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """Where each point of y [R, B, Y] is among the points `cached` [R, N, Y] (found by its first
    coordinate in the first replica, then checked whole), or None if any is not there."""
    if cached.shape[0] != y.shape[0] or cached.shape[2] != y.shape[2]:
        return None
    order = torch.argsort(cached[0, :, 0])
    at = torch.searchsorted(cached[0, order, 0].contiguous(), y[0, :, 0].contiguous())
    found = order[at.clamp(max=len(order) - 1)]
    return found if torch.equal(cached[:, found], y) else None


_CACHE = _Cache()


def forget_cache() -> None:
    """Drop every cached grid and log p (gaps.best_posterior, before and after a search)."""
    _CACHE.forget()


def _grid_log_joints(model, y: torch.Tensor, axes: list[Axis]) -> list[torch.Tensor]:
    """log p(y, z_g) at each replica's grid nodes for every point of y [R, B, Y]: [G_r, B] per replica, element
    by element (one observed coordinate at a time), so that a point's values do not depend on the points
    beside it (a batched product's rounding would). The decoder runs on every replica's nodes at once,
    padded to the largest grid with its last node."""
    size = max(axis.size for axis in axes)
    nodes = torch.stack([torch.cat([axis.nodes, axis.nodes[-1:].expand(size - axis.size)])
                         for axis in axes])[..., None]                               # [R, G, 1]
    mean, inv_sigma, offset = _grid_terms(model, nodes)                             # [R, G, Y], [R, 1, Y], [R, G]
    joints = []
    for r, axis in enumerate(axes):
        total = torch.zeros(axis.size, y.shape[1], dtype=F64, device=y.device)
        for d in range(y.shape[-1]):
            total += ((mean[r, :axis.size, None, d] - y[r, None, :, d]) * inv_sigma[r, 0, d]) ** 2
        joints.append(offset[r, :axis.size, None] - 0.5 * total)
    return joints

LATTICE_LEVELS = 12                                  # locations: the posterior's quantiles (i + 1/2) / 12
LATTICE_SCALES = [2.0 ** (k / 2) for k in range(-12, 5, 2)]    # scales: its standard deviation times these


def lattice_starts(model, y: torch.Tensor, z: torch.Tensor, mass: torch.Tensor) -> list[torch.Tensor]:
    """Two starts for a Gaussian q in 1-D, raw [R, B, 2] each (location, raw scale): the best by this rule
    of a lattice of Gaussians at the exact posterior's quantiles, with scales of its standard deviation times
    LATTICE_SCALES, among those located below its median and among those above; `mass` [R, B, G] is the
    posterior's on the nodes z [R, G]. Where a multimodal posterior has several local optima, the best
    Gaussian may sit between, across or beside its modes, and no start at a mode or from the encoder leads
    there; and of two mirror modes, the lattice's coarseness can favour the lesser one."""
    R, B, G = mass.shape
    cdf = torch.cumsum(mass, -1)
    levels = (torch.arange(LATTICE_LEVELS, dtype=mass.dtype, device=mass.device) + 0.5) / LATTICE_LEVELS
    index = torch.searchsorted(cdf, levels.expand(R, B, -1).contiguous()).clamp(max=G - 1)
    locs = torch.gather(z[:, None].expand(-1, B, -1), 2, index)                     # [R, B, L]
    mean = node_sum((mass * z[:, None]).transpose(1, 2))                             # [R, B], pairwise per point
    sd = node_sum((mass * (z[:, None] - mean[..., None]) ** 2).transpose(1, 2)).sqrt().clamp_min(2 * MIN_SCALE)
    starts = []
    for half in (range(LATTICE_LEVELS // 2), range(LATTICE_LEVELS // 2, LATTICE_LEVELS)):
        best = torch.full((R, B), -math.inf, dtype=mass.dtype, device=mass.device)
        best_loc, best_scale = locs[..., half[0]].clone(), sd.clone()
        for i in half:
            for factor in LATTICE_SCALES:
                loc, scale = locs[..., i], (sd * factor).clamp_min(2 * MIN_SCALE)   # a scale the family has
                value = _blended(model, y, loc, scale, None, coarse=True)
                better = value > best
                best = torch.where(better, value, best)
                best_loc, best_scale = torch.where(better, loc, best_loc), torch.where(better, scale, best_scale)
        starts.append(torch.stack([best_loc, raw_scale(best_scale)], -1))
    return starts
