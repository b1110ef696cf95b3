"""eval.tolerance (issue 21, "exact means exact"): in 1-D, every point whose quadrature bound misses
the tolerance is refined adaptively until it meets it, checked against closed forms and a rule 10x
(and more) finer than the one it refines; a replica that still misses it is flagged in metrics.csv
and left out of every mean, comparison and verdict of the reports, which say so."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from mogvae.estimators.quadrature import (_refined_elbo, _refined_log_p, follow_posteriors, integrate,
                                          latent_grid, log_joint, log_p_bound)
from mogvae.model.mixtures import DiagMixture
from mogvae.model.posteriors import MIN_SCALE
from test_quadrature import SIGMA, linear_vae, random_model

F64 = torch.float64


def _exact(model, y, size=2001):
    grid = latent_grid(model, size, 8.0, y=y)
    return grid, follow_posteriors(model, y, grid, integrate(model, y, grid), size, 8.0)


def _fine_log_p(model, y_i: float, window, nodes=200_001) -> np.ndarray:
    """log p(y) per replica by the trapezoid rule on `nodes` nodes over the point's window [R, 2]."""
    t = torch.linspace(0, 1, nodes, dtype=F64)
    z = window[:, :1] + (window[:, 1:] - window[:, :1]) * t                    # [R, nodes]
    terms = log_joint(model, np.array([y_i]), z[..., None])[..., 0]          # [R, nodes]
    return (torch.logsumexp(terms, 1) + torch.log(z[:, 1] - z[:, 0])).numpy()


@pytest.mark.parametrize("tolerance", [1e-4, 1e-6])
def test_log_p_under_a_prior_component_narrower_than_the_grid_meets_the_tolerance(tolerance):
    """A prior component of scale 2e-3 against the grid's spacing of about 0.01: the grid's bound
    misses the tolerance by up to 1 nat near it, and elsewhere understates the error (the two rules
    alias the component alike: 4.4e-7 for an error of 4.6e-7), so every point is refined; each then
    meets the tolerance, within its bound of a rule of 200,001 nodes over the same window."""
    model = random_model("mog-both").double()
    with torch.no_grad():
        model.prior.raw_scale[:, 0, 0] = math.log(math.expm1(2e-3 - MIN_SCALE))
        model.prior.loc[:, 0, 0] = 0.3
    y = np.linspace(-1.5, 1.5, 11)[[1, 3, 4, 5, 6, 7, 9]]       # near the component and away from it
    grid, exact = _exact(model, y)
    before = log_p_bound(exact)
    assert float(before.max()) > 0.1                                      # the grid alone does not resolve it
    log_p, bound = _refined_log_p(model, y, grid, exact, tolerance)
    assert float(bound.max()) <= tolerance
    for i in range(len(y)):
        ref = _fine_log_p(model, y[i], exact.window[:, i])
        err = np.abs(log_p[:, i].numpy() - ref)
        assert (err <= bound[:, i].numpy() + 1e-10).all(), (i, err, bound[:, i])


def test_a_point_the_grid_resolves_keeps_the_grids_value():
    """Refinement goes only where the bound misses the tolerance: with every component resolved, the
    points whose grid bound meets it keep the grid's value, bit for bit."""
    model = random_model("mog-both", steepness=30.0).double()
    y = np.linspace(-1.5, 1.5, 11)
    grid, exact = _exact(model, y, size=301)           # coarse and steep enough that some points miss 1e-9
    before = log_p_bound(exact)
    log_p, bound = _refined_log_p(model, y, grid, exact, 1e-9)
    resolved = (before <= 1e-9).all(0)
    assert 0 < int(resolved.sum()) < len(y)
    assert torch.equal(log_p[:, resolved], exact.log_p[:, resolved])
    assert float(bound.max()) <= 1e-9


def test_log_p_of_a_steep_linear_decoder_matches_the_closed_form():
    """y = 300 z + b with sigma = 0.3: a posterior of width 1e-3, a tenth of the grid's spacing.
    Refined at 1e-6, log p is N(y; b, sqrt(a^2 + sigma^2)) within the bound."""
    a, b = 300.0, 0.2
    model = linear_vae([a], b)
    y = np.array([-250.0, -3.0, 0.0, 41.0, 600.0])
    ref = stats.norm.logpdf(y, b, math.sqrt(a ** 2 + SIGMA ** 2))
    grid, exact = _exact(model, y)
    log_p, bound = _refined_log_p(model, y, grid, exact, 1e-6)
    err = np.abs(log_p[0].numpy() - ref)
    assert float(bound.max()) <= 1e-6 and (err <= bound[0].numpy() + 1e-10).all(), (err, bound)


