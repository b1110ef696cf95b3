import numpy as np
import pytest
from scipy import integrate, stats

from mogvae.data.paper import PaperProcess, make_splits


def scipy_log_prob(y, sigma):
    f = PaperProcess.f
    val, _ = integrate.quad(lambda z: stats.norm.pdf(y, f(z), sigma), 0, 1, points=[0.25, 0.5, 0.75],
                            epsabs=0, epsrel=1e-12, limit=500)
    return np.log(val)


@pytest.mark.parametrize("sigma", [0.1, 0.03, 0.5])
def test_log_prob_matches_adaptive_integration(sigma):
    p = PaperProcess(sigma)
    ys = np.array([-0.3, -0.05, 0.0, 0.1, 0.2, 0.24, 0.25, 0.26, 0.4, 0.7])
    ref = np.array([scipy_log_prob(y, sigma) for y in ys])
    np.testing.assert_allclose(p.log_prob(ys), ref, rtol=0, atol=1e-9)


def test_log_prob_far_tails_are_finite_and_match_asymptotics():
    # Far outside the data the integral is dominated by the extremes of f; scipy's
    # quad underflows there, so compare against the same integral in log space on a fine grid.
    p = PaperProcess(0.1)
    z = np.linspace(0, 1, 2_000_001)
    for y in (-3.0, 1.0):
        log_int = p.log_likelihood(y, z)
        m = log_int.max()
        ref = m + np.log(np.trapezoid(np.exp(log_int - m), z))
        assert np.isfinite(p.log_prob(y)[0])
        assert abs(p.log_prob(y)[0] - ref) < 1e-6


def test_density_integrates_to_one_over_y():
    p = PaperProcess(0.1)
    y = np.linspace(-1.5, 1.75, 20001)
    assert abs(np.trapezoid(np.exp(p.log_prob(y)), y) - 1) < 1e-9


def test_posterior_integrates_to_one_and_matches_bayes():
    p = PaperProcess(0.1)
    z = np.linspace(0, 1, 200001)
    ys = np.array([1.0, 0.2, -3.0, 0.05])
    post = p.posterior(ys, z)
    np.testing.assert_allclose(np.trapezoid(post, z, axis=1), 1.0, atol=1e-6)
    # Bayes: p(z|y) = N(y; f(z), s^2) / p(y) with a uniform prior, checked at a point
    i = 12345
    assert post[1, i] == pytest.approx(stats.norm.pdf(0.2, p.f(z[i]), 0.1) / np.exp(p.log_prob(0.2)[0]), rel=1e-10)


def test_true_posterior_is_multimodal_where_the_paper_says():
    p = PaperProcess(0.1)
    z = np.linspace(0, 1, 10001)
    post = p.posterior(np.array([-3.0]), z)[0]
    peaks = (post[1:-1] > post[:-2]) & (post[1:-1] > post[2:])
    np.testing.assert_allclose(np.sort(z[1:-1][peaks]), [0.25, 0.75], atol=1e-3)


def test_f_is_the_papers_function():
    f = PaperProcess.f
    np.testing.assert_allclose(f(np.array([0.0, 0.25, 0.5, 0.75, 1.0])), [0.25, 0.0, 0.25, 0.0, 0.25])
    assert f(0.4) == pytest.approx((0.8 - 0.5) ** 2)
    assert f(0.6) == pytest.approx((1.2 - 1.5) ** 2)


def test_sample_is_reproducible_and_has_the_right_law():
    p = PaperProcess(0.1)
    z1, y1 = p.sample(50_000, seed=3)
    z2, y2 = p.sample(50_000, seed=3)
    assert np.array_equal(y1, y2) and y1.dtype == np.float64
    assert stats.kstest(z1, "uniform").pvalue > 1e-3
    resid = (y1 - p.f(z1)) / 0.1
    assert stats.kstest(resid, "norm").pvalue > 1e-3


def test_splits_are_independent_of_each_others_size():
    p = PaperProcess()
    a = make_splits(p, {"train": 100, "test": 50}, seed=0)
    b = make_splits(p, {"train": 300, "test": 50}, seed=0)
    assert np.array_equal(a["test"], b["test"])
    # separate streams: no shared draws (continuous values), and the same distribution
    assert np.intersect1d(b["train"], b["test"]).size == 0
    big = make_splits(p, {"train": 5000, "test": 5000}, seed=1)
    assert stats.ks_2samp(big["train"], big["test"]).pvalue > 1e-3


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_bad_sigma_is_refused(bad):
    with pytest.raises(ValueError, match="sigma"):
        PaperProcess(bad)


def test_the_public_api_names_the_process():
    import mogvae
    truth = mogvae.PaperProcess(sigma=0.1)
    z, y = truth.sample(10, seed=0)
    assert truth.log_prob(y).shape == (10,) and truth.f(z).shape == (10,)
