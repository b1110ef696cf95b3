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

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.distributions import box
from ..model.vae import VAE
from ..objectives.bounds import log_weights

MAX_LATENT = 2
MAX_GRID_NODES = 250_000   # latent nodes per replica: the decoder on the grid and the 2-D ELBO terms stay ~1 GB
RULE_NODES = 16     # Gauss-Legendre nodes per smooth piece of a piecewise-smooth q (model.flows.SplineFlow.base_rule)
KINKED_BOUND = 3.0   # the piecewise rule's error bound, in |fine - coarse|, where the prior has kinks (see there)
F64 = torch.float64  # densities and sums; the networks run in the precision they were trained in


@dataclass(frozen=True)
class Grid:
    nodes: torch.Tensor    # [R, G, D]
    log_w: torch.Tensor    # [R, G]  log quadrature weights (fine rule)
    coarse: torch.Tensor   # [G'] indices of the coarse sub-grid (every other node of the core)
    log_w_coarse: torch.Tensor  # [R, G']
    axes: tuple[torch.Tensor, ...]  # per-axis nodes, each [R, n]
    core: slice = field(default_factory=lambda: slice(None))  # the nodes covering the prior, where log p(y) is integrated; the rest serve q


def _trapezoid_log_weights(h: torch.Tensor, n: int) -> torch.Tensor:
    """log of the trapezoid weights on n uniform nodes of spacing h [R] -> [R, n]."""
    w = h[:, None].expand(-1, n).clone()
    w[:, 0] /= 2
    w[:, -1] /= 2
    return torch.log(w)


def latent_grid(model: VAE, size: int, span: float, y=None, max_size: int = 20_001, q=None) -> Grid:
    """Uniform grid, one per replica, over every prior component to +- `span`
    scales and, when `y` is given, over every component of q(z|y) too (so the
    ELBO's integrand is covered). `size` nodes span the prior; a wider range gets
    more nodes at the same spacing, up to `max_size`. `q` (batch over y) stands in for
    the encoder's posterior (the gap decomposition's optimized q)."""
    if size % 2 == 0:
        raise ValueError(f"grid size must be odd, got {size}")
    prior = model.prior().to(F64)
    D = model.latent_dim
    if D > MAX_LATENT:
        raise ValueError(f"quadrature supports latent_dim <= {MAX_LATENT}, got {D}")
    p_lo, p_hi = box(*prior.reach(span))                                   # [R, D]
    lo, hi = p_lo, p_hi
    spacing = (hi - lo) / (size - 1)
    if y is not None:
        q = (model.posterior(as_batch(y, lo.shape[0], lo.device)) if q is None else q).to(F64)
        q_lo, q_hi = box(*q.reach(span))
        lo, hi = torch.minimum(lo, q_lo), torch.maximum(hi, q_hi)
        need = int(((hi - lo) / spacing).max().ceil()) + 1
        size = min(max_size if D == 1 else size, max(size, need + (need + 1) % 2))
    t = torch.linspace(0, 1, size, dtype=lo.dtype, device=lo.device)
    axes = [lo[:, d, None] + (hi - lo)[:, d, None] * t for d in range(D)]  # each [R, n]
    h = [(hi - lo)[:, d] / (size - 1) for d in range(D)]
    fine = [_trapezoid_log_weights(hd, size) for hd in h]
    if D == 1:
        # the core: the nodes over the prior's reach (an even start, so the coarse rule is every other node)
        i0 = int(((p_lo[:, 0] - lo[:, 0]) / h[0]).round().min()) // 2 * 2
        i1 = int(((p_hi[:, 0] - lo[:, 0]) / h[0]).round().max()) + 1
        core = slice(i0, min(i1, size))
        idx = torch.arange(core.start, core.stop, 2, device=lo.device)
        log_wc = torch.log(2 * h[0])[:, None].expand(-1, len(idx))    # integrand ~e^-32 at the ends
        return Grid(axes[0][..., None], fine[0], idx, log_wc, tuple(axes), core)
    coarse_n = (size + 1) // 2
    coarse = [_trapezoid_log_weights(2 * hd, coarse_n) for hd in h]
    idx = torch.arange(0, size, 2, device=lo.device)
    # tensor product, row-major: node (i, j) -> i * size + j
    nodes = torch.stack([torch.stack(torch.meshgrid(a0, a1, indexing="ij"), -1).reshape(-1, 2)
                         for a0, a1 in zip(axes[0], axes[1])])             # [R, G, 2]
    log_w = (fine[0][:, :, None] + fine[1][:, None, :]).reshape(len(lo), -1)
    cidx = (idx[:, None] * size + idx[None, :]).reshape(-1)
    log_wc = (coarse[0][:, :, None] + coarse[1][:, None, :]).reshape(len(lo), -1)
    return Grid(nodes, log_w, cidx, log_wc, tuple(axes))


