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
    Monte Carlo from q, each with its standard error per point (and log p's mean, over draws and points)."""
    gens = [s + IMPORTANCE_OFFSET for s in seeds]
    log_p, se = importance_log_likelihood(model, y_test, config.n_importance, gens)
    density = None if y_grid is None else \
        torch.exp(importance_log_likelihood(model, y_grid, config.n_importance, gens)[0]).numpy()
    nan = np.full(len(seeds), math.nan)
    elbo, elbo_se = monte_carlo_elbo_with_error(model, y_test, config.n_importance, gens)
    return {"log_p": log_p, "elbo": elbo, "model_density": density,
            "log_p_error": se.numpy(), "elbo_error": elbo_se.numpy(),
            "quadrature_error": nan, "grid_edge_mass": nan, "elbo_quadrature_error": nan,
            "test_log_likelihood_stderr": _mean_stderr(se), "test_elbo_stderr": _mean_stderr(elbo_se)}


def _mean_stderr(se: torch.Tensor) -> np.ndarray:
    """The standard error of a mean over points [R, N] of independent estimates with these errors: [R]."""
    return (torch.sqrt((se * se).sum(1)) / se.shape[1]).numpy()


IMPORTANCE = Estimator("importance", exact=False, fits=lambda latent_dim, grid_size: True,
                       log_likelihood=_importance, evaluation_terms=importance_terms)

ESTIMATORS = {e.name: e for e in (QUADRATURE, IMPORTANCE)}
"""By name, in the order "auto" tries them. Adding one: a module here with an Estimator, and its entry."""
