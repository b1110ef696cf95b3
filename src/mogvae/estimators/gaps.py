"""Where a VAE's shortfall comes from, per test point, in nats.

    log p*(y) - ELBO(y) =  [log p*(y)     - log p_MLE(y)]    misspecification
                         + [log p_MLE(y)  - log p_theta(y)]  over-regularization
                         + [log p_theta(y) - ELBO*(y)]       approximation gap
                         + [ELBO*(y)      - ELBO(y)]         amortization gap

p_MLE is the exact-likelihood oracle of the same prior and decoder family
(train.objective = "exact"), so the first two terms pair two runs (the study
does that: `decomposition`). The last two need only the model: ELBO*(y) is the
ELBO of the best q of the posterior's family for that one point, found here by
optimizing q's parameters (the encoder's raw output for that point: a mixture's
logits, locations and scales, a flow's spline) by a batched per-point L-BFGS, from
the encoder's output, for a mixture in 1-D from the exact posterior's shape, and from
eval.gap_starts perturbations of the encoder's output; then from its neighbours' best;
then once more from its own best with a tighter stop (the polish). The search climbs the ELBO of q by a
rule that resolves q: for a mixture in 1-D, Gauss-Legendre on panels cut at every component's own scale
(panel_elbo; within 2e-7 nats of evaluation's grid rule on trained mixtures); for one Gaussian in 1-D,
Gauss-Hermite on q's scale blended into the trapezoid on a grid that resolves the decoder as q widens
(gaussian_rule.py; from there, for a Gaussian, also two starts from a lattice of Gaussians); otherwise
Gauss-Hermite over the standard-normal draws of each stratum of q (its nodes follow q, so a narrowing q
cannot slip between them; 16 an axis for a mixture in 2-D, MIXTURE_NODES_2D), or a flow's own rule on its
spline's pieces. With a 1-D latent the searches before the polish
read the decoder from a table (tabulated.py: 1.3-1.8x less CPU on trained runs); the polish runs on the
network.

A mixture's search climbed Gauss-Hermite (12 nodes a component) until 2026-12-07. Its log q(z) has bumps as
narrow as its narrowest component wherever that sits, which a wide component's nodes step over: the search
climbed a rule that is not the ELBO, and every start reached optima of that rule. Measured on a noise-study
sigma = 0.03 mixture-posterior run (10 components, 20 points x 10 replicas, benchmarks/experiments/
gap_search_rule.py and gap_search_many_starts.py, scored by the grid rule): the better of that search's ELBO* and
the best of 10 more starts on its rule was 2.7e-3 nats below this one's on average (up to 7.5e-2; the 10
starts had added 9e-5); against 12 starts searched on panels to a 100x tighter stop,
this search fell short by over 1e-5 at 11 of 200 point-replicas (3 by over 1e-4, 1 by 5.6e-3), a
replica's mean ELBO* by at most 3.3e-4; with the preconditioned L-BFGS (_metric) at 4 of 200 (2 by over
1e-4, none by 1e-3), a replica's mean by at most 5.2e-5 (the old search, against its own rule's starts: over 1e-5 at about
a quarter, a replica's mean by up to 3.0e-3). It costs 3.5x the old search's time there (24 s against 7 s).
On reproduce's trained mixture-posterior run (500 points x 5 replicas, one thread): ELBO* 3.0e-4 nats
higher on average (up to 2.3e-2; nowhere lower by over 2.1e-6), a replica's mean up to 6.8e-4, for 203 s
of search against 80 s (its tight polish on the decoder's table, then the network's at the search's own
stop: _table_first; 329 s with the tight polish on the network alone). Then the L-BFGS preconditioned
(_metric), its line search computing only what it uses, the panel terms by one multiply-add and chunks
that stay in the caches (_points_per_chunk): `mogvae reproduce`'s gap search 471 -> 189 s summed over its
runs (docs/speed.md).
ELBO* is the best q the search found, not yet provably the family's best to 1e-5.

The two starts, measured on a 2-D ring CSV (5 replicas, 1-D latent; the best of every
search and 4 perturbed starts as the reference; benchmarks/experiments/gap_search_starts.py):
the mean-field Gaussian (200 points), the Adam search this replaced fell short of it by
5.9e-2 nats on average and up to 15.5 (a Gaussian q stuck in a bimodal posterior's lesser
mode), these by 2.1e-7 and at most 4.2e-6, in 2.2 s against 3.2; a 10-component mixture
(100 points), Adam 1.1e-2 on average (up to 2.4), these 4.3e-4 (up to 0.13), in 26.8 s
against 23.9. Neither start alone comes close: the encoder's 8.9e-3, the posterior's 1.3e-2.

The decomposition telescopes: the four terms sum to log p* - ELBO exactly, on
the same points. log p_theta and ELBO come from the evaluation's grid rule;
ELBO* from the same grid rule applied to the optimized q, whose error bound is
reported as `gap_rule_error` (the accuracy of the split between the last two
terms; their sum does not depend on it). The search's rules (search_elbo) only steer the search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..model.distributions import gauss_legendre
from ..model.flows import LOG_SQRT_2PI
from ..model.layers import replica_count
from ..model.mixtures import DiagMixture
from ..model.posteriors import MIN_SCALE, MixturePosterior, raw_scale
from ..model.vae import VAE
from ..objectives.bounds import log_weights
from .quadrature import F64, _refined_elbo, as_batch, hermite_rule, integrate, latent_grid, log_joint, node_sum, rule_elbo
from .gaussian_rule import (forget_cache, gaussian_elbo, gaussian_value_and_gradient, is_gaussian_1d,
                            lattice_starts)
from .tabulated import tabulated

TOLERANCE = 1e-5    # nats: a point stops when its best ELBO rose by less over LBFGS_PATIENCE checks
MAX_STEPS = 1000    # L-BFGS iterations at most (eval.gap_steps)
NODES = {1: (12, 64), 2: (8, 24)}   # Gauss-Hermite nodes per axis: (while optimizing, reported)
# A mixture in 2-D optimizes on 16 (_search_nodes): its log q(z) has bumps as narrow as its narrowest
# component, which a wide component's 8 x 8 nodes step over, and the search climbed into q's whose ELBO the
# rule got wrong. Measured on the tabular study's diabetes mixture posterior at d_z = 2 (8 points x 10
# replicas, scored by the grid rule): the 8-node search's ELBO* 1.4e-3 nats below the 16-node one's on
# average (up to 2.9e-2; over 1e-5 at 67 of 80), its grid rule's error up to 0.21 nats (the 16-node's
# 7.9e-5); 12 nodes 5.3e-4 below, 0.18; a 16-node polish after the 8-node search 8.8e-4 below, 0.32.
# It costs 5.6x the 8-node search's time there (213 s against 38).
MIXTURE_NODES_2D = 16
PIECE_NODES = (8, 16)   # for a piecewise-smooth q, Gauss-Legendre nodes per piece (while optimizing, reported)
# a mixture in 1-D: breakpoints per component over +-PANEL_SPAN scales, Gauss-Legendre nodes per panel between
# them (while optimizing, reported): within 6e-6 and 2e-7 nats of the grid rule on trained mixtures (mixture_panels)
PANELS = ((7, 4), (11, 4))
PANEL_SPAN = 6.0


@dataclass(frozen=True)
class BestPosterior:
    """Per replica and point, [R, N]: the ELBO of the optimized q and of the
    encoder's q (both by search_elbo's reporting rule), the steps taken,
    and the optimized q itself (a distribution with batch [R, 1, N])."""
    elbo_star: torch.Tensor
    elbo_encoder: torch.Tensor
    steps: int
    converged: bool
    q: object
    raw: torch.Tensor        # [R, N, P]: the optimized q's parameters, the input of posterior.from_raw


def search_elbo(model: VAE, y: torch.Tensor, q, n_nodes: int) -> torch.Tensor:
    """ELBO(q) by the rule the gap search climbs and keeps its best by, for q's family: for one Gaussian in
    1-D, gaussian_rule's (whatever n_nodes); for a mixture in
    1-D, panel_elbo's (the searching rule for n_nodes < 32, the reporting one beyond); for a piecewise-smooth
    q (a flow), its own Gauss-Legendre rule with n_nodes / 8 nodes per piece; otherwise
    sum_k pi_k E_{q_k}[log p(y, z) - log q(z)] by an n_nodes Gauss-Hermite rule per axis on the
    standard-normal draws of each stratum. y [R, B, Y] -> [R, B], differentiable in q. (Named hermite_elbo
    until the other rules came.)"""
    R, B = y.shape[:2]
    K, D = q.strata, q.dim
    if is_gaussian_1d(q):
        return gaussian_elbo(model, y, q)
    if _by_panels(q):
        return panel_elbo(model, y, q, PANELS[n_nodes >= 32])
    rule = q.base_rule(PIECE_NODES[n_nodes >= 32])   # a piecewise-smooth q (a flow): Gauss-Legendre on its pieces
    if rule is not None:
        return rule_elbo(model, y, q, rule)
    nodes, weights = hermite_rule(n_nodes, D)
    nodes, weights = nodes.to(y.device), weights.to(y.device)
    eps = nodes[None, :, None, None, :].expand(R, -1, K, B, D)
    log_w, pi = log_weights(model, y, eps, q)                      # [R, J, K, B]
    return node_sum((log_w * pi * weights[None, :, None, None]).flatten(1, 2))   # batch-independent (node_sum)


def _by_panels(q) -> bool:
    """Whether q's ELBO is taken on panels (mixture_panels) rather than by Gauss-Hermite per component: a
    mixture of two or more components in 1-D. Its log q(z) has features as narrow as its narrowest
    component wherever that sits, and a wide component's Gauss-Hermite nodes step over them: the search
    climbed a rule that is not the ELBO (measured on a sigma = 0.03 mixture-posterior run, 200
    point-replicas: its ELBO* 1.3e-3 nats below the family's best on average, up to 3.4e-2;
    benchmarks/experiments/gap_search_rule.py). A single Gaussian's integrand is smooth on its own scale."""
    return isinstance(q, DiagMixture) and q.dim == 1 and q.strata > 1


