"""Evaluate trained replicas against the truth: a frozen record of per-replica
metrics plus the curves the figures draw. Nothing here trains or plots."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config.schema import EvalConfig, ModelConfig, TrainConfig
from ..data.base import UnknownTruth
from ..data.folded import TRUTH_TOLERANCE
from ..data.paper import PaperProcess
from ..data.sources import SOURCES
from ..model.layers import make_generators, replica_count
from ..model.vae import VAE
from ..objectives import OBJECTIVES
from .likelihood import choose
from .quadrature import MAX_GRID_NODES, MAX_LATENT, latent_grid, log_joint, log_marginal, posterior_on_grid

PROBE_QUANTILES = (0.05, 0.5, 0.95)   # the posterior panels: y at these quantiles of the test data
GAP_METRICS = ("approximation_gap", "amortization_gap", "gap_log_likelihood", "gap_elbo", "gap_true_log_likelihood",
               "gap_rule_error", "gap_optimizer_steps")   # see gaps.py; on the first eval.gap_points test points
GENERATE_OFFSET = 104729         # generation noise: replica seed + offset
METRICS = ("test_log_likelihood", "true_log_likelihood", "test_elbo", "inference_gap",
           "kl_to_truth", "w1_to_truth", "w1_samples", "w1_decoder", "std_ratio",
           "quadrature_error", "grid_edge_mass", "elbo_quadrature_error", "test_log_likelihood_stderr",
           "test_elbo_stderr", "training_grid_error", *GAP_METRICS, "sampling_error_bound", "error_bound", "tolerance")
EXACT_BOUNDS = ("quadrature_error", "elbo_quadrature_error", "gap_rule_error")
"""The bounds a replica's exact numbers carry (max over test points): log p, the ELBO, ELBO*. Their
largest is its error_bound; above eval.tolerance the replica is flagged. (training_grid_error
is not among them: it measures the training objective's grid, not an evaluated number.) Where
importance sampling stands in (latent_dim > 2), error_bound is sampling_error_bound: what the means
of log p and the ELBO may be off by (likelihood.sampling_bound: two standard errors and the bias)."""
TRUTH_METRICS = ("true_log_likelihood", "kl_to_truth", "w1_to_truth", "w1_decoder",
                 "gap_true_log_likelihood")  # NaN without a known truth
PROBE_SPAN, PROBE_GRID = 12.0, 6001  # the plotting grid over the prior, wider than evaluation's 8 scales



MAX_EVAL_BYTES = 4 * 2**30   # the model's evaluation at the data's dimension D (the tabular study's largest: 2.8 GB)


def check_evaluable(model: ModelConfig, config: EvalConfig, train: TrainConfig | None = None,
                    data=None, seeds: int = 1) -> None:
    """Refuse, before any training, a configuration that cannot be trained or
    evaluated here (ValueError naming the field): every trained run can be evaluated.
    latent_dim <= 2 is evaluated by quadrature; beyond, by importance sampling.
    With `data` (the data section) and `seeds` (the replicas evaluated together), also
    the memory evaluation needs at the data's dimension D and the time the truth takes."""
    d = model.latent_dim
    if train is not None:
        OBJECTIVES[train.objective].check(model, train)
    nodes = config.grid_size ** min(d, MAX_LATENT)
    if d <= MAX_LATENT and nodes > MAX_GRID_NODES:
        fit = int(MAX_GRID_NODES ** (1 / d)) // 2 * 2 - 1
        raise ValueError(f"eval.grid_size = {config.grid_size} with latent_dim = {d} is {nodes:,} latent nodes per "
                         f"replica, more than exact evaluation holds ({MAX_GRID_NODES:,}): set eval.grid_size <= {fit}")
    if data is None:
        return
    source = SOURCES[data.name]
    D = source.data_dim(data)
    if D is not None:
        check_evaluation_memory(model, config, D, seeds)
    source.check(data)


# The model's evaluation holds some arrays whole, each growing with D; measured (peak RSS of
# `evaluate` on untrained models at D = 100 ... 600, its growth with D). The paths run one after
# another, so the largest sets the peak.
GRID_BYTES = 26              # per seed, latent node and D: the decoder's mean on the grid, scaled, squared
WIDEST_1D_GRID = 20_001      # quadrature.latent_grid widens a 1-D grid to cover q, up to this
GENERATED_BYTES = 25         # per seed (and the truth), generated sample and D (_generate, _true_means)
STRATA_BYTES = 11_500_000    # per D: the 2-D ELBO's decoder at 250,000 draws (quadrature.stratum_trapezoid_elbo)
IMPORTANCE_BYTES = 5_750_000   # per D: the decoder at 250,000 draws (likelihood.importance_log_likelihood)


def evaluation_bytes(model: ModelConfig, config: EvalConfig, data_dim: int, seeds: int = 1) -> dict[str, float]:
    """The memory evaluation holds at data dimension D, by path (named by the setting that sizes it)."""
    d, D = model.latent_dim, data_dim
    nodes = WIDEST_1D_GRID if d == 1 else config.grid_size ** d
    return {"eval.grid_size": GRID_BYTES * seeds * nodes * D if d <= MAX_LATENT else 0.0,
            "model.latent_dim": STRATA_BYTES * D if d == 2 else IMPORTANCE_BYTES * D if d > MAX_LATENT else 0.0,
            "eval.n_generated": GENERATED_BYTES * (seeds + 1) * config.n_generated * D}


def check_evaluation_memory(model: ModelConfig, config: EvalConfig, data_dim: int, seeds: int = 1) -> None:
    """Refuse (ValueError) a model whose evaluation at data dimension `data_dim` would hold more than
    MAX_EVAL_BYTES, which would otherwise fail only after training, naming each single setting that
    would make it fit, with the most it can be."""
    d, D, cap = model.latent_dim, data_dim, MAX_EVAL_BYTES
    need = evaluation_bytes(model, config, D, seeds)
    path = max(need, key=need.get)
    if need[path] <= cap:
        return

    def largest(values, change) -> int | None:
        """The first of `values` (descending) with which everything fits."""
        return next((v for v in values if max(evaluation_bytes(*change(v)).values()) <= cap), None)

    quadrature = config.model_copy(update={"grid_size": min(config.grid_size, 499)})   # as 2-D quadrature must
    fewer = {
        "model.latent_dim": largest(range(min(d - 1, MAX_LATENT), 0, -1), lambda v: (
            model.model_copy(update={"latent_dim": v}), quadrature, D, seeds)),
        "eval.grid_size": largest(range(config.grid_size - 2, 100, -2), lambda v: (
            model, config.model_copy(update={"grid_size": v}), D, seeds)) if d == 2 else None,
        "eval.n_generated": largest(range(int(cap * config.n_generated // need["eval.n_generated"]), 99, -1),
                                    lambda v: (model, config.model_copy(update={"n_generated": v}), D, seeds)),
        "seeds": largest(range(seeds - 1, 0, -1), lambda v: (model, config, D, v)),
    }
    fixes = [f"{key} <= {value:,}" for key, value in fewer.items() if value is not None]
    if fewer["model.latent_dim"] == 1:
        fixes[0] = "model.latent_dim = 1"
    elif fewer["model.latent_dim"] == 2 and config.grid_size > 499:
        fixes[0] += " (and eval.grid_size <= 499)"
    draws = "the ELBO's rule: the decoder at 250,000" if d == 2 else "importance sampling: the decoder at 2,000,000"
    what = {"eval.grid_size": f"the decoder on {WIDEST_1D_GRID if d == 1 else config.grid_size ** d:,} latent nodes "
                              f"for each of {seeds} seeds",
            "model.latent_dim": f"model.latent_dim = {d} ({draws} draws at once)",
            "eval.n_generated": f"eval.n_generated = {config.n_generated:,} samples for each of {seeds} seeds"}[path]
    raise ValueError(f"{what} at D = {D} observed dimensions needs about {need[path] / 2**30:.1f} GiB to evaluate, "
                     f"more than {cap / 2**30:.0f} GiB: set {' or '.join(fixes) or 'a smaller model'}")


@dataclass(frozen=True)
class Evaluation:
    metrics: list[dict[str, float]]   # one dict per replica, keys METRICS
    flagged: list[bool]               # per replica: its error_bound misses its tolerance (held_to)
    curves: dict[str, np.ndarray]     # figure data; arrays with a leading replica axis where per replica
    pointwise: dict[str, np.ndarray]  # per test point (POINTWISE), saved as pointwise.npz
    seconds: dict[str, float] = field(default_factory=dict)   # each phase's wall time, and "total"


def evaluate(model: VAE, process: PaperProcess, y_test: np.ndarray, config: EvalConfig,
             seeds: list[int], diverged: list[bool], training_grid: int | None = None,
             report=None) -> Evaluation:
    """`training_grid`: the exact objective's grid size, whose error at the trained
    optimum is reported (training_grid_error): a decoder that made the integrand
    spiky between its nodes would show there. `report(text)` takes a line per phase
    (with its counts) and, through the gap search, its progress with an ETA."""
    phases = Phases(report)
    model = model.cpu().eval()
    R = len(seeds)
    one_d = np.ndim(y_test) == 1          # the y-density metrics and figures are 1-D (ONE_D_METRICS)
    y_grid = _y_grid(y_test) if one_d else None
    phases.start("the truth", f"log p*(y) of {len(y_test):,} test points")
    true_log_p, true_error = truth_and_error(process, y_test)
    missed = int((true_error > TRUTH_TOLERANCE).sum())
    if missed and report:
        report(f"the truth missed its tolerance ({TRUTH_TOLERANCE:g} nats) at {missed:,} of {len(true_error):,} "
               f"points (largest estimate {np.nanmax(true_error):.1e}): pointwise.npz keeps each")
    estimator = choose("auto", model.latent_dim, config.grid_size)
    oracle = training_grid is not None      # an oracle's encoder is not evaluated (ORACLE_NAN)
    phases.start("likelihoods", f"log p(y){'' if oracle else ' and the ELBO'} by {estimator.name}, "
                                f"{len(y_test):,} test points x {R} replicas")
    terms = estimator.evaluation_terms(model, y_test, y_grid, config, seeds, phases=phases, elbo=not oracle)
    if estimator.exact:      # the gap search and the training grid's check compare exact ELBOs
        terms.update(_gap_terms(model, y_test, terms, config, true_log_p, training_grid, phases))
    log_p, elbo, model_density = terms.pop("log_p"), terms.pop("elbo"), terms.pop("model_density")
    pointwise = _pointwise(terms, log_p, elbo, (true_log_p, true_error), estimator.exact, diverged)
    true_density = np.exp(process.log_prob(y_grid)) if one_d else None
    phases.start("samples", f"{config.n_generated:,} generated points x {R} replicas, figures' curves")
    z_gen, y_gen, f_gen = _generate(model, seeds, config.n_generated)
    f_true = _true_means(process, config.n_generated)
    y_cols = y_test.reshape(len(y_test), -1)

    metrics = []
    for r in range(R):
        m = {
            "test_log_likelihood": float(log_p[r].mean()),
            "true_log_likelihood": float(true_log_p.mean()),
            "test_elbo": float(elbo[r].mean()),
            "inference_gap": float((log_p[r] - elbo[r]).mean()),
            "kl_to_truth": float(true_log_p.mean() - log_p[r].mean()),
            "w1_to_truth": _w1_densities(y_grid, model_density[r], true_density) if one_d else math.nan,
            "w1_samples": _marginal_w1(y_gen[r], y_cols),
            "w1_decoder": _marginal_w1(f_gen[r], f_true) if f_true is not None else math.nan,
            "std_ratio": float(np.mean(np.std(y_gen[r], 0) / np.std(y_cols, 0))),
        }
        m.update({k: float(terms[k][r]) if k in terms else math.nan for k in METRICS if k not in m})
        m["error_bound"], m["tolerance"] = error_bound(m), held_to(config, estimator.exact)
        model_based = [v for k, v in m.items() if k not in TRUTH_METRICS and k not in SAMPLED_NAN
                       and not (oracle and k in ORACLE_NAN)
                       and (one_d or k not in ONE_D_METRICS)]
        if diverged[r] or not all(math.isfinite(v) for v in model_based):
            m = {k: math.nan for k in m}  # never report a diverged replica as a result
        metrics.append(m)
    flagged = [m["error_bound"] > held_to(config, estimator.exact) for m in metrics]   # NaN (diverged): not flagged
    curves = {}
    if one_d:
        curves = {"y_grid": y_grid, "model_density": model_density, "true_density": true_density,
                  **_histograms(y_gen[..., 0], y_grid)}
        if terms.get("grid") is not None:
            curves.update(_latent_curves(model, process, terms["grid"], y_test))
    else:
        curves = _sample_curves(y_gen, y_cols)
    phases.done()
    return Evaluation(metrics, flagged, curves, pointwise, {**phases.seconds, "total": phases.total()})


def truth_and_error(process, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log p*(y), its error estimate per point) where the truth gives one (log_prob_and_error: the
    paper's and the folded process), else (log_prob(y), NaN): a plug-in truth need only have log_prob."""
    with_error = getattr(process, "log_prob_and_error", None)
    if with_error is not None:
        return with_error(y)
    true_log_p = np.asarray(process.log_prob(y), np.float64)
    return true_log_p, np.full(true_log_p.shape, np.nan)


def held_to(config: EvalConfig, exact: bool) -> float:
    """The tolerance a replica's error_bound is held to: eval.tolerance for exact rules, per point;
    eval.sampling_tolerance for importance sampling, on the means."""
    return config.tolerance if exact else config.sampling_tolerance


def error_bound(m: dict[str, float]) -> float:
    """The largest of a replica's EXACT_BOUNDS it has (inf where a window could not hold a
    posterior); where it has none, its sampling_error_bound (importance sampling); else NaN."""
    bounds = [m[k] for k in EXACT_BOUNDS if not math.isnan(m.get(k, math.nan))]
    return max(bounds) if bounds else m.get("sampling_error_bound", math.nan)


POINTWISE = {
    "log_p": "[R, N] log p_theta(y) of each test point",
    "log_p_error": "[R, N] its error: the quadrature's bound, |fine - coarse| or the posterior mass left at the "
                   "edge of the point's window where larger, of the adaptive rule where the grid's missed "
                   "eval.tolerance (log_p_error_is = 'bound'), or importance sampling's standard error ('stderr')",
    "elbo": "[R, N] the ELBO of the encoder's q",
    "elbo_error": "[R, N] its quadrature bound (inf where neither the grid nor the adaptive rule resolved q), or, "
                  "for the Monte Carlo ELBO beyond latent_dim 2, its standard error",
    "true_log_p": "[N] log p*(y), NaN without a known truth",
    "true_log_p_error": "[N] its quadrature's error estimate: the difference to a coarser rule (the folded "
                        "process refines each point until it is at most data.folded.TRUTH_TOLERANCE, or says by "
                        "how much it missed), NaN where the truth gives none (runs evaluated before it: absent)",
    "elbo_star": "[R, n] on the first n = eval.gap_points test points: ELBO*, the ELBO of the best q found",
    "q_star_raw": "[R, n, P] that q's parameters, the input of model.posterior.from_raw",
}
"""pointwise.npz in a run folder: evaluation's per-point values, for anyone to check the means of
metrics.csv (test_log_likelihood = log_p.mean(1), approximation_gap = (log_p[:, :n] - elbo_star)
.mean(1), ...). A diverged replica's rows are NaN, as its metrics are."""


def _pointwise(terms: dict, log_p, elbo, truth: tuple, exact: bool, diverged: list[bool]) -> dict[str, np.ndarray]:
    """POINTWISE's arrays (the gap search's where it ran), popped from the estimator's terms; `truth`
    is (true_log_p, true_log_p_error), the same for every replica."""
    def copy(v) -> np.ndarray:            # a copy: the NaN rows below change nothing else
        v = v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else v
        return np.array(v, dtype=np.float64)
    out = {"log_p": copy(log_p), "log_p_error": copy(terms.pop("log_p_error")), "elbo": copy(elbo),
           "elbo_error": copy(terms.pop("elbo_error")),
           **{k: copy(terms.pop(k)) for k in ("elbo_star", "q_star_raw") if k in terms}}
    for value in out.values():
        value[np.asarray(diverged, dtype=bool)] = np.nan
    out["true_log_p"], out["true_log_p_error"] = map(copy, truth)
    return {**out, "log_p_error_is": np.array("bound" if exact else "stderr")}


class Phases:
    """Evaluation's progress as lines of text for `report` (None: silent): each phase as it
    starts, with its counts; within a long phase, `step(done, total)` at most every `every`
    seconds, with an ETA; the whole evaluation's time at the end."""

    def __init__(self, report, every: float = 10.0):
        self.report, self.every = report, every
        self.began = self.phase_began = self.last = time.perf_counter()
        self.name = ""
        self.seconds: dict[str, float] = {}      # each finished phase's wall time

    def _close(self) -> None:
        if self.name:
            self.seconds[self.name] = time.perf_counter() - self.phase_began

    def start(self, name: str, what: str) -> None:
        self._close()
        self.name, self.phase_began = name, time.perf_counter()
        self.last = self.phase_began
        if self.report:
            self.report(f"evaluating: {what}")

    def step(self, done: int, total: int, unit: str) -> None:
        now = time.perf_counter()
        if self.report and 0 < done < total and now - self.last >= self.every:
            self.last = now
            eta = (now - self.phase_began) / done * (total - done)
            self.report(f"evaluating: {self.name}, {done:,}/{total:,} {unit}, ETA {eta:.0f} s")

    def total(self) -> float:
        return time.perf_counter() - self.began

    def done(self) -> None:
        self._close()
        if self.report:
            parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())
            self.report(f"evaluated in {self.total():.1f} s ({parts})")


SAMPLE_POINTS, SAMPLE_COORDS = 2000, 6   # D > 1: the generated and test points the figures draw


def _sample_curves(y_gen: np.ndarray, y_test: np.ndarray) -> dict[str, np.ndarray]:
    """For D > 1, what the sample figure draws against each other: the first SAMPLE_POINTS
    generated points of each replica and test points, in the first SAMPLE_COORDS coordinates
    (float32: about 0.3 MB per run at five replicas)."""
    k = min(SAMPLE_COORDS, y_test.shape[1])
    return {"generated": y_gen[:, :SAMPLE_POINTS, :k].astype(np.float32),
            "test_points": y_test[:SAMPLE_POINTS, :k].astype(np.float32), "data_dim": np.asarray(y_test.shape[1])}


ONE_D_METRICS = ("w1_to_truth",)
"""NaN for D > 1: W1 between the model's and the true density of y needs y's CDF. With D > 1,
w1_samples and w1_decoder are the mean over coordinates of the 1-D W1 between marginals, and
std_ratio the mean over coordinates of the ratio of standard deviations."""


def _marginal_w1(a: np.ndarray, b: np.ndarray) -> float:
    """W1 between samples a [n, D] and b [m, D], coordinate by coordinate, averaged over D
    (for D = 1, the W1 of the two samples)."""
    return float(np.mean([_w1(a[:, k], b[:, k]) for k in range(a.shape[1])]))


def _w1(u: np.ndarray, v: np.ndarray) -> float:
    """W1 of two 1-D samples, the integral of |F_u - F_v| between their pooled values: the algorithm
    (and order of operations) of scipy.stats.wasserstein_distance, written here because importing
    scipy.stats cost 0.45-1.0 s in every process that evaluates (with NumPy 2's vecdot, as SciPy sums,
    bitwise equal on 300 random pairs, ties included; tests/test_sources.py holds them equal under NumPy 2)."""
    u, v = np.sort(np.asarray(u, dtype=float)), np.sort(np.asarray(v, dtype=float))   # float64, as scipy's
    pooled = np.sort(np.concatenate((u, v)), kind="mergesort")
    cdf_u = np.searchsorted(u, pooled[:-1], side="right") / u.size
    cdf_v = np.searchsorted(v, pooled[:-1], side="right") / v.size
    gaps, deltas = np.abs(cdf_u - cdf_v), np.diff(pooled)
    return float(np.vecdot(gaps, deltas) if hasattr(np, "vecdot") else np.sum(gaps * deltas))   # as scipy sums


def _true_means(process, n: int) -> np.ndarray | None:
    """The true decoder's outputs at n uniform latents [n, D] (GENERATE_OFFSET's stream), or
    None without a known truth."""
    rng = np.random.default_rng(GENERATE_OFFSET)
    if hasattr(process, "mean"):                                      # data.folded.FoldedProcess
        return process.mean(rng.uniform(size=(n, process.latent_dim)))
    if hasattr(process, "f") and not isinstance(process, UnknownTruth):
        return process.f(rng.uniform(size=n))[:, None]
    return None


SAMPLED_NAN = ("quadrature_error", "grid_edge_mass", "elbo_quadrature_error", "test_log_likelihood_stderr",
               "test_elbo_stderr", "training_grid_error", *GAP_METRICS, "sampling_error_bound", "error_bound")
"""NaN by design on one of the two paths: the quadrature's bounds under importance
sampling, the standard error under quadrature (its error is the bound)."""
ORACLE_NAN = ("test_elbo", "inference_gap")
"""NaN by design for an oracle (train.objective = "exact"), with the ELBO's bound and pointwise values: the
families study reads an oracle's log p alone (gaps.decomposition), and its encoder, trained beside the
maximum-likelihood model only to draw its posterior, is no VAE of the study. Its ELBO used to be refined to
the tolerance all the same, and flagged the replica where it missed: on the families study's two
VampPrior-of-flows oracles (a pool of flows as the prior, at every node of q's rule) that refinement took
171 and 605 s of 931 and 1,040 s of evaluation, the ELBO's rule 24 of 29 s of the likelihoods in a profile on
300 points, and 4 of their 20 replicas were flagged whose log p met the tolerance."""


def _gap_terms(model: VAE, y_test, terms: dict, config: EvalConfig, true_log_p, training_grid,
               phases: Phases) -> dict:
    from .gaps import gap_means, gap_metrics
    from ..objectives.exact import training_log_marginal
    from .quadrature import as_batch
    R, out = terms["log_p"].shape[0], {}
    if training_grid is not None:
        with torch.no_grad():
            y = as_batch(y_test, R, torch.device("cpu"))                       # evaluation runs on the CPU
            on_training_grid = training_log_marginal(model, y, training_grid)   # the span training used
        out["training_grid_error"] = (on_training_grid - terms["log_p"]).abs().amax(1).numpy()
    n = min(config.gap_points, len(y_test))
    truth = None if not np.all(np.isfinite(true_log_p[:n])) else true_log_p[:n]
    if n > 0 and training_grid is not None:
        # an oracle (train.objective = "exact") enters the decomposition through log p alone: its
        # encoder is not trained as a posterior, so the per-point search (measured: over 16 min on
        # a VampPrior oracle) would measure nothing the study uses; its gaps stay NaN
        out.update({k: v.numpy() for k, v in gap_means(terms["log_p"][:, :n], terms["elbo"][:, :n], truth).items()})
    elif n > 0:
        phases.start("the gap search", f"the best q of the family for each of {n:,} test points x "
                                       f"{terms['log_p'].shape[0]} replicas (L-BFGS, at most "
                                       f"{config.gap_steps:,} iterations per start)")
        gaps = gap_metrics(model, y_test[:n], terms["log_p"][:, :n], terms["elbo"][:, :n], truth,
                           config.grid_size, config.grid_span, config.gap_steps,
                           progress=lambda done, total: phases.step(done, total, "point searches"),
                           tolerance=config.tolerance, starts=config.gap_starts)
        out.update({k: v.numpy() for k, v in gaps.items()})
    return out


def metric_rows(evaluation: Evaluation, history) -> list[dict]:
    """One row per seed: its metrics, whether and when it diverged, whether its error bound missed
    eval.tolerance (flagged: left out of every comparison), and its final validation ELBO."""
    R = len(evaluation.metrics)
    final = history.val_elbo[-1] if history.val_elbo else [math.nan] * R
    return [{"seed": i, **m, "diverged": div is not None, "diverged_epoch": div.epoch if div else "",
             "flagged": flagged, "final_val_elbo": final[i]}
            for i, (m, div, flagged) in enumerate(zip(evaluation.metrics, history.divergence, evaluation.flagged))]


@torch.no_grad()
def _probe_posteriors(model: VAE, probes: np.ndarray, window_nodes: int = 2001, per_component: int = 121):
    """q(z|y) and the exact p_theta(z|y) at the probe values of y, each on a plotting
    grid that resolves both: the union of a uniform grid over the window holding
    their mass and the draws of each stratum of q at standard-normal quantiles
    -6..6 (+-6 scales of a Gaussian component: a narrow component between uniform
    nodes would otherwise show as a spike of the wrong area). Returns z, q, p as [R, P, nodes], sorted along z. log p(y) comes
    from the wide uniform grid, so p is normalized exactly as evaluation does."""
    R, P = replica_count(model), len(probes)
    wide = latent_grid(model, PROBE_GRID, PROBE_SPAN)
    y = torch.as_tensor(probes, dtype=torch.float64).reshape(1, -1, 1).expand(R, -1, -1)
    q = model.posterior(y).to(torch.float64)                              # batch [R, 1, P]
    log_p_y = log_marginal(model, probes, wide).log_p                      # [R, P]
    zw = wide.nodes[..., 0]                                                # [R, Gw]
    p_wide = posterior_on_grid(model, probes, wide)                        # [R, P, Gw]
    q_wide = torch.exp(q.log_prob(wide.nodes[:, :, None, :].expand(-1, -1, P, -1))).transpose(1, 2)
    # each stratum's draws at standard-normal quantiles -6..6: nodes where q's mass is, for any family
    eps = torch.linspace(-6, 6, per_component, dtype=torch.float64)
    strata = q.stratified_rsample(eps[None, :, None, None, None].expand(R, -1, q.strata, P, 1))   # [R, n, K, P, 1]
    grids = []
    for r in range(R):
        for j in range(P):
            lo, hi = mass_window(zw[r].numpy(), p_wide[r, j].numpy(), q_wide[r, j].numpy())
            parts = [np.linspace(lo, hi, window_nodes), strata[r, :, :, j, 0].T.reshape(-1).numpy()]
            grids.append(np.sort(np.concatenate(parts)))
    z = torch.as_tensor(np.stack(grids).reshape(R, P, -1))                 # [R, P, S]
    q_density = torch.exp(q.log_prob(z.transpose(1, 2)[..., None]))       # z [R, S, P, 1] -> [R, S, P]
    joint = log_joint(model, probes, z.reshape(R, -1, 1)).reshape(R, P, -1, P)   # [R, P(grid), S, P(y)]
    log_post = torch.diagonal(joint, dim1=1, dim2=3).transpose(1, 2) - log_p_y[:, :, None]  # [R, P, S]
    return z.numpy(), q_density.transpose(1, 2).numpy(), torch.exp(log_post).numpy()


def mass_window(z: np.ndarray, *densities: np.ndarray, level: float = 1e-6) -> tuple[float, float]:
    """The z range where any density exceeds `level` times its peak, padded by 10%."""
    mask = np.zeros_like(z, dtype=bool)
    for d in densities:
        mask |= d > level * d.max()
    lo, hi = z[mask].min(), z[mask].max()
    pad = 0.1 * (hi - lo) + 1e-3
    return float(lo - pad), float(hi + pad)


def _y_grid(y_test: np.ndarray, n: int = 801) -> np.ndarray:
    lo, hi = float(np.min(y_test)), float(np.max(y_test))
    pad = 0.25 * (hi - lo)
    return np.linspace(lo - pad, hi + pad, n)


def _w1_densities(y: np.ndarray, p: np.ndarray, q: np.ndarray) -> float:
    """W1 between two 1-D densities on a uniform grid: int |F_p - F_q| dy (exact up to the grid)."""
    dy = y[1] - y[0]
    return float(np.sum(np.abs(np.cumsum(p - q) * dy)) * dy)


@torch.no_grad()
def _generate(model: VAE, seeds: list[int], n: int):
    gens = make_generators([s + GENERATE_OFFSET for s in seeds])
    z, y = model.generate(gens, n)
    f = model.decoder.mean(z[:, :, None, :])[:, :, 0]
    return z.numpy(), y.double().numpy(), f.double().numpy()            # y, f: [R, n, D]


def _histograms(y_gen: np.ndarray, y_grid: np.ndarray, bins: int = 80) -> dict[str, np.ndarray]:
    """Each replica's generated points y_gen [R, n] as a density on `bins` bins spanning the y grid: counts
    over (all n points x the bin width), an estimate of p_theta(y) on the bins like the exact curve drawn
    beside it, its area the share of points inside. (numpy's density=True divides by the points inside
    only: where some fell outside, it overstated the density, and with none inside it was 0 / 0.)"""
    edges = np.linspace(y_grid[0], y_grid[-1], bins + 1)
    counts = np.stack([np.histogram(y, edges)[0] for y in y_gen])
    return {"hist_edges": edges, "hist_density": counts / (y_gen.shape[1] * np.diff(edges))}


@torch.no_grad()
def _latent_curves(model: VAE, process: PaperProcess, grid, y_test: np.ndarray) -> dict[str, np.ndarray]:
    """Decoder, prior and posteriors on the latent grid (1-D latents only); the posteriors at
    y = the test data's PROBE_QUANTILES (3 significant digits), points the model was fit to
    (the paper's y = 1 and y = -3 lie outside its data, where every posterior is a spike)."""
    if grid.nodes.shape[-1] != 1:
        return {}
    z = grid.nodes                                                         # [R, G, 1]
    decoder = model.decoder.mean(z[:, :, None, :])[:, :, 0, 0].double()    # [R, G]
    prior = torch.exp(model.prior().to(torch.float64).log_prob(z[:, :, None, :])[:, :, 0])
    cdf = torch.cumsum(prior * torch.exp(grid.log_w), 1)                   # [R, G]
    u = np.linspace(0.001, 0.999, 999)
    aligned = np.stack([np.interp(np.interp(u, cdf[r].numpy(), z[r, :, 0].numpy()),
                                  z[r, :, 0].numpy(), decoder[r].numpy()) for r in range(len(z))])
    probes = np.array([float(f"{v:.3g}") for v in np.quantile(y_test, PROBE_QUANTILES)])
    probe_z, q_density, p_density = _probe_posteriors(model, probes)
    z_true = np.linspace(0, 1, 1001)
    return {
        "z_grid": z[..., 0].numpy(), "decoder": decoder.numpy(), "prior_density": prior.numpy(),
        "u_grid": u, "decoder_aligned": aligned, "true_f_aligned": process.f(u),
        "probe_y": probes, "probe_quantile": np.asarray(PROBE_QUANTILES), "probe_z_grid": probe_z, "q_density": q_density, "p_density": p_density,
        "z_true": z_true, "true_posterior": process.posterior(probes, z_true),
    }