def _narrow_q(R: int, N: int, scales=(1e-3, 0.05, 0.5)) -> DiagMixture:
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(R, 1, N, len(scales), 1, generator=g, dtype=F64)
    scale = torch.tensor(scales, dtype=F64)[None, None, None, :, None].expand(R, 1, N, len(scales), 1)
    return DiagMixture(torch.zeros(R, 1, N, len(scales), dtype=F64), loc, scale)


def _fine_elbo(model, y_i: float, q, nodes=500_001) -> np.ndarray:
    """The ELBO of q (one point) per replica by the trapezoid rule on `nodes` nodes over its reach."""
    lo, hi = float(q.loc.min() - 8 * q.scale.max()), float(q.loc.max() + 8 * q.scale.max())
    z = torch.linspace(lo, hi, nodes, dtype=F64)
    R = q.loc.shape[0]
    log_q = q.log_prob(z[None, :, None, None].expand(R, -1, 1, 1))[..., 0]          # [R, nodes]
    terms = log_joint(model, np.array([y_i]), z[None, :, None].expand(R, -1, 1))[..., 0]
    return ((torch.exp(log_q) * (terms - log_q)).sum(1) * (z[1] - z[0])).numpy()


def test_the_elbo_of_a_q_narrower_than_the_grid_has_no_grid_bound_and_is_refined_to_the_tolerance():
    """A q with a component of scale 1e-3: the grid's two rules both sample it at a node or two and can
    agree while both are nats off (measured: 50 nats off, |fine - coarse| 0.33), so the grid gives no
    bound; refined on panels that follow q's components, each point meets 1e-6 against a rule of
    500,001 nodes (28 per scale of the narrow component)."""
    model = random_model("mog-both").double()
    y = np.linspace(-1.5, 1.5, 4)
    q = _narrow_q(2, len(y))
    grid = latent_grid(model, 2001, 8.0, y=y, q=q)
    on_grid = integrate(model, y, grid, q=q)
    ref = np.stack([_fine_elbo(model, v, q.select(slice(i, i + 1))) for i, v in enumerate(y)], 1)    # [R, N]
    assert np.abs(on_grid.elbo.numpy() - ref).max() > 1.0                           # what the grid gets wrong
    elbo, bound = _refined_elbo(model, y, grid, on_grid, 1e-6, q=q)
    assert float(bound.max()) <= 1e-6
    assert (np.abs(elbo.numpy() - ref) <= bound.numpy() + 1e-8).all()


def test_a_budget_too_small_leaves_the_bound_above_the_tolerance_and_a_cut_window_is_not_refined():
    """The budget spent, the bound that is left is reported (not the tolerance); the same point with the
    budget meets it. A replica whose window cut its posterior off keeps its value and bound, while the
    other replica at the same point is refined."""
    from mogvae.estimators.adaptive import refine_log_p
    model = random_model("mog-both").double()
    with torch.no_grad():
        model.prior.raw_scale[:, 0, 0] = math.log(math.expm1(2e-3 - MIN_SCALE))
        model.prior.loc[:, 0, 0] = 0.3
    y = np.array([0.0])
    grid, exact = _exact(model, y)
    bound, held = log_p_bound(exact), torch.ones(2, 1, dtype=torch.bool)
    assert float(bound.min()) > 1e-12
    _, small, _ = refine_log_p(model, y, exact.log_p, bound, exact.window, held, grid, 1e-12, max_nodes=1)
    _, enough, _ = refine_log_p(model, y, exact.log_p, bound, exact.window, held, grid, 1e-12)
    assert float(small.min()) > 1e-12 and float(enough.max()) <= 1e-12
    cut = torch.tensor([[False], [True]])
    log_p, after, refined = refine_log_p(model, y, exact.log_p, bound, exact.window, cut, grid, 1e-12)
    assert refined == 1 and float(after[0, 0]) == float(bound[0, 0]) and float(log_p[0, 0]) == float(exact.log_p[0, 0])
    assert float(after[1, 0]) <= 1e-12