def mixture_panels(q: DiagMixture, rule: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes z and weights [R, B, S] for the integral over z of a function that is smooth between the
    breakpoints loc_k + scale_k * t, t in `rule[0]` points over +-PANEL_SPAN, of every component k of a 1-D
    mixture q (batch [R, 1, B]): Gauss-Legendre with `rule[1]` nodes on each panel between consecutive
    breakpoints, sorted per point. Each component's neighbourhood is cut into panels of at most its own
    spacing, so every feature of q and log q is resolved wherever it lies; beyond the breakpoints q's mass
    is below 2e-9 of a component's."""
    breaks, per_panel = rule
    t = torch.linspace(-PANEL_SPAN, PANEL_SPAN, breaks, dtype=q.loc.dtype, device=q.loc.device)
    loc, scale = q.loc[:, 0, :, :, 0], q.scale[:, 0, :, :, 0]                        # [R, B, K]
    edges = torch.sort((loc[..., None] + scale[..., None] * t).flatten(2), -1).values  # [R, B, K * breaks]
    x, w = (torch.as_tensor(a, dtype=loc.dtype, device=loc.device) for a in gauss_legendre(per_panel))
    a, h = edges[..., :-1, None], (edges[..., 1:] - edges[..., :-1])[..., None]       # [R, B, P, 1]
    return (a + h * (x + 1) / 2).flatten(2), (h * w / 2).flatten(2)                   # [R, B, P * n] each


def panel_elbo(model: VAE, y: torch.Tensor, q: DiagMixture, rule: tuple[int, int]) -> torch.Tensor:
    """The ELBO of a 1-D mixture q, sum_z W_z q(z) (log p(y, z) - log q(z)) on mixture_panels' nodes:
    y [R, B, Y] -> [R, B], differentiable in q. Each point's value and gradient are bitwise the same in
    any batch: its nodes lie on the last axis, so that every sum autograd takes over them (a component's
    parameters broadcast to the nodes) runs within the point's own row, and node_sum adds the terms."""
    z, weights = mixture_panels(q, rule)                                              # [R, B, S]
    loc, inverse = q.loc[:, 0, :, :, :1], 1 / q.scale[:, 0, :, :, :1]                  # [R, B, K, 1]
    # per component, then per node by one multiply-add: the [R, B, K, S] terms and their gradients are most
    # of the search's arithmetic (the division's gradient alone was 18% of the search's time)
    constant = torch.log_softmax(q.logits[:, 0], -1)[..., None] + torch.log(inverse) - LOG_SQRT_2PI
    standard = (z[:, :, None] - loc) * inverse
    log_components = torch.addcmul(constant, standard, standard, value=-0.5)            # [R, B, K, S]
    log_q = torch.logsumexp(log_components, 2)                                         # [R, B, S]
    nodes = z.transpose(1, 2)[..., None]                                               # [R, S, B, 1]
    log_p = (model.decoder.log_prob(y, nodes) + model.prior().to(z.dtype).log_prob(nodes)).transpose(1, 2)
    return node_sum((weights * torch.exp(log_q) * (log_p - log_q)).transpose(1, 2))


def best_posterior(model: VAE, y, max_steps: int = MAX_STEPS, tolerance: float = TOLERANCE,
                   chunk: int | None = None, progress=None, starts: int = 0) -> BestPosterior:
    """ELBO*(y): the best q of the posterior's family for each point, from the encoder's
    output (and the posterior's shape, and `starts` perturbations of the encoder's output) by L-BFGS on the
    ELBO by search_elbo's rule, keeping each point's best iterate, then from its neighbours' best where that
    is better (_from_neighbours), then searched on (_polished). Points are taken `chunk` at a time (by
    default as many as _points_per_chunk finds fast);
    `progress(done, total)` is called after each chunk of the first searches and of each polish, in points
    (total: twice their number, the polish being a point's second search; three times for a 1-D mixture
    on a table, polished on the table and then on the network: _table_first)."""
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    forget_cache()                  # the Gaussian rule's grids and log p, of models that may have changed since
    try:
        y = as_batch(y, replica_count(model), next(model.parameters()).device)
        search = tabulated(model)     # with a 1-D latent, the decoder read from a table (tabulated.py)
        with torch.no_grad():
            first = model.posterior(y[:, :1])     # the encoder's q at the first point: its rule is the search's
        panels = _by_panels(first)
        table_first = _table_first(model, search, panels)
        chunk = chunk or _points_per_chunk(first.strata if panels else 0, y.shape[0])
        parts, n = [], y.shape[1]
        for s in range(0, n, chunk):
            parts.append(_optimize(search, y[:, s:s + chunk], max_steps, tolerance, starts, first=s))
            if progress:
                progress(min(s + chunk, n), (3 if table_first else 2) * n)
        star, raw, steps = _from_neighbours(search, y, torch.cat([p[0] for p in parts], 1),
                                            torch.cat([p[4] for p in parts], 1), max_steps, tolerance, chunk)
        stop, done = tolerance / POLISH, n
        if table_first:                                    # the tight polish on the table first
            star, raw, polish_steps = _polished(search, y, star, raw, max_steps, stop, chunk,
                                                progress and (lambda at: progress(n + at, 3 * n)))
            steps, stop, done = max(steps, polish_steps), tolerance, 2 * n
        # the polish on the network itself, whose float32 staircase the smooth table does not have. Its first
        # check scores each start on the network, and it never returns less: so after a table's search its
        # result replaces the table's scores (no second scoring of every point beforehand)
        if search is not model:
            star = torch.full_like(star, -math.inf)
        star, raw, polish_steps = _polished(model, y, star, raw, max_steps, stop, chunk,
                                            progress and (lambda at: progress(done + at, done + n)))
        steps = max(steps, polish_steps)
    finally:
        forget_cache()
        for p in model.parameters():
            p.requires_grad_(True)
    return BestPosterior(star, torch.cat([p[1] for p in parts], 1), max(steps, *(p[2] for p in parts)),
                         all(p[3] for p in parts), model.posterior.from_raw(raw), raw)


@torch.no_grad()
def _scored(model: VAE, y: torch.Tensor, raw: torch.Tensor, chunk: int) -> torch.Tensor:
    """The ELBO of each point's q raw [R, N, P] by search_elbo's reporting rule: [R, N]."""
    _, final = NODES[model.latent_dim]
    return torch.cat([search_elbo(model, y[:, s:s + chunk], model.posterior.from_raw(raw[:, s:s + chunk]), final)
                      for s in range(0, y.shape[1], chunk)], 1)


NEIGHBOUR_SWEEPS = 4    # passes at most in which points try their neighbours' best q as a start


def _from_neighbours(model: VAE, y: torch.Tensor, best: torch.Tensor, raw: torch.Tensor, max_steps: int,
                     tolerance: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each point's best (by the reporting rule), its q [R, N, P] and the most L-BFGS iterations taken, after
    trying, as a start, the best q of its neighbours in y (sorted by y's first coordinate) wherever that q
    is already better at this point: a point's own starts can leave it in a lesser optimum that a neighbour
    escaped. Repeated while a pass gains, up to NEIGHBOUR_SWEEPS. Measured on the noise study's sigma = 0.03
    mixture-posterior run (100 points x 10 replicas): one pass from both neighbours, unscreened, raised
    ELBO* by 6.5e-4 nats on average (up to 0.2); one screened pass (searching from 7% of the points) by
    5.4e-4; the screened passes repeated, as here, by 1.5e-3, at no measurable cost. A point's ELBO*
    then depends on the other gap points (its starts come from them), but not on how they are chunked: for
    every step of the search is computed per point, bitwise the same in any batch (_value_and_gradient,
    node_sum, _encoder_start; test_a_points_best_q_is_bitwise_the_same_whatever_its_batch)."""
    order = torch.argsort(y[0, :, 0])
    inverse = torch.argsort(order)
    y, best, raw = y[:, order], best[:, order].clone(), raw[:, order].clone()
    steps = 0
    for _ in range(NEIGHBOUR_SWEEPS):
        gained = False
        for shift in (1, -1):
            start = torch.roll(raw, shift, 1)
            there = _scored(model, y, start, chunk)
            points = torch.nonzero((there > best + tolerance).any(0))[:, 0]
            for s in range(0, len(points), chunk):
                at = points[s:s + chunk]
                value, x, iters, _ = _lbfgs(model, y[:, at], start[:, at], max_steps, tolerance)
                steps = max(steps, iters)
                gained = _keep_better(best, raw, at, value, x) or gained
        if not gained:
            break
    return best[:, inverse], raw[:, inverse], steps


def _keep_better(best: torch.Tensor, raw: torch.Tensor, at, value: torch.Tensor, x: torch.Tensor) -> bool:
    """Where a search's `value` [R, n] beats best[:, at], keep it and its q x [R, n, P] in best and raw
    (in place; `at` a slice or indices of the points); whether any point gained."""
    better = value > best[:, at]
    best[:, at] = torch.where(better, value, best[:, at])
    raw[:, at] = torch.where(better[..., None], x, raw[:, at])
    return bool(better.any())


CHUNK = 250                 # points searched together at most
SEARCH_TERMS = 1_000_000    # a mixture's [R, B, K, S] panel terms in a chunk, at most


def _points_per_chunk(components: int, replicas: int) -> int:
    """Points to search together: CHUNK, or for a q of `components` on panels (_by_panels; 0 for another
    rule) as many as keep its search's panel terms within SEARCH_TERMS. Larger tensors leave the
    caches: on reproduce's trained mixture runs (one thread, 200 points x 5 replicas, the same search bitwise
    in any chunks) the search took 38.1 s in chunks of 250, 27.5 s of 50 and 27.6 s of 100 (mog-posterior),
    58.6 / 45.3 / 44.2 s (mog-both); on a 10-replica run (100 points), 48.2 s in one chunk, 38.4 s in chunks
    of 50 and 39.9 s of 25. At K = 10 this is 72 points of 5 replicas, 36 of 10."""
    if not components:
        return CHUNK
    breaks, per_panel = PANELS[0]
    terms = replicas * components * (breaks * components - 1) * per_panel       # per point: R x K x S
    return max(1, min(CHUNK, SEARCH_TERMS // terms))


POLISH = 100        # the polishing search's stop: `tolerance` / POLISH over LBFGS_PATIENCE checks


def _table_first(model: VAE, search, panels: bool) -> bool:
    """Whether the search polishes on the decoder's table (`search`, where it is one) before the network:
    where q is taken on panels (`panels`: _by_panels, judged from the encoder's q at the first point). The
    tight polish then runs on the table, and the network's after it stops at the search's own tolerance: the
    network costs every one of the panel rule's nodes. Measured on reproduce's trained mixture-posterior run
    (one thread): a tight polish on the network alone took 57 s of search on 100 points x 5 replicas and 329 s
    on 500, the two stages 36.7 s and 203 s, their ELBO* within 7.9e-6 of it at every point-replica (2,500).
    On the tests' steep random models the polish on the table alone was not enough (a search on from its
    result on the network gained 2e-4); with the network's stage after it, nothing does."""
    return search is not model and panels


def _polished(model: VAE, y: torch.Tensor, best: torch.Tensor, raw: torch.Tensor, max_steps: int, stop: float,
              chunk: int, progress=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each point's best after one more L-BFGS from it, with fresh curvature pairs and the stop `stop`
    (tolerance / POLISH, but for the network's stage after a table's tight polish: _table_first): a search that
    gains a little per check stops (by its tolerance) while it still climbs, and its last pairs can steer it slowly. Measured on the noise study's sigma = 0.03 mixture-posterior run (20
    points x 10 replicas): searching on from the saved ELBO*'s q raised it by over 1e-5 nats at 47 of 200
    point-replicas (benchmarks/experiments/gap_search_many_starts.py). `progress(points done)` after each chunk."""
    steps = 0
    for s in range(0, y.shape[1], chunk):
        at = slice(s, s + chunk)
        value, x, iters, _ = _lbfgs(model, y[:, at], raw[:, at], max_steps, stop)
        _keep_better(best, raw, at, value, x)
        steps = max(steps, iters)
        if progress:
            progress(min(s + chunk, y.shape[1]))
    return best, raw, steps


START_SCALE = 0.3   # eval.gap_starts' perturbations of the encoder's raw q: the scale that found most optima
START_SEED = 20261206


def _perturbed(start: torch.Tensor, count: int, first: int) -> list[torch.Tensor]:
    """`count` starts [R, B, P]: `start` plus START_SCALE x standard-normal noise, the noise of the point at
    index first + i from its own stream (SeedSequence(START_SEED, first + i)), so that a point's starts do
    not depend on the other points or the chunks."""
    if count == 0:
        return []
    R, B, P = start.shape
    noise = np.stack([np.random.default_rng([START_SEED, first + i]).standard_normal((count, R, P)) for i in range(B)], 2)
    return list(start + START_SCALE * torch.as_tensor(noise, dtype=start.dtype, device=start.device))


def _optimize(model: VAE, y: torch.Tensor, max_steps: int, tolerance: float, extra: int = 0, first: int = 0):
    """Each point's best q: L-BFGS from the encoder's q, from `extra` perturbations of it (_perturbed; the
    points' indices begin at `first`), and, for a mixture in 1-D, from the exact posterior's shape
    (_posterior_starts), keeping each point's best by the reporting rule."""
    _, final = NODES[model.latent_dim]
    posterior = model.posterior
    start = _encoder_start(model, y)                       # [R, B, out]: the encoder's q for each point
    starts = [start, *_posterior_starts(model, y), *_perturbed(start, extra, first)]
    best, best_raw, steps, converged = None, None, 0, True
    for x0 in starts:
        value, raw, iters, stopped = _lbfgs(model, y, x0, max_steps, tolerance)
        if best is None:
            best, best_raw = value, raw
        else:
            better = value > best
            best, best_raw = torch.where(better, value, best), torch.where(better[..., None], raw, best_raw)
        steps, converged = max(steps, iters), converged and stopped
    with torch.no_grad():
        encoder = search_elbo(model, y, posterior.from_raw(start), final)
    # the encoder's q is the first candidate: ELBO* >= its ELBO by the same rule
    return best, encoder, steps, converged, best_raw


@torch.no_grad()
def _encoder_start(model: VAE, y: torch.Tensor) -> torch.Tensor:
    """The encoder's raw q at each point of y [R, B, Y], one point at a time: [R, B, P] in float64. MKL's
    small products take paths that round by their number of rows (up to 1e-6 in a row of a 16 x 2 product
    measured between 5 and 16 rows), and the search would amplify a start's rounding; a product of fixed shape
    rounds the same every time (a millisecond per 20 points)."""
    return torch.cat([model.posterior.raw(y[:, i:i + 1]) for i in range(y.shape[1])], 1).to(F64)


MEMORY = 10         # L-BFGS: curvature pairs kept per point
BACKTRACKS = 6      # trial steps per iteration (each a tenth of the last) before a point keeps its lowest
ARMIJO = 1e-4       # sufficient decrease, beyond the rounding of the objective:
NETWORK_ROUNDING = 1e-6   # relative, the float32 decoder's (a tabulated one's: tabulated.SearchModel.rounding)
LBFGS_CHECK = 5     # iterations between the reporting rule's checks
LBFGS_PATIENCE = 2  # checks over which a point must gain `tolerance`, or it stops


def _lbfgs(model: VAE, y: torch.Tensor, start: torch.Tensor, max_iters: int, tolerance: float):
    """L-BFGS on each point's raw q from `start` [R, B, P], batched: every point (of every replica) has
    its own curvature pairs, line search and stopping, and only points still moving are computed, so
    no point's search depends on the others'. Keeps each point's best by the reporting rule; a point
    stops once that rose by less than `tolerance` over LBFGS_PATIENCE checks. Returns (best [R, B], its raw
    q [R, B, P], iterations, whether every point stopped by the tolerance before max_iters)."""
    fast, final = _search_nodes(model, start)
    posterior = model.posterior

    def objective(x, yy, grad: bool):
        if not grad:
            with torch.no_grad():
                return -search_elbo(model, yy, posterior.from_raw(x), fast)
        return _value_and_gradient(model, yy, x, fast)

    R, B, P = start.shape
    x = start.clone()
    f, g = objective(x, y, True)
    S, Y = torch.zeros(R, B, MEMORY, P, dtype=F64, device=y.device), torch.zeros(R, B, MEMORY, P, dtype=F64, device=y.device)
    rho = torch.zeros(R, B, MEMORY, dtype=F64, device=y.device)
    best = torch.full((R, B), -math.inf, dtype=F64, device=y.device)
    best_x, active = x.clone(), torch.ones(R, B, dtype=torch.bool, device=y.device)
    history, it = [], 0
    while True:
        if it % LBFGS_CHECK == 0 or it == max_iters:
            moving = torch.nonzero(active.any(0))[:, 0]
            with torch.no_grad():
                value = search_elbo(model, y[:, moving], posterior.from_raw(x[:, moving]), final)
            better = (value > best[:, moving]) & active[:, moving]
            best[:, moving] = torch.where(better, value, best[:, moving])
            best_x[:, moving] = torch.where(better[..., None], x[:, moving], best_x[:, moving])
            history.append(best.clone())
            if len(history) > LBFGS_PATIENCE:
                active &= (best - history.pop(0)) >= tolerance
            if it == max_iters or not bool(active.any()):
                return best, best_x, it, not bool(active.any())
        moving = torch.nonzero(active.any(0))[:, 0]
        on = active[:, moving]
        xm, fm, gm, ym = x[:, moving], f[:, moving], g[:, moving], y[:, moving]
        Sm, Ym, rm = S[:, moving], Y[:, moving], rho[:, moving]
        d = -_two_loop(gm, Sm, Ym, rm, _metric(posterior, xm))
        slope = (gm * d).sum(-1)
        uphill = ~(slope < 0)                  # not a descent direction: steepest descent instead
        d = torch.where(uphill[..., None], -gm / gm.norm(dim=-1, keepdim=True).clamp_min(1.0), d)
        d = torch.where(on[..., None], d, 0.0)     # a stopped point in a moving column stays, its f and g with it
        slope = (gm * d).sum(-1)
        t, lowest_t, lowest = torch.ones_like(fm), torch.zeros_like(fm), fm.clone()
        accepted = ~on
        rounding = getattr(model, "rounding", NETWORK_ROUNDING) * fm.abs().clamp_min(1.0)
        # the full step with its gradient, which most points take (9 in 10 on a trained mixture); a trial step
        # after it is computed only for the points still backtracking. As a point's value and gradient do not
        # depend on the points computed beside it (_value_and_gradient), both leave every iterate bitwise as
        # it was, for 16% less time.
        full_f, full_g = objective(xm + d, ym, True)
        for b in range(BACKTRACKS):
            if b == 0:
                trial = full_f
            else:
                back = torch.nonzero((~accepted).any(0))[:, 0]
                trial = torch.full_like(fm, math.inf)
                trial[:, back] = objective(xm[:, back] + t[:, back, None] * d[:, back], ym[:, back], False)
            lower = (trial < lowest) & ~accepted
            lowest_t, lowest = torch.where(lower, t, lowest_t), torch.where(lower, trial, lowest)
            accepted = accepted | (trial <= fm + ARMIJO * t * slope + rounding)
            if bool(accepted.all()):
                break
            t = torch.where(accepted, t, 0.1 * t)
        stalled = on & ~(accepted & (t > 0))
        t = torch.where(on, torch.where(stalled, lowest_t, t), torch.zeros_like(t))   # stalled: its lowest (0: stay)
        x_new = xm + t[..., None] * d
        f_new, g_new = full_f, full_g
        shorter = torch.nonzero((on & (t != 1)).any(0))[:, 0]      # the points that did not take the full step
        if len(shorter):
            f_new[:, shorter], g_new[:, shorter] = objective(x_new[:, shorter], ym[:, shorter], True)
        s_, y_ = x_new - xm, g_new - gm
        sy = (s_ * y_).sum(-1)
        keep = (on & ~stalled & (sy > 1e-12))[..., None, None]
        Sm = torch.where(keep, torch.cat([Sm[:, :, 1:], s_[:, :, None]], 2), Sm)
        Ym = torch.where(keep, torch.cat([Ym[:, :, 1:], y_[:, :, None]], 2), Ym)
        rm = torch.where(keep[..., 0], torch.cat([rm[:, :, 1:], (1 / sy.clamp_min(1e-300))[..., None]], 2), rm)
        forget = stalled[..., None]            # a stalled point forgets its curvature: next, steepest descent
        S[:, moving] = torch.where(forget[..., None], 0.0, Sm)
        Y[:, moving] = torch.where(forget[..., None], 0.0, Ym)
        rho[:, moving] = torch.where(forget, 0.0, rm)
        x[:, moving], f[:, moving], g[:, moving] = x_new, f_new, g_new
        it += 1


def _search_nodes(model: VAE, raw: torch.Tensor) -> tuple[int, int]:
    """Gauss-Hermite nodes per axis (while optimizing, reported) for q's of raw parameters like `raw`
    [R, B, P]: NODES, but MIXTURE_NODES_2D while optimizing a mixture of two or more components in 2-D."""
    fast, final = NODES[model.latent_dim]
    if model.latent_dim == 2 and model.posterior.from_raw(raw[:, :1]).strata > 1:
        fast = MIXTURE_NODES_2D
    return fast, final


def _value_and_gradient(model: VAE, y: torch.Tensor, x: torch.Tensor, n_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The search's objective, -ELBO by search_elbo's rule with `n_nodes`, and its gradient in q's raw
    parameters x [R, B, P], each point's bitwise the same in any batch. Autograd sums a parameter's
    gradient over the nodes it was broadcast to by a reduction whose rounding depends on the batch (1e-16
    measured), which L-BFGS amplified into ELBO*s 4e-6 apart: for Gauss-Hermite and for a flow's rule each
    node holds its own copy of its point's parameters and node_sum adds their gradients; the panel rule
    keeps each point's nodes on its own row."""
    x = x.detach().requires_grad_(True)
    q = model.posterior.from_raw(x)
    if is_gaussian_1d(q):
        return gaussian_value_and_gradient(model, y, x)
    panels = _by_panels(q)
    rule = None if panels else q.base_rule(PIECE_NODES[n_nodes >= 32])   # a flow's own rule, from x
    if (panels or rule is not None) and x.shape[1] == 1:
        # with one point, torch runs some of these sums over a contiguous axis, which it adds up in another
        # order than for two or more points (2e-16 apart, amplified by L-BFGS into ELBO*s 1e-5 apart). A lone
        # point is searched as two copies of itself, so it rounds as it would among others.
        f, g = _value_and_gradient(model, y.expand(-1, 2, -1).contiguous(), x.detach().expand(-1, 2, -1).contiguous(), n_nodes)
        return f[:, :1], g[:, :1]
    if panels:
        f = -panel_elbo(model, y, q, PANELS[n_nodes >= 32])
        return f.detach(), torch.autograd.grad(f.sum(), x)[0]
    if rule is not None:
        return _flow_value_and_gradient(model, y, x, q, rule)
    R, B, P = x.shape
    nodes, weights = hermite_rule(n_nodes, model.latent_dim)
    J, D = nodes.shape
    copies = x[:, None].expand(R, J, B, P).reshape(R, J * B, P).detach().requires_grad_(True)
    q = model.posterior.from_raw(copies)
    eps = nodes.to(y.device)[:, None].expand(J, B, D).reshape(1, 1, 1, J * B, D).expand(R, 1, q.strata, J * B, D)
    log_w, pi = log_weights(model, y[:, None].expand(R, J, *y.shape[1:]).reshape(R, J * B, -1), eps, q)
    terms = (log_w * pi)[:, 0].reshape(R, q.strata, J, B) * weights.to(y.device)[:, None]    # [R, K, J, B]
    f = -node_sum(terms.transpose(1, 2).flatten(1, 2))     # added in search_elbo's order, to its bits
    g, = torch.autograd.grad(f.sum(), copies)
    return f.detach(), node_sum(g.reshape(R, J, B, P))


def _flow_value_and_gradient(model: VAE, y: torch.Tensor, x: torch.Tensor, q, rule) -> tuple[torch.Tensor, torch.Tensor]:
    """_value_and_gradient for a piecewise-smooth q (a flow) by its own rule, whose nodes follow its
    parameters (they lie on its spline's pieces), in two stages. Per point, from its raw parameters x: its
    location, scale, knots and rule. Per node: each of a point's J nodes computes its term from its own copy
    of those (SplineFlow.per_node), so that autograd sums nothing over nodes; node_sum adds the copies'
    gradients, and they flow back to x through the first stage (whose sums run over a piece's few
    Gauss-Legendre nodes, on a row of their own). A point's value and gradient are then bitwise the same in
    any batch (they were not when its parameters were broadcast over its nodes: 757 of 1,440
    point-replicas' gradients differed across batches of 1 to 40 points on the tests' flows), and its value
    is rule_elbo's: the same terms, added in the same order. x [R, B, P] requires its gradient; q is the
    flow of x and `rule` its base_rule, (eps [R, J, 1, B, 1], weights [R, J, 1, B])."""
    R, B, P = x.shape
    eps, weights = rule
    J = eps.shape[1]
    nodes, sources, leaves = q.per_node(J)                 # copy j B + b: node j of point b
    e = eps.detach().reshape(R, 1, 1, J * B, 1).requires_grad_(True)
    w = weights.detach().reshape(R, J, B).requires_grad_(True)
    log_w, pi = log_weights(model, y[:, None].expand(R, J, *y.shape[1:]).reshape(R, J * B, -1), e, nodes)
    f = -node_sum((log_w * pi).reshape(R, J, B) * w)
    *copied, g_e, g_w = torch.autograd.grad(f.sum(), [*leaves, e, w])
    # location and scale [R, 1, B, D] were copied on their point axis 2, the knots [R, B, D, K + 1] on axis 1
    per_point = [node_sum(g.reshape(R, J, *t.shape[2 if i < 2 else 1:])).reshape(t.shape)
                 for i, (g, t) in enumerate(zip(copied, sources))]
    g, = torch.autograd.grad([*sources, eps, weights], x, [*per_point, g_e.reshape(eps.shape), g_w.reshape(weights.shape)])
    return f.detach(), g


def _metric(posterior, x: torch.Tensor) -> torch.Tensor:
    """A diagonal guess D [R, B, P] at the inverse curvature of -ELBO in q's raw parameters x, up to a common
    factor, where L-BFGS's recursion starts (_two_loop): for a mixture, its components' squared scales s^2 for
    their locations and (s / sigmoid(h))^2 / 2 for their raw scales h (s = softplus(h) + MIN_SCALE); 1 for
    logits and for other families. For a Gaussian q of a Gaussian posterior these are the exact inverse
    curvatures at the optimum (1 / s^2 in the location, 2 in log s). A mixture's components can differ in
    scale by 1e3, so their locations' curvatures by 1e6, which the recursion's one scalar cannot meet. On reproduce's
    trained runs (100 points x 5 replicas, one thread, scored by the grid rule): mog-posterior's search 28.1
    -> 20.2 s, its ELBO* 1.4e-7 higher on average and within 1.1e-5 of the one without at every point;
    mog-both's 32.1 -> 30.8 s, 6.5e-7 higher on average, within 2.8e-5 (one point 2.2e-5 lower)."""
    D = torch.ones_like(x)
    if not isinstance(posterior, MixturePosterior):
        return D
    kd = posterior.k * posterior.d
    h = x[..., kd:2 * kd]
    s = torch.nn.functional.softplus(h) + MIN_SCALE
    D[..., :kd] = s ** 2
    # a scale at its floor (s near MIN_SCALE) hardly moves with h, so its inverse curvature grows without end
    # (and sigmoid(h) underflows below h = -745): capped at 1e8, reached near h = -19, where the floor is all
    # but the whole scale
    D[..., kd:2 * kd] = ((s / torch.sigmoid(h)) ** 2 / 2).clamp(max=1e8)
    return D


def _two_loop(g: torch.Tensor, S: torch.Tensor, Y: torch.Tensor, rho: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """L-BFGS's two-loop recursion per point: H g from the pairs S, Y [R, B, M, P] (newest last; unused
    pairs are zero, with rho 0, and drop out), starting from the diagonal D (_metric) scaled by the newest
    pair's s.y / y.D.y (without one, by 1 / |D^1/2 g|: a first step of length at most 1 in D's metric)."""
    q, alphas = g.clone(), []
    for i in reversed(range(S.shape[2])):
        a = rho[..., i] * (S[..., i, :] * q).sum(-1)
        q = q - a[..., None] * Y[..., i, :]
        alphas.append(a)
    sy, yy = (S[..., -1, :] * Y[..., -1, :]).sum(-1), (D * Y[..., -1, :] ** 2).sum(-1)
    gamma = torch.where(sy > 0, sy / yy.clamp_min(1e-300), 1.0 / (D.sqrt() * g).norm(dim=-1).clamp_min(1.0))
    r = q * gamma[..., None] * D
    for i in range(S.shape[2]):
        b = rho[..., i] * (Y[..., i, :] * r).sum(-1)
        r = r + (alphas[-1 - i] - b)[..., None] * S[..., i, :]
    return r


def _posterior_starts(model: VAE, y: torch.Tensor) -> list[torch.Tensor]:
    """More starts for a mixture q in 1-D, from the exact posterior on a grid (of the network, where
    `model` is its SearchModel): for K equal-weight components, the K quantiles (k + 1/2) / K, each with
    the scale of a Gaussian of its weight and the posterior's density there; for one component, the
    posterior's highest mode, and the best by the search's rule of a lattice of Gaussians
    (gaussian_rule.lattice_starts). The encoder's q can sit in the lesser mode of a bimodal posterior, from
    which no local search leaves (measured on the 2-D ring: up to 15.5 nats between local optima). None
    ([]) for other families and latents."""
    posterior = model.posterior
    if not isinstance(posterior, MixturePosterior) or posterior.learn_weights or model.latent_dim != 1:
        return []
    network = getattr(model, "network", model)
    grid = latent_grid(network, START_GRID, 8.0)            # the prior's window: the same for every point
    z, h = grid.axes[0], grid.axes[0][:, 1] - grid.axes[0][:, 0]                  # [R, G], [R]
    # each point's nodes contiguous, so that its softmax and cumulative sum do not round with the batch
    log_joints = log_joint(network, y[0], grid.nodes).transpose(1, 2).contiguous()
    density = torch.softmax(log_joints, -1) / h[:, None, None]                  # [R, B, G]
    mass = density * h[:, None, None]
    K = posterior.k
    if K == 1:
        mode = density.argmax(-1)                                               # [R, B]
        loc, peak = torch.gather(z, 1, mode)[..., None], density.amax(-1)[..., None]
        return [_raw_start(loc, peak), *lattice_starts(model, y, z, mass)]
    levels = (torch.arange(K, dtype=F64, device=y.device) + 0.5) / K
    index = torch.searchsorted(torch.cumsum(mass, -1), levels.expand(*mass.shape[:2], K).contiguous())
    index = index.clamp(max=z.shape[1] - 1)                                     # [R, B, K]
    loc = torch.gather(z[:, None].expand(-1, y.shape[1], -1), 2, index)
    return [_raw_start(loc, torch.gather(density, 2, index) * K)]              # the density of one 1/K component


def _raw_start(loc: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """Raw parameters [R, B, 2K] of components at `loc` [R, B, K], each with the scale of a Gaussian of
    peak density `peak` [R, B, K]."""
    scale = (1.0 / (math.sqrt(2 * math.pi) * peak.clamp_min(1e-300))).clamp(min=2 * MIN_SCALE, max=1e3)
    return torch.cat([loc, raw_scale(scale)], -1)


START_GRID = 2001    # nodes of the grid that places the posterior start


def gap_metrics(model: VAE, y, log_p: torch.Tensor, elbo: torch.Tensor, true_log_p=None,
                grid_size: int = 2001, grid_span: float = 8.0, max_steps: int = MAX_STEPS,
                progress=None, tolerance: float | None = None, starts: int = 0) -> dict[str, torch.Tensor]:
    """The model's own two terms on points y, per replica [R]: approximation and
    amortization gaps (their sum is log p - ELBO on these points), the means of
    log p, ELBO and (if known) log p* there, and the error bound of ELBO*.

    ELBO* is the ELBO of the best q the search found, computed by the evaluation's
    own grid rule (as `elbo` is), or the encoder's where that is higher: the
    rule that steers the search (search_elbo) is not accurate enough to report
    (measured: up to 0.09 nats off the grid on narrow mixture components at
    sigma = 0.03, which made amortization gaps negative). So ELBO* is always the
    exact ELBO of a member of the family, a lower bound on the best one, and the
    amortization gap is >= 0 by construction of the same rule. In 1-D, a point whose rule misses
    `tolerance` is refined over q's strata, as the ELBO is (quadrature._refined_elbo)."""
    best = best_posterior(model, y, max_steps, progress=progress, starts=starts)
    grid = latent_grid(model, grid_size, grid_span, y=y, q=best.q)
    on_grid = integrate(model, y, grid, q=best.q)
    star_rule, rule_error = _refined_elbo(model, y, grid, on_grid, tolerance, q=best.q)
    on_grid = replace(on_grid, elbo=star_rule)
    star = torch.maximum(on_grid.elbo, elbo)
    return {
        **gap_means(log_p, elbo, true_log_p),
        "approximation_gap": (log_p - star).mean(1),
        "amortization_gap": (star - elbo).mean(1),
        "gap_rule_error": torch.where(on_grid.elbo >= elbo, rule_error, torch.zeros_like(rule_error)).amax(1),
        "gap_optimizer_steps": torch.full((log_p.shape[0],), float(best.steps)),
        # per point, for pointwise.npz: ELBO* by the grid rule, and the q whose ELBO it is (the encoder's
        # where the search found none better: its raw output then)
        "elbo_star": star,
        "q_star_raw": torch.where((on_grid.elbo >= elbo)[..., None], best.raw, _encoder_raw(model, y, best.raw)),
    }


def _encoder_raw(model: VAE, y, like: torch.Tensor) -> torch.Tensor:
    """The encoder's raw output at y [R, N, P], in `like`'s dtype."""
    with torch.no_grad():
        return model.posterior.raw(as_batch(y, like.shape[0], like.device)).to(like.dtype)


def gap_means(log_p: torch.Tensor, elbo: torch.Tensor, true_log_p=None) -> dict[str, torch.Tensor]:
    """The means over the gap points, per replica [R], that pair a run with others: log p,
    ELBO and (if known) log p*. All an oracle contributes to the decomposition."""
    truth = math.nan if true_log_p is None else float(true_log_p.mean())
    return {"gap_log_likelihood": log_p.mean(1), "gap_elbo": elbo.mean(1),
            "gap_true_log_likelihood": torch.full((log_p.shape[0],), truth, dtype=F64)}


def decomposition(vae: dict[str, float], oracle: dict[str, float]) -> dict[str, float]:
    """The four terms for one replica from its gap metrics and those of the oracle
    of the same prior and decoder family (same data, same seed)."""
    misspecification = vae["gap_true_log_likelihood"] - oracle["gap_log_likelihood"]
    over_regularization = oracle["gap_log_likelihood"] - vae["gap_log_likelihood"]
    total = vae["gap_true_log_likelihood"] - vae["gap_elbo"]
    return {"misspecification": misspecification, "over_regularization": over_regularization,
            "approximation_gap": vae["approximation_gap"], "amortization_gap": vae["amortization_gap"],
            "total": total}


