"""One entry point for log p_theta(y): quadrature where the latent allows it,
importance sampling where it does not, each with its error.

    log_likelihood(model, y, method="auto" | a name in ESTIMATORS ("quadrature", "importance"))

Quadrature (latent_dim <= 2) reports the trapezoid rule's bound |fine - coarse|;
importance sampling reports a standard error. The proposal is the model's own
q(z|y), sampled stratified over its components (n draws from each component,
weighted by its mixture weight): the estimate

    p_hat(y) = sum_k pi_k (1/n) sum_j w(z_jk),   w = p(y|z) p(z) / q(z|y),

is unbiased for p(y), and log p_hat is the IWAE bound with K = n draws per
component (Burda et al. 2016; Morningstar et al. 2021 for the stratified form):
biased low by about Var/(2 p^2), a bias that shrinks as 1/n. Its standard
error is the delta method's sqrt(Var(p_hat)) / p_hat, with Var(p_hat) =
sum_k pi_k^2 Var_k(w) / n.

The proposal is defensive (Hesterberg 1995): (1 - alpha) q(z|y) + alpha p(z),
its components all drawn, stratified. Where the encoder misses the posterior
(an untrained or poor encoder, a point far from the data) the weights of q
alone are heavy-tailed and their sample variance understates the error by
orders of magnitude; the prior's share bounds every weight by p(y|z) / alpha,
so the variance is finite and the standard error means what it says.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..model.distributions import Defensive
from ..model.layers import make_generators, randn_per_replica, replica_count
from ..model.vae import VAE
from ..objectives.bounds import log_weights
from .base import Estimate, Estimator
from .quadrature import F64, QUADRATURE, as_batch

DEFENSIVE = 0.1          # the prior's share of the proposal
IMPORTANCE_OFFSET = 130363       # evaluation's importance-sampling draws: replica seed + offset


def choose(method: str, latent_dim: int, grid_size: int = 2001) -> Estimator:
    """The estimator `method` names, or for "auto" the first registered one that fits."""
    if method == "auto":
        fitting = [e for e in ESTIMATORS.values() if e.chosen_by_auto(latent_dim, grid_size)]
        if not fitting:
            raise ValueError(f"no registered estimator fits latent_dim = {latent_dim} with grid_size = {grid_size}")
        return fitting[0]
    if method not in ESTIMATORS:
        raise ValueError(f"unknown method {method!r}; choose from {['auto', *ESTIMATORS]}")
    estimator = ESTIMATORS[method]
    if not estimator.fits(latent_dim, grid_size):
        others = [name for name, e in ESTIMATORS.items() if e.fits(latent_dim, grid_size)]
        raise ValueError(f"method={method!r} does not fit latent_dim = {latent_dim} with grid_size = {grid_size}: "
                         f"it needs {estimator.needs or 'another model'}" + (f"; use method={others[0]!r}" if others else ""))
    return estimator


def log_likelihood(model: VAE, y, method: str = "auto", *, n_samples: int = 5000, seeds: list[int] | None = None,
                   grid_size: int = 2001, grid_span: float = 8.0, tolerance: float | None = 1e-4) -> Estimate:
    """log p_theta(y) for every replica and point. `n_samples` is the importance
    sampler's draws per point (split evenly over q's components); `seeds` seed each
    replica's draws (default 0, 1, ...): the same seeds give the same estimate.
    `tolerance`: quadrature refines a 1-D point until its bound meets it (None: the grid alone)."""
    model = model.eval()
    estimator = choose(method, model.latent_dim, grid_size)
    seeds = seeds if seeds is not None else list(range(replica_count(model)))
    return estimator.log_likelihood(model, y, n_samples=n_samples, seeds=seeds, grid_size=grid_size,
                                    grid_span=grid_span, tolerance=tolerance)


def _importance(model: VAE, y, *, n_samples: int, seeds: list[int], **_) -> Estimate:
    value, se = importance_log_likelihood(model, y, n_samples, seeds)
    return Estimate(value, se, "importance")


@torch.no_grad()
def importance_log_likelihood(model: VAE, y, n_samples: int, seeds: list[int],
                              budget: int = 2_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_hat, standard error), each [R, N], float64 densities (see the module note).
    Points are taken in chunks whose [R, n, K, B] weights stay within `budget`."""
    K = model.posterior.k + model.prior().strata
    n = max(2, math.ceil(n_samples / K))                      # draws per component (two, for a variance)
    values, errors = [], []
    for yc, eps in _draws(model, y, n, K, seeds, budget):
        proposal = Defensive(model.posterior(yc).to(F64), model.prior().to(F64), DEFENSIVE)
        log_w, pi = log_weights(model, yc, eps, proposal)             # [R, n, K, B], [R, 1, K, B]
        m = log_w.amax(dim=(1, 2), keepdim=True)
        w = torch.exp(log_w - m)                                      # scaled weights, max 1
        mean_k = w.mean(1, keepdim=True)                              # [R, 1, K, B]
        p_hat = (pi * mean_k).sum(2)                                  # [R, 1, B] (scaled)
        var_k = w.var(1, keepdim=True)                                # unbiased, per component
        var = (pi * pi * var_k / n).sum(2)
        values.append((torch.log(p_hat) + m[:, :, 0])[:, 0])
        errors.append((torch.sqrt(var) / p_hat)[:, 0])
    return torch.cat(values, 1), torch.cat(errors, 1)