def _row(ll: float, flagged: str | None = "False", bound: float = 1e-7) -> dict:
    row = {"diverged": "False", "test_log_likelihood": ll, "error_bound": bound, "tolerance": 1e-4,
           "quadrature_error": bound, "elbo_quadrature_error": bound, "gap_rule_error": math.nan}
    return row if flagged is None else {**row, "flagged": flagged}


def test_a_flagged_replica_is_left_out_of_every_mean_comparison_and_verdict_and_listed():
    from mogvae.report.statistics import paired, summary_rows
    from mogvae.report.sweep import exactness_lines, verdict_lines
    from mogvae.studies.paired import by_cell
    metrics = {"a": {0: _row(1.0), 1: _row(1.1), 2: _row(50.0, "True", 0.4)},
               "b": {0: _row(0.5), 1: _row(0.7), 2: _row(0.6)}}
    iv = paired(metrics, "a", "b", "test_log_likelihood")
    assert iv.n == 2 and iv.mean == pytest.approx(0.45)                      # seed 2's 50 nats is not in it
    cells = [{"name": "a", "values": {}}, {"name": "b", "values": {}}]
    verdict = " ".join(verdict_lines(cells, metrics))
    assert "(1.0500 nats per point)" in verdict and "1 flagged replica left out" in verdict
    exact = "\n".join(exactness_lines(cells, metrics))
    assert "1 of 6 replicas missed their tolerance" in exact and "- a, seed 2: bound 0.4 nats" in exact
    table = summary_rows(metrics, ["a"], [("test_log_likelihood", "LL", 2), ("error_bound", "bound", 0)])
    assert table[0][3] == "1.05 ± 0.07" and table[0][4] == "≤ 1.0e-07 (1 flagged, left out)"
    rows = [{"model": m, "seed": s, **r} for m, runs in metrics.items() for s, r in runs.items()]
    cells_by_level = by_cell(rows, lambda r: 0, ["test_log_likelihood"])
    assert sorted(cells_by_level[("a", 0)]) == [0, 1]


def test_a_row_written_before_the_flag_is_flagged_by_its_bounds_against_the_default_tolerance():
    from mogvae.report.statistics import counted, flagged
    assert flagged(_row(0.0, None, bound=2e-4)) and not counted(_row(0.0, None, bound=2e-4))
    assert not flagged(_row(0.0, None, bound=5e-5)) and counted(_row(0.0, None, bound=5e-5))


def test_a_run_whose_bounds_miss_its_tolerance_is_flagged_in_metrics_csv_and_its_report(tmp_path):
    """End to end: a tolerance no rule can meet (1e-300) flags every replica; a tolerance the grid
    meets flags none. The report says which and why."""
    import mogvae
    from mogvae.report.sweep import write_run_report
    from mogvae.runs.run import RunConfig, RunSession
    for tolerance, expected in ((1e-300, "True"), (1e-2, "False")):
        out = tmp_path / f"run{tolerance:g}"
        config = RunConfig(seeds=2, preset="mfg", model={"hidden": [8]},
                           data={"n_train": 200, "n_val": 50, "n_test": 30}, train={"epochs": 2, "batch_size": 100},
                           eval={"grid_size": 401, "n_generated": 200, "gap_points": 0, "tolerance": tolerance})
        RunSession(config, out, log=lambda m: None).train()
        metrics = mogvae.load(out).metrics
        assert list(metrics["flagged"].astype(str)) == [expected] * 2
        assert (metrics["tolerance"] == tolerance).all()
        assert (metrics["error_bound"] == metrics[["quadrature_error", "elbo_quadrature_error"]].max(axis=1)).all()
        report = write_run_report(out, "run").read_text()
        assert ("2 of 2 replicas missed their tolerance" in report) == (expected == "True")


