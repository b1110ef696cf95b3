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
    """refine_sampled: every point of a 3-D latent whose standard error exceeds point_target doubles its
    draws (up to 16 x) and ends within its target; the others are untouched; each refined estimate is
    within 4 of its standard errors of the closed form, and the mean within its sampling_bound."""
    from mogvae.estimators.likelihood import (importance_log_likelihood, monte_carlo_elbo_with_error, point_target,
                                              refine_sampled, sampling_bound)
    a, b = [0.3, -0.2, 0.1], -0.1
    model = linear_vae(a, b, enc=(0.0, 0.0, 0.0, math.log(math.expm1(1.0))))    # q = the prior, N(0, I)
    y = np.linspace(-1.5, 1.5, 40)
    first = importance_log_likelihood(model, y, 200, [7]), monte_carlo_elbo_with_error(model, y, 200, [7])
    tolerance = 0.08                                    # standard errors 0.05-0.48 at 200 draws; target 0.126
    target = point_target(tolerance, len(y))
    (lp, se), (el, el_se) = refine_sampled(model, y, *first, 200, [7], tolerance)
    missed_lp, missed_el = first[0][1] > target, first[1][1] > target
    assert 0 < int(missed_lp.sum()) < len(y) and int(missed_el.sum()) > 0     # some points, not all, draw again
    assert torch.equal(lp[~missed_lp], first[0][0][~missed_lp]) and torch.equal(el[~missed_el], first[1][0][~missed_el])
    for after, missed in ((se, missed_lp), (el_se, missed_el)):         # most within 16 x the draws, not all
        assert float((after[missed] <= target).double().mean()) >= 0.8
        assert float(after[missed].max()) < float(first[0][1].max())        # the worst point gained too
    ref = stats.norm.logpdf(y, b, math.sqrt(sum(x * x for x in a) + SIGMA**2))
    assert np.all(np.abs(lp[0].numpy() - ref) < 4 * se[0].numpy())
    assert abs(float(lp.mean()) - ref.mean()) <= float(sampling_bound(se, biased=True)[0])
    assert float(sampling_bound(se, True)[0]) <= tolerance and float(sampling_bound(el_se, False)[0]) <= tolerance


def test_a_replicas_sampled_estimates_do_not_depend_on_whether_another_replica_drew_again():
    """Each replica draws again alone, on its own stream: replica 0's refined numbers are bitwise the
    same whether replica 1 needed nothing or every point drew again."""
    from mogvae.estimators.likelihood import importance_log_likelihood, monte_carlo_elbo_with_error, refine_sampled
    model = random_model("mog-both")
    y = PAPER_Y[:30]
    first = importance_log_likelihood(model, y, 300, [3, 4]), monte_carlo_elbo_with_error(model, y, 300, [3, 4])
    quiet = tuple((v, torch.cat([s[:1], torch.zeros_like(s[1:])])) for v, s in first)       # replica 1: se 0
    loud = tuple((v, torch.cat([s[:1], torch.full_like(s[1:], 1e3)])) for v, s in first)    # replica 1: every point
    a, b = (refine_sampled(model, y, *pairs, 300, [3, 4], 1e-3) for pairs in (quiet, loud))
    for (va, sa), (vb, sb) in zip(a, b):
        assert torch.equal(va[0], vb[0]) and torch.equal(sa[0], sb[0])
    assert not torch.equal(a[0][0][1], b[0][0][1])                           # replica 1 did draw again
