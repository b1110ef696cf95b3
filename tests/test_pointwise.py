"""pointwise.npz (issue 21: "saved for anyone to check"): every run folder keeps evaluation's
per-point values. Checked here as an outsider would, from the saved files only: the means are
metrics.csv's, a point's log p is SciPy's adaptive quad of p(z) p(y|z) within its saved bound,
and the saved best q's ELBO is a Monte Carlo ELBO of that q within its standard error."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import mogvae
from mogvae.objectives.bounds import draw_noise, log_weights
from mogvae.runs.run import RunConfig, RunSession

GAP_POINTS = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pointwise") / "run"
    config = RunConfig(seeds=2, preset="mog-posterior", model={"hidden": [16], "n_components": 3},
                       data={"n_train": 400, "n_val": 100, "n_test": 150}, train={"epochs": 3, "batch_size": 100},
                       eval={"grid_size": 801, "n_generated": 300, "gap_points": GAP_POINTS, "gap_steps": 60})
    RunSession(config, out, log=lambda m: None).train()
    return mogvae.load(out)


def test_the_saved_points_give_metrics_csvs_means(run):
    pw, m = run.pointwise, run.metrics
    assert pw["log_p"].shape == pw["elbo"].shape == (2, 150) and pw["true_log_p"].shape == (150,)
    assert pw["elbo_star"].shape == (2, GAP_POINTS) and pw["q_star_raw"].shape[:2] == (2, GAP_POINTS)
    assert str(pw["log_p_error_is"]) == "bound"
    n = GAP_POINTS
    for r in range(2):
        row = m.iloc[r]
        assert math.isclose(row["test_log_likelihood"], pw["log_p"][r].mean(), abs_tol=1e-12)
        assert math.isclose(row["test_elbo"], pw["elbo"][r].mean(), abs_tol=1e-12)
        assert math.isclose(row["true_log_likelihood"], pw["true_log_p"].mean(), abs_tol=1e-12)
        assert math.isclose(row["quadrature_error"], pw["log_p_error"][r].max(), rel_tol=1e-12)
        assert math.isclose(row["approximation_gap"], (pw["log_p"][r, :n] - pw["elbo_star"][r]).mean(), abs_tol=1e-12)
        assert math.isclose(row["amortization_gap"], (pw["elbo_star"][r] - pw["elbo"][r, :n]).mean(), abs_tol=1e-12)
        assert np.all(pw["elbo_star"][r] >= pw["elbo"][r, :n])           # the encoder's q is a candidate


def test_a_points_log_p_is_scipys_quad_within_its_saved_bound(run):
    pw, y = run.pointwise, run.data("test")
    for r in range(2):
        model = run.model(replica=r)
        with torch.no_grad():
            prior, sigma = model.prior(), float(model.decoder.noise()[0, 0])
        loc, scale = prior.loc[0, 0, 0, :, 0].numpy(), prior.scale[0, 0, 0, :, 0].numpy()   # its components
        weights = torch.softmax(prior.logits[0, 0, 0], -1).numpy()

        def integrand(z, yy):
            with torch.no_grad():
                f = float(model.decoder.mean(torch.full((1, 1, 1, 1), z))[0, 0, 0, 0])
            return float(np.sum(weights * stats.norm.pdf(z, loc, scale))) * stats.norm.pdf(yy, f, sigma)
        lo, hi = float((loc - 12 * scale).min()), float((loc + 12 * scale).max())
        for i in (0, 7, 33):
            value = integrate.quad(integrand, lo, hi, args=(y[i],), epsabs=0, epsrel=1e-6, limit=400)[0]
            assert abs(math.log(value) - pw["log_p"][r, i]) <= pw["log_p_error"][r, i] + 2e-6, (r, i)  # quad: 1e-6


def test_the_saved_truth_is_scipys_quad_within_its_saved_estimate(run):
    pw, y = run.pointwise, run.data("test")
    sigma = run.config.data.sigma
    assert pw["true_log_p_error"].shape == (150,) and np.all(pw["true_log_p_error"] <= 1e-4)
    f = lambda z: np.where(z < 0.5, (2 * z - 0.5) ** 2, (2 * z - 1.5) ** 2)   # the paper's decoder
    for i in (0, 7, 33, 149):
        value = integrate.quad(lambda z: stats.norm.pdf(y[i], f(z), sigma), 0, 1, points=[0.5], epsabs=0,
                               epsrel=1e-12, limit=500)[0]
        assert abs(math.log(value) - pw["true_log_p"][i]) <= pw["true_log_p_error"][i] + 1e-11, i


def test_the_saved_best_q_has_the_saved_elbo_by_monte_carlo(run):
    """The q of q_star_raw, rebuilt with the posterior family's own map, has ELBO elbo_star: a
    stratified Monte Carlo ELBO of 20,000 draws per component agrees within 5 standard errors."""
    pw, y = run.pointwise, run.data("test")[:GAP_POINTS]
    for r in range(2):
        model = run.model(replica=r).double()
        with torch.no_grad():
            q = model.posterior.from_raw(torch.as_tensor(pw["q_star_raw"][r:r + 1]))
            yy = torch.as_tensor(y, dtype=torch.float64).reshape(1, -1, 1)
            eps = draw_noise(model, [torch.Generator().manual_seed(5)], GAP_POINTS, n_samples=20_000,
                             dtype=torch.float64)
            log_w, pi = log_weights(model, yy, eps, q)                      # [1, n, K, B], [1, 1, K, B]
            per_stratum = log_w.mean(1)                                      # [1, K, B]
            se = torch.sqrt(((log_w.var(1) / log_w.shape[1]) * pi[:, 0] ** 2).sum(1))[0]
            estimate = (per_stratum * pi[:, 0]).sum(1)[0]
        assert torch.all((estimate - torch.as_tensor(pw["elbo_star"][r])).abs() <= 5 * se + 1e-6), r