def training_log_marginal(model: VAE, y: torch.Tensor, size: int, span: float = 8.0) -> torch.Tensor:
    """log p_theta(y) by the trapezoid rule over the prior's reach, differentiable in
    the prior's and the decoder's parameters (the exact objective): y [R, B, Y] -> [R, B].
    The nodes follow the prior at every step but carry no gradient: the rule's
    weights are constants, and the integrand carries the parameters.

    The Gaussian exponent -(y - f)^2 / 2 sigma^2 is expanded so that its part that
    couples y and the node is one batched matrix product, and its part in y alone
    leaves the log-sum-exp: [R, B, G] is touched by the product, the exp and the
    sum only (measured 5x faster than broadcasting the Gaussian over [R, G, B]).
    y and f are centred first, so that float32 keeps the cancellation small."""
    with torch.no_grad():
        grid = latent_grid(model, size, span)
    nodes = grid.nodes.to(y.dtype)                                          # [R, G, D]
    mean = model.decoder.mean(nodes[:, :, None, :])[:, :, 0]                # [R, G, Y]
    log_sigma = model.decoder.log_noise_as(y.dtype)[:, 0]                   # [R, 1, Y]
    inv_var = torch.exp(-2 * log_sigma)
    log_prior = model.prior().to(y.dtype).log_prob(nodes[:, :, None, :])[:, :, 0]   # [R, G]
    centre = mean.detach().mean(1, keepdim=True)                            # [R, 1, Y]
    mean, y = mean - centre, y - centre
    offset = (log_prior + grid.log_w.to(y.dtype) - log_sigma.sum(-1)
              - 0.5 * y.shape[-1] * math.log(2 * math.pi) - 0.5 * (mean * mean * inv_var).sum(-1))   # [R, G]
    exponent = torch.baddbmm(offset[:, None, :], y * inv_var, mean.transpose(1, 2))             # [R, B, G]
    return LogSumExp.apply(exponent) - 0.5 * (y * y * inv_var).sum(-1)