def test_a_vampprior_of_flows_puts_its_knots_into_the_flows_rule_and_meets_the_tolerance():
    """The knots of a VampPrior of flows cut the flow posterior's pieces: its piecewise rule is then
    smooth on every piece, its |8 - 4| bound meets the default tolerance (float64 networks), and it agrees
    with the adaptive panels (an independent rule, refined to 1e-10) within that bound."""
    from mogvae.estimators.adaptive import refine_elbo
    from test_flows import PAPER_Y, flow_model
    from zuko.transforms import MonotonicRQSTransform

    from mogvae.model.flows import BOUND
    model = flow_model("vamp").double()
    y = PAPER_Y[:10]
    with torch.no_grad():                       # a flow's knots in z are its draws at the base's knots
        q = model.posterior(torch.as_tensor(y).reshape(1, -1, 1).expand(2, -1, -1)).to(F64)
        spline = MonotonicRQSTransform(q.widths, q.heights, q.derivatives, bound=BOUND)  # zuko's, as a reference
        base = spline.horizontal[:, 0, :, 0, :]                                        # [R, B, bins + 1]
        drawn = q.stratified_rsample(base.permute(0, 2, 1)[:, :, None, :, None])      # [R, bins + 1, 1, B, 1]
        assert torch.allclose(q.knots(), drawn[:, :, 0, :, 0].permute(0, 2, 1), atol=1e-12)
        assert model.prior().to(F64).knots().shape == (2, 1, 10 * (base.shape[-1]))   # every member's
    grid = latent_grid(model, 2001, 8.0, y=y)
    got = integrate(model, y, grid)
    bound = (got.elbo - got.elbo_coarse).abs()
    assert float(bound.max()) <= 1e-4
    ref, ref_bound, _ = refine_elbo(model, y, got.elbo, torch.full_like(bound, math.inf), None, grid, 1e-10)
    assert float(ref_bound.max()) <= 1e-10
    assert bool(((got.elbo - ref).abs() <= bound + 1e-10).all())


def test_the_knotted_flow_rule_in_small_chunks_gives_the_same_elbo():
    """Memory is bounded by taking points a few at a time: the numbers do not depend on the split."""
    from mogvae.estimators.quadrature import _piecewise_elbo_chunk
    from test_flows import PAPER_Y, flow_model
    model = flow_model("vamp").double()
    y = torch.as_tensor(PAPER_Y[:40]).reshape(1, -1, 1).expand(2, -1, -1).double()
    whole, split = ({k: [] for k in ("elbo", "elbo_coarse", "q_mass")} for _ in range(2))
    with torch.no_grad():
        q = model.posterior(y).to(F64)
        _piecewise_elbo_chunk(model, y, q, whole)
        _piecewise_elbo_chunk(model, y, q, split, budget=50_000)        # a few points at a time
    for key in whole:
        assert torch.allclose(whole[key][0], split[key][0], rtol=0, atol=1e-12), key


def test_refinement_is_a_phase_of_evaluation_with_its_progress():
    """Evaluation says when points are refined, how many, and how far along (the likelihood phase once
    stood still for 16 minutes while one replica's points were refined one at a time)."""
    from mogvae.config.schema import EvalConfig
    from mogvae.estimators.evaluate import Phases
    from mogvae.estimators.quadrature import quadrature_terms
    lines = []
    phases = Phases(lines.append, every=0.0)
    model = random_model("mog-both", steepness=30.0).double()
    y = np.linspace(-1.5, 1.5, 11)
    terms = quadrature_terms(model, y, None, EvalConfig(grid_size=301, tolerance=1e-9), phases=phases)
    phases.done()
    assert float(terms["quadrature_error"].max()) <= 1e-9
    started = [line for line in lines if "whose bound misses eval.tolerance = 1e-09" in line]
    assert started and started[0].startswith("evaluating: log p of ")
    assert any(line.startswith("evaluating: refining log p, ") and "ETA" in line for line in lines)
    assert "refining log p" in lines[-1]                                  # its time in the closing line


def test_the_grid_pass_shows_its_progress_point_by_point():
    """The grid's own pass reports the points done after each chunk (on digits at d_z = 2 it ran 20
    minutes without a line), and its numbers are those of the pass without progress, and of the
    closed form."""
    from mogvae.estimators.quadrature import latent_grid
    from test_quadrature import linear_vae_3d
    model, truth = linear_vae_3d()
    y = truth.rvs(7, random_state=2)
    grid = latent_grid(model, 101, 8.0)
    done = []
    shown = integrate(model, y, grid, budget=2 * 101 ** 2, progress=done.append)      # two points a chunk
    assert done == [2, 4, 6, 7]
    silent = integrate(model, y, grid, budget=2 * 101 ** 2)
    assert torch.equal(shown.log_p, silent.log_p) and torch.equal(shown.elbo, silent.elbo)
    np.testing.assert_allclose(shown.log_p[0].numpy(), truth.logpdf(y), atol=1e-6)
