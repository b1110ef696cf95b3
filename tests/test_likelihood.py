"""log p(y) by importance sampling against closed forms and quadrature; the IWAE
bound's order in K; the one entry point's choice of method."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from mogvae.config.schema import TrainConfig, preset
from mogvae.data.paper import PaperProcess
from mogvae.estimators.likelihood import importance_log_likelihood, log_likelihood, monte_carlo_elbo
from mogvae.model.vae import build_model
from mogvae.objectives.bounds import draw_noise, elbo, iwae_bound
from mogvae.estimators.quadrature import integrate, latent_grid
from mogvae.model.layers import initialize, make_generators
from mogvae.training.trainer import fit
from test_quadrature import SIGMA, Y, linear_vae

PAPER_Y = PaperProcess(0.1).sample(150, seed=3)[1]


def random_model(name: str, seeds=(11, 12)):
    model = build_model(preset(name, hidden=(16, 16)), replicas=len(seeds))
    initialize(model, list(seeds))
    return model.eval()


def trained_model(name: str, seeds=(11, 12)):
    """A few epochs: an encoder near the posterior, as importance sampling is used after training."""
    model = random_model(name, seeds)
    y_train, y_val = PaperProcess(0.1).sample(1000, seed=4)[1], PaperProcess(0.1).sample(100, seed=5)[1]
    fit(model, y_train, y_val, TrainConfig(epochs=10, batch_size=100), list(seeds), make_generators(list(seeds)))
    return model.eval()


def quadrature_log_p(model, y) -> torch.Tensor:
    return integrate(model, y, latent_grid(model, 2001, 8.0, y=y), elbo=False).log_p


def test_importance_sampling_matches_the_closed_form_where_quadrature_cannot_go():
    a, b = [1.2, -0.7, 0.4], -0.1
    model = linear_vae(a, b)
    est = log_likelihood(model, Y, n_samples=4000)
    assert est.method == "importance"                                  # latent_dim = 3: auto chooses sampling
    ref = stats.norm.logpdf(Y, b, math.sqrt(sum(x * x for x in a) + SIGMA**2))
    z = (est.value[0].numpy() - ref) / est.error[0].numpy()
    assert np.all(np.abs(z) < 3), z
    assert np.all(est.error[0].numpy() > 0)


@pytest.mark.parametrize("name", ["mfg", "mog-prior", "mog-posterior", "mog-both"])
def test_importance_sampling_agrees_with_quadrature_within_three_standard_errors(name):
    model = trained_model(name)
    est = log_likelihood(model, PAPER_Y, "importance", n_samples=5000, seeds=[5, 6])
    ref = log_likelihood(model, PAPER_Y, "quadrature")
    assert ref.method == "quadrature" and float(ref.error.max()) < 1e-6
    z = (est.value - ref.value) / est.error
    # Gaussian errors would put 0.3% beyond 3 SE; measured 0-3.3% (all low: heavy-tailed weights where
    # q misses part of the posterior, which the sample variance understates; see estimators/likelihood.py)
    assert float((z.abs() > 3).double().mean()) <= 0.05, z
    mean_se = torch.sqrt((est.error ** 2).sum(1)) / est.error.shape[1]
    assert torch.all((est.value.mean(1) - ref.value.mean(1)).abs() < 3 * mean_se + 1e-4)


def test_the_estimators_bias_shrinks_as_k_grows():
    model = random_model("mfg", seeds=(21,))                            # an untrained encoder: a poor proposal
    ref = quadrature_log_p(model, PAPER_Y)
    bias = []
    for k in (2, 16, 128):
        draws = [importance_log_likelihood(model, PAPER_Y, k, [s])[0] for s in range(8)]
        bias.append(float((ref - torch.stack(draws).mean(0)).mean()))
    assert bias[0] > bias[1] > bias[2] > -1e-3, bias                  # log p_hat is biased low, less with K


def test_the_iwae_bound_is_below_log_p_and_rises_with_k_in_expectation():
    model = random_model("mog-both")
    y = torch.as_tensor(PAPER_Y, dtype=torch.float64).reshape(1, -1, 1).expand(2, -1, -1)
    ref = quadrature_log_p(model, PAPER_Y).mean(1)
    gens = make_generators([1, 2])
    with torch.no_grad():
        means = [torch.stack([iwae_bound(model, y, draw_noise(model, gens, y.shape[1], k, torch.float64)).mean(1)
                              for _ in range(20)]).mean(0) for k in (1, 5, 50)]
        elbos = torch.stack([elbo(model, y, draw_noise(model, gens, y.shape[1], 1, torch.float64)).mean(1)
                             for _ in range(20)]).mean(0)
    assert torch.all(elbos < means[0]) and torch.all(means[0] < means[1]) and torch.all(means[1] < means[2])
    assert torch.all(means[2] < ref)
    gaussian = random_model("mfg")                                     # one component: K = 1 is the ELBO itself
    eps = draw_noise(gaussian, gens, y.shape[1], 1, torch.float64)
    with torch.no_grad():
        assert torch.equal(iwae_bound(gaussian, y, eps), elbo(gaussian, y, eps))
    mc = monte_carlo_elbo(model, PAPER_Y, 4000, [1, 2]).mean(1)
    exact = integrate(model, PAPER_Y, latent_grid(model, 2001, 8.0, y=PAPER_Y)).elbo.mean(1)
    assert torch.allclose(mc, exact, atol=0.01)


def test_methods_are_checked():
    model = linear_vae([1.0, 0.5, 0.2], 0.0)
    with pytest.raises(ValueError, match="latent_dim <= 2"):
        log_likelihood(model, Y, "quadrature")
    with pytest.raises(ValueError, match="unknown method"):
        log_likelihood(model, Y, "exact")
    assert log_likelihood(linear_vae([1.0], 0.0), Y).method == "quadrature"


@pytest.mark.parametrize("name", ["mfg", "mog-both"])
def test_the_monte_carlo_elbos_standard_error_matches_the_spread_of_independent_estimates(name):
    """Each point's standard error of the stratified Monte Carlo ELBO (evaluation's elbo_error beyond
    latent_dim 2) against the standard deviation of 40 estimates from independent draws, and the
    estimates' mean against the quadrature ELBO within four of its own standard errors."""
    from mogvae.estimators.likelihood import monte_carlo_elbo_with_error
    model = random_model(name)
    y = PAPER_Y[:6]
    runs = [monte_carlo_elbo_with_error(model, y, 200, [100 + 2 * i, 101 + 2 * i]) for i in range(40)]
    values, errors = torch.stack([v for v, _ in runs]), torch.stack([e for _, e in runs])   # [40, R, N]
    spread = values.std(0)
    ratio = errors.mean(0) / spread
    assert bool(((ratio > 0.7) & (ratio < 1.4)).all()), ratio                  # 40 draws: the sd is known to ~11%
    exact = integrate(model, y, latent_grid(model, 2001, 8.0, y=y)).elbo
    assert bool(((values.mean(0) - exact).abs() < 4 * errors.mean(0) / math.sqrt(40)).all())