@torch.no_grad()
def monte_carlo_elbo(model: VAE, y, n_samples: int, seeds: list[int], budget: int = 2_000_000) -> torch.Tensor:
    """The ELBO per point by stratified Monte Carlo from q (n_samples draws per point,
    split over q's components): [R, N]. Unbiased; where quadrature cannot go."""
    return monte_carlo_elbo_with_error(model, y, n_samples, seeds, budget)[0]


@torch.no_grad()
def monte_carlo_elbo_with_error(model: VAE, y, n_samples: int, seeds: list[int],
                                budget: int = 2_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """monte_carlo_elbo and each point's standard error, [R, N] each: the stratified estimate
    sum_k pi_k mean_n log w_nk has variance sum_k pi_k^2 var_n(log w_nk) / n (n draws per
    component; NaN with a single draw)."""
    K = model.posterior.k
    n = max(1, math.ceil(n_samples / K))
    values, errors = [], []
    for yc, eps in _draws(model, y, n, K, seeds, budget):
        log_w, pi = log_weights(model, yc, eps)                      # [R, n, K, b], [R, 1, K, b]
        values.append((log_w * pi).sum(2).mean(1))
        variance = log_w.var(1) if n > 1 else torch.full_like(log_w[:, 0], math.nan)   # [R, K, b]
        errors.append(torch.sqrt((pi[:, 0] ** 2 * variance / n).sum(1)))
    return torch.cat(values, 1), torch.cat(errors, 1)


def _draws(model: VAE, y, n: int, K: int, seeds: list[int], budget: int):
    """Chunks of points y [R, B, Y] (float64) with each replica's standard-normal draws
    for them, eps [R, n, K, B, D], replica r from seeds[r] alone; chunks keep
    [R, n, K, B] within `budget` elements."""
    R, device = replica_count(model), next(model.parameters()).device
    y = as_batch(y, R, device)                                # [R, N, Y], float64
    gens = make_generators(seeds)
    chunk = max(1, budget // (R * n * K))
    for s in range(0, y.shape[1], chunk):
        yc = y[:, s:s + chunk]
        yield yc, randn_per_replica(gens, (n, K, yc.shape[1], model.latent_dim), dtype=F64).to(device)


def importance_terms(model: VAE, y_test, y_grid, config, seeds: list[int], phases=None) -> dict:
    """Evaluation's terms where quadrature does not fit: log p(y) by importance sampling, the ELBO by
    Monte Carlo from q, each with its standard error per point (and log p's mean, over draws and points).
    A point whose standard error would keep its replica's sampling_bound above eval.sampling_tolerance
    draws again (refine_sampled); `sampling_error_bound` is the larger of the two means' bounds, per replica."""
    gens = [s + IMPORTANCE_OFFSET for s in seeds]
    log_p, se = importance_log_likelihood(model, y_test, config.n_importance, gens)
    elbo, elbo_se = monte_carlo_elbo_with_error(model, y_test, config.n_importance, gens)
    (log_p, se), (elbo, elbo_se) = refine_sampled(model, y_test, (log_p, se), (elbo, elbo_se), config.n_importance,
                                                  gens, config.sampling_tolerance, phases)
    density = None if y_grid is None else \
        torch.exp(importance_log_likelihood(model, y_grid, config.n_importance, gens)[0]).numpy()
    nan = np.full(len(seeds), math.nan)
    bound = torch.maximum(sampling_bound(se, biased=True), sampling_bound(elbo_se, biased=False))
    return {"log_p": log_p, "elbo": elbo, "model_density": density,
            "log_p_error": se.numpy(), "elbo_error": elbo_se.numpy(),
            "quadrature_error": nan, "grid_edge_mass": nan, "elbo_quadrature_error": nan,
            "test_log_likelihood_stderr": _mean_stderr(se), "test_elbo_stderr": _mean_stderr(elbo_se),
            "sampling_error_bound": bound.numpy()}


def sampling_bound(se: torch.Tensor, biased: bool) -> torch.Tensor:
    """What the mean over points of sampled estimates with standard errors se [R, N] may be off by, per
    replica [R]: two standard errors of the mean (95%), plus, for log p_hat (`biased`), the delta
    method's bias mean(se^2) / 2 (the log of an unbiased estimate is low by about Var / 2 p^2 at every
    point alike, so the mean over points does not average it away)."""
    out = 2 * torch.sqrt((se * se).sum(1)) / se.shape[1]
    return out + (se * se).mean(1) / 2 if biased else out


def point_target(tolerance: float, n_points: int) -> float:
    """A standard error per point at which, if every point meets it, both sampling_bounds meet
    `tolerance`: s = tolerance sqrt(N) / 4 gives 2 s / sqrt(N) = tolerance / 2, and s <= sqrt(tolerance)
    keeps the bias s^2 / 2 within the other half."""
    return min(tolerance * math.sqrt(n_points) / 4, math.sqrt(tolerance))


SAMPLING_ROUNDS = 4          # doublings of a point's draws at most: up to 16 x eval.n_importance where needed
ROUND_SEED = 1_000_003       # round j's draws for replica r: its seed + IMPORTANCE_OFFSET + j ROUND_SEED


def refine_sampled(model: VAE, y, log_p: tuple, elbo: tuple, n_samples: int, seeds: list[int], tolerance: float,
                   phases=None) -> tuple[tuple, tuple]:
    """(log p_hat, se) and (ELBO, se) [R, N] after each point whose standard error exceeds
    point_target(tolerance, N) doubled its draws, up to SAMPLING_ROUNDS times. A round's new draws are
    an estimate of their own from a stream of the round's (ROUND_SEED); the two equal-sized estimates are
    averaged (for log p_hat, their p_hat). Each replica runs alone (layers.replica_subset) on its own
    points, so a replica's numbers do not depend on which others drew again."""
    from ..model.layers import replica_subset
    y = as_batch(y, replica_count(model), next(model.parameters()).device)
    target = point_target(tolerance, y.shape[1])
    (lp, lp_se), (el, el_se) = (tuple(t.clone() for t in pair) for pair in (log_p, elbo))
    todo = (lp_se > target) | (el_se > target)
    total, done = int(todo.sum()), 0
    if phases and total:
        phases.start("drawing again", f"more importance samples for {total:,} point-replicas whose standard error "
                     f"exceeds {target:.2g} (eval.sampling_tolerance = {tolerance:g} over {y.shape[1]:,} points)")
    for r in torch.nonzero(todo.any(1))[:, 0].tolist():
        one = replica_subset(model, [r]).eval()
        for j in range(SAMPLING_ROUNDS):
            need_lp, need_el = lp_se[r] > target, el_se[r] > target
            points = torch.nonzero(need_lp | need_el)[:, 0]
            if len(points) == 0:
                break
            seed, n = [seeds[r] + (j + 1) * ROUND_SEED], n_samples * 2 ** j
            if bool(need_lp.any()):
                at = torch.nonzero(need_lp)[:, 0]
                v, s = importance_log_likelihood(one, y[r, at], n, seed)
                lp[r, at], lp_se[r, at] = _average_p_hat(lp[r, at], lp_se[r, at], v[0], s[0])
            if bool(need_el.any()):
                at = torch.nonzero(need_el)[:, 0]
                v, s = monte_carlo_elbo_with_error(one, y[r, at], n, seed)
                el[r, at], el_se[r, at] = (el[r, at] + v[0]) / 2, torch.sqrt(el_se[r, at] ** 2 + s[0] ** 2) / 2
        done += int(todo[r].sum())
        if phases:
            phases.step(done, total, "point-replicas")
    return (lp, lp_se), (el, el_se)


def _average_p_hat(l1: torch.Tensor, s1: torch.Tensor, l2: torch.Tensor, s2: torch.Tensor):
    """log((p1 + p2) / 2) and its standard error from two independent estimates of equal size, each as
    (log p_hat, se = sd(p_hat) / p_hat): Var = (Var1 + Var2) / 4."""
    log = torch.logaddexp(l1, l2) - math.log(2)
    se = torch.sqrt((s1 * torch.exp(l1 - log)) ** 2 + (s2 * torch.exp(l2 - log)) ** 2) / 2
    return log, se


def _mean_stderr(se: torch.Tensor) -> np.ndarray:
    """The standard error of a mean over points [R, N] of independent estimates with these errors: [R]."""
    return (torch.sqrt((se * se).sum(1)) / se.shape[1]).numpy()


IMPORTANCE = Estimator("importance", exact=False, fits=lambda latent_dim, grid_size: True,
                       log_likelihood=_importance, evaluation_terms=importance_terms)

ESTIMATORS = {e.name: e for e in (QUADRATURE, IMPORTANCE)}
"""By name, in the order "auto" tries them. Adding one: a module here with an Estimator, and its entry."""
