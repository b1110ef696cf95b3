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
from ..model.layers import replica_count
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


def importance_draws(model: VAE, n_samples: int) -> int:
    """The draws per point importance_log_likelihood takes when asked for `n_samples`: the same number from
    each stratum of its defensive proposal (q's components and the prior's), at least two (for a variance),
    so at least twice the strata, and n_samples rounded up to a multiple of them."""
    strata = model.posterior.k + model.prior().strata
    return strata * _per_stratum(n_samples, strata)


def _per_stratum(n_samples: int, strata: int) -> int:
    """Draws from each stratum: n_samples split evenly, at least two (for a variance)."""
    return max(2, math.ceil(n_samples / strata))


@torch.no_grad()
def importance_log_likelihood(model: VAE, y, n_samples: int, seeds: list[int], budget: int = 250_000,
                              index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_hat, standard error), each [R, N], float64 densities (see the module note). Points are
    taken in chunks whose [R, n, K, B] weights stay within `budget` (measured: 250,000 took 4.1 s
    where 2,000,000 took 5.0 s, whose decoder activations reach 0.5 GB); each draws from its own
    stream (_draws), so neither the budget nor the other points change its estimate."""
    K = model.posterior.k + model.prior().strata
    n = _per_stratum(n_samples, K)                            # draws per component (importance_draws)
    values, errors = [], []
    for yc, eps in _draws(model, y, n, K, seeds, budget, index):
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
def monte_carlo_elbo(model: VAE, y, n_samples: int, seeds: list[int], budget: int = 250_000) -> torch.Tensor:
    """The ELBO per point by stratified Monte Carlo from q (n_samples draws per point,
    split over q's components): [R, N]. Unbiased; where quadrature cannot go."""
    return monte_carlo_elbo_with_error(model, y, n_samples, seeds, budget)[0]


@torch.no_grad()
def monte_carlo_elbo_with_error(model: VAE, y, n_samples: int, seeds: list[int], budget: int = 250_000,
                                index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """monte_carlo_elbo and each point's standard error, [R, N] each: the stratified estimate
    sum_k pi_k mean_n log w_nk has variance sum_k pi_k^2 var_n(log w_nk) / n (n draws per
    component; NaN with a single draw)."""
    K = model.posterior.k
    n = max(1, math.ceil(n_samples / K))
    values, errors = [], []
    for yc, eps in _draws(model, y, n, K, seeds, budget, index):
        log_w, pi = log_weights(model, yc, eps)                      # [R, n, K, b], [R, 1, K, b]
        values.append((log_w * pi).sum(2).mean(1))
        variance = log_w.var(1) if n > 1 else torch.full_like(log_w[:, 0], math.nan)   # [R, K, b]
        errors.append(torch.sqrt((pi[:, 0] ** 2 * variance / n).sum(1)))
    return torch.cat(values, 1), torch.cat(errors, 1)


def _draws(model: VAE, y, n: int, K: int, seeds: list[int], budget: int, index: torch.Tensor | None = None):
    """Chunks of points y [R, B, Y] (float64) with each replica's standard-normal draws for them,
    eps [R, n, K, B, D]; chunks keep [R, n, K, B] within `budget` elements. Point i of replica r draws
    from a stream of its own, (seeds[r], index[i]) (index: the points' places in the set evaluated,
    default 0, 1, ...), so that its estimate does not depend on the points evaluated beside it, on
    the chunks, or on which points draw again (issue 21; it did, through one stream per replica)."""
    R, device = replica_count(model), next(model.parameters()).device
    y = as_batch(y, R, device)                                # [R, N, Y], float64
    index = torch.arange(y.shape[1]) if index is None else index
    chunk = max(1, budget // (R * n * K))
    for s in range(0, y.shape[1], chunk):
        yc = y[:, s:s + chunk]
        eps = torch.stack([torch.stack([torch.randn((n, K, model.latent_dim), generator=_point_stream(seed, int(i)),
                                                    dtype=F64) for i in index[s:s + chunk]], 2) for seed in seeds])
        yield yc, eps.to(device)


def _point_stream(seed: int, i: int) -> torch.Generator:
    """The generator of point i's draws under `seed`: NumPy's SeedSequence mixes the two (no two pairs
    share a stream, as seed * N + i would once seeds lie N apart)."""
    state = np.random.SeedSequence([int(seed), int(i)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def importance_terms(model: VAE, y_test, y_grid, config, seeds: list[int], phases=None, elbo: bool = True) -> dict:
    """Evaluation's terms where quadrature does not fit: log p(y) by importance sampling, the ELBO (if
    `elbo`; else NaN) by Monte Carlo from q, each with its standard error per point (and log p's mean, over
    draws and points). A point whose standard error would keep its replica's sampling_bound above
    eval.sampling_tolerance draws again (draw_again); `sampling_error_bound` is the larger of the two
    means' bounds, per replica."""
    gens = [s + IMPORTANCE_OFFSET for s in seeds]
    samplers = (importance_log_likelihood, monte_carlo_elbo_with_error)[:2 if elbo else 1]
    (log_p, se), *rest = (sampled(model, y_test, sampler, config.n_importance, gens, config.sampling_tolerance,
                                  phases) for sampler in samplers)
    values, elbo_se = rest[0] if rest else (torch.full_like(log_p, math.nan),) * 2
    density = None if y_grid is None else \
        torch.exp(importance_log_likelihood(model, y_grid, config.n_importance, gens)[0]).numpy()
    nan = np.full(len(seeds), math.nan)
    bound = sampling_bound(se, biased=True)
    if rest:
        bound = torch.maximum(bound, sampling_bound(elbo_se, biased=False))
    return {"log_p": log_p, "elbo": values, "model_density": density,
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


def sampled(model: VAE, y, sampler, n_samples: int, seeds: list[int], tolerance: float,
            phases=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, se) [R, N] by `sampler` (importance_log_likelihood or monte_carlo_elbo_with_error), every
    point drawing n_samples, then again where its error needs it (draw_again): evaluation's estimate,
    which run.log_prob and run.elbo reproduce."""
    return draw_again(model, y, sampler(model, y, n_samples, seeds), sampler, n_samples, seeds, tolerance, phases)


def draw_again(model: VAE, y, estimate: tuple, sampler, n_samples: int, seeds: list[int], tolerance: float,
               phases=None) -> tuple[torch.Tensor, torch.Tensor]:
    """An estimate (values, se) [R, N] by `sampler` (importance_log_likelihood or
    monte_carlo_elbo_with_error) after each point whose standard error exceeds point_target(tolerance, N)
    doubled its draws, up to SAMPLING_ROUNDS times. A round's new draws are an estimate of their own from
    the point's stream of that round (ROUND_SEED), averaged with the one before (for log p_hat, their
    p_hat). Each replica runs alone (layers.replica_subset) and each point on its own stream, so neither
    another replica nor another point changes a point's numbers."""
    from ..model.layers import replica_subset
    y = as_batch(y, replica_count(model), next(model.parameters()).device)
    target = point_target(tolerance, y.shape[1])
    value, se = (t.clone() for t in estimate)
    todo = se > target
    total, done = int(todo.sum()), 0
    what = "log p" if sampler is importance_log_likelihood else "the ELBO"
    if phases and total:
        phases.start(f"drawing again ({what})", f"more samples of {what} for {total:,} point-replicas whose standard "
                     f"error exceeds {target:.2g} (eval.sampling_tolerance = {tolerance:g} over {y.shape[1]:,} points)")
    average = _average_p_hat if sampler is importance_log_likelihood else _average_values
    for r in torch.nonzero(todo.any(1))[:, 0].tolist():
        one = replica_subset(model, [r]).eval()
        for j in range(SAMPLING_ROUNDS):
            at = torch.nonzero(se[r] > target)[:, 0]
            if len(at) == 0:
                break
            v, s = sampler(one, y[r, at], n_samples * 2 ** j, [seeds[r] + (j + 1) * ROUND_SEED], index=at)
            value[r, at], se[r, at] = average(value[r, at], se[r, at], v[0], s[0])
        done += int(todo[r].sum())
        if phases:
            phases.step(done, total, "point-replicas")
    return value, se


def _average_values(v1: torch.Tensor, s1: torch.Tensor, v2: torch.Tensor, s2: torch.Tensor):
    """The mean of two independent estimates of equal size, and its standard error."""
    return (v1 + v2) / 2, torch.sqrt(s1 * s1 + s2 * s2) / 2


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