class LogSumExp(torch.autograd.Function):
    """log sum_g exp(x_g) over the last axis, keeping the normalized weights from the
    forward pass for the backward (torch.logsumexp recomputes exp(x - lse) there:
    measured, the two exps over [R, B, G] were 40% of an exact-objective step)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        peak = x.amax(-1, keepdim=True)
        weights = (x - peak).exp_()
        total = weights.sum(-1, keepdim=True)
        ctx.save_for_backward(weights.div_(total))
        return (total.log_() + peak).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (weights,) = ctx.saved_tensors
        return weights * grad[..., None]


def as_batch(y, R: int, device) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y, dtype=np.float64), dtype=F64, device=device)
    y = y.reshape(len(y), -1)                                  # [N, Y]
    return y[None].expand(R, *y.shape)                         # [R, N, Y]


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
              elbo_chunk: int = 128, elbo_budget: int = 16_000_000, q=None) -> "Integrals":
    """log p(y) and, if `elbo`, the ELBO of every point by the fine and the coarse
    rule on one grid: the decoder is evaluated once, and the gap log p - ELBO is
    KL(q(z|y) || p(z|y)) computed on the same nodes. `q` (batch over y, [R, 1, N, K, D])
    replaces the encoder's posterior in the ELBO (the gap decomposition's optimized q).
    q is read through the latent-distribution protocol only (model/distributions.py)."""
    mean, inv_sigma, offset = _grid_terms(model, grid.nodes)
    R, G = grid.log_w.shape
    y = as_batch(y, R, grid.nodes.device)
    order = torch.argsort(y[0, :, 0])          # sorted y: neighbours share a narrow window of q's mass
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
        # ELBO in sub-chunks of sorted points that share q's window and stride (128: measured best, 0.4-0.6 s per model)
        for e in range(0, yc.shape[1] if elbo else 0, elbo_chunk):
            sub = slice(e, e + elbo_chunk)
            q_sub = None if q is None else q.select(slice(s + e, s + min(e + elbo_chunk, yc.shape[1])))
            _elbo_chunk(model, yc[:, sub], grid, terms[:, :, sub], log_p[:, sub], parts, elbo_budget, q_sub)
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
    taken a few at a time so that the [R, nodes, points, K] terms stay within
    `budget` elements, however wide the window (memory is bounded; the result
    does not depend on the split: every point's sum is its own). In 2-D the nodes
    follow each stratum of q instead (stratum_trapezoid_elbo)."""
    q = model.posterior(y).to(F64) if q is None else q
    rule = q.base_rule(RULE_NODES)
    if rule is not None:
        return _piecewise_elbo_chunk(model, y, q, rule, parts)
    if len(grid.axes) > 1:
        return stratum_trapezoid_elbo(model, y, q, parts)
    axis = grid.axes[0]
    h = axis[:, 1] - axis[:, 0]                                         # [R]
    q_lo, q_hi = box(*q.reach(span))
    i0 = int(((q_lo[:, 0] - axis[:, 0]) / h).floor().clamp(min=0).min())
    i1 = min(int(((q_hi[:, 0] - axis[:, 0]) / h).ceil().max()) + 1, axis.shape[1])
    core = grid.core
    mass = torch.exp(terms[:, core] + grid.log_w[:, core, None] - log_p[:, None])   # posterior mass per node
    prior = model.prior().to(F64)        # a prior with kinks (a VampPrior of flows) sets a stride too
    scale = torch.stack([q.resolution().min(), prior.resolution().min(), _posterior_scale(mass, h).min()]).min()
    stride = max(1, int(scale / (per_scale * h.max())))
    fine, coarse = slice(i0, i1, stride), slice(i0, i1, 2 * stride)
    weights = (h * stride, h * 2 * stride)
    n_nodes = len(range(i0, i1, stride))
    R, n, K = y.shape[0], y.shape[1], q.strata
    step = max(1, budget // (R * n_nodes * K))
    for s in range(0, n, step):
        sub = slice(s, s + step)
        qs = q.select(sub)
        for suffix, idx, w in (("", fine, weights[0]), ("_coarse", coarse, weights[1])):
            nodes, t = grid.nodes[:, idx], terms[:, idx, sub]
            q_dens = qs.density(nodes[:, :, None, :])                       # [R, G', n]
            w = w[:, None, None] if w.dim() == 1 else w[:, :, None]
            positive = q_dens > 0
            log_q = torch.log(torch.where(positive, q_dens, torch.ones_like(q_dens)))
            integrand = torch.where(positive, q_dens * (t - log_q), torch.zeros_like(q_dens))
            parts["elbo" + suffix].append((integrand * w).sum(1))
            if suffix == "":
                parts["q_mass"].append((q_dens * w).sum(1))


def _piecewise_elbo_chunk(model: VAE, y: torch.Tensor, q, rule, parts: dict) -> None:
    """The ELBO of a q that is only piecewise smooth (a spline flow), by its own rule
    over the standard-normal draws (`base_rule`): Gauss-Legendre on each piece, with
    RULE_NODES nodes per piece for the value and half as many for the error bound.
    On a normal or mixture prior the integrand is smooth on each piece, and the rule
    matched a 400,001-node trapezoid reference to 2e-6 nats (the float32 decoder).
    A VampPrior of flows has knots of its own inside q's pieces: measured, the
    16-node rule was then off by up to 3e-5 nats and |16 - 8 nodes| fell short of
    that by up to 1.5x, so for a prior that is not smooth the coarse value is moved
    out to three times the difference (the reported error bound, KINKED_BOUND)."""
    fine, coarse = (rule_elbo(model, y, q, r) for r in (rule, q.base_rule(RULE_NODES // 2)))
    if not model.prior().smooth:
        coarse = fine + KINKED_BOUND * (coarse - fine)
    parts["elbo"].append(fine)
    parts["elbo_coarse"].append(coarse)
    parts["q_mass"].append((rule[1] * q.stratum_weights()).sum((1, 2)))


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
        parts["elbo" + suffix].append(torch.cat(values, 1))


def rule_elbo(model: VAE, y: torch.Tensor, q, rule) -> torch.Tensor:
    """The ELBO by a rule over each stratum's standard-normal draws, (eps, weights): [R, B]."""
    eps, w = rule
    log_w, pi = log_weights(model, y, eps, q)                              # [R, J, K, B]
    return (log_w * pi * w).sum((1, 2))


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


def hermite_rule(n: int, dim: int, dtype=torch.float64):
    """Nodes [J, D] and weights [J] for E_{N(0, I_D)}[g] with J = n^D."""
    x, w = np.polynomial.hermite.hermgauss(n)
    x, w = x * math.sqrt(2.0), w / math.sqrt(math.pi)
    grids = np.meshgrid(*([x] * dim), indexing="ij")
    nodes = np.stack([g.reshape(-1) for g in grids], -1)
    weights = np.prod(np.stack(np.meshgrid(*([w] * dim), indexing="ij"), -1).reshape(-1, dim), -1)
    return torch.as_tensor(nodes, dtype=dtype), torch.as_tensor(weights, dtype=dtype)