def test_a_point_whose_standard_error_misses_its_share_of_the_tolerance_draws_again_to_the_closed_form():
    """draw_again: every point of a 3-D latent whose standard error exceeds point_target doubles its
    draws (up to 16 x) and most end within their target; the others are untouched; each refined estimate
    is within 4 of its standard errors of the closed form, and the mean within its sampling_bound."""
    from mogvae.estimators.likelihood import draw_again, monte_carlo_elbo_with_error, point_target, sampling_bound
    a, b = [0.3, -0.2, 0.1], -0.1
    model = linear_vae(a, b, enc=(0.0, 0.0, 0.0, math.log(math.expm1(1.0))))    # q = the prior, N(0, I)
    y = np.linspace(-1.5, 1.5, 40)
    tolerance = 0.08                                    # standard errors 0.05-0.48 at 200 draws; target 0.126
    target = point_target(tolerance, len(y))
    ref = stats.norm.logpdf(y, b, math.sqrt(sum(x * x for x in a) + SIGMA**2))
    for sampler in (importance_log_likelihood, monte_carlo_elbo_with_error):
        first = sampler(model, y, 200, [7])
        value, se = draw_again(model, y, first, sampler, 200, [7], tolerance)
        missed = first[1] > target
        assert 0 < int(missed.sum()) < len(y)                                  # some points, not all, draw again
        assert torch.equal(value[~missed], first[0][~missed]) and torch.equal(se[~missed], first[1][~missed])
        assert float((se[missed] <= target).double().mean()) >= 0.8            # most within 16 x the draws
        assert float(se[missed].max()) < float(first[1].max())                 # the worst point gained too
        assert float(sampling_bound(se, sampler is importance_log_likelihood)[0]) <= tolerance
        if sampler is importance_log_likelihood:
            assert np.all(np.abs(value[0].numpy() - ref) < 4 * se[0].numpy())
            assert abs(float(value.mean()) - ref.mean()) <= float(sampling_bound(se, biased=True)[0])


def test_a_points_sampled_estimate_does_not_depend_on_its_neighbours_or_on_other_replicas_drawing_again():
    """Each point draws from a stream of its own: its estimate alone equals its estimate among others, in
    any chunks, within the float32 decoder's rounding (one stream per replica gave other draws: off by
    about a standard error); and each replica draws again alone: replica 0's refined numbers are bitwise the same
    whether replica 1 needed nothing or drew again at every point."""
    from mogvae.estimators.likelihood import draw_again
    model = random_model("mog-both")
    y = PAPER_Y[:30]
    every = importance_log_likelihood(model, y, 300, [3, 4])
    some = torch.tensor([4, 17, 29])
    alone = importance_log_likelihood(model, y[some], 300, [3, 4], budget=1, index=some)     # a point per chunk
    for a, b in zip(every, alone):      # the same draws; the float32 decoder rounds a batch of 1 apart (1e-8)
        np.testing.assert_allclose(a[:, some].numpy(), b.numpy(), rtol=0, atol=1e-6)
    quiet = every[0], torch.cat([every[1][:1], torch.zeros_like(every[1][1:])])           # replica 1: se 0
    loud = every[0], torch.cat([every[1][:1], torch.full_like(every[1][1:], 1e3)])        # replica 1: all points
    a, b = (draw_again(model, y, pair, importance_log_likelihood, 300, [3, 4], 1e-3) for pair in (quiet, loud))
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[1][0], b[1][0])
    assert not torch.equal(a[0][1], b[0][1])                                # replica 1 did draw again
