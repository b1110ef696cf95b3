"""Every density against SciPy in float64."""
import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from mogvae.config.schema import preset
from mogvae.model.mixtures import DiagMixture
from mogvae.model.vae import build_model
from mogvae.model.layers import initialize


def scipy_mixture_logpdf(x, w, loc, scale):
    """x [n, D]; w [K]; loc, scale [K, D] -> [n]"""
    comps = np.stack([stats.norm.logpdf(x, loc[k], scale[k]).sum(-1) for k in range(len(w))], -1)
    return logsumexp(comps + np.log(w), axis=-1)


@pytest.mark.parametrize("K,D", [(1, 1), (3, 1), (4, 2)])
def test_mixture_log_prob_matches_scipy(K, D):
    rng = np.random.default_rng(0)
    R, B, S = 2, 3, 5
    logits = rng.normal(size=(R, 1, B, K))
    loc = rng.normal(size=(R, 1, B, K, D))
    scale = rng.uniform(0.1, 2, size=(R, 1, B, K, D))
    z = rng.normal(size=(R, S, B, D)) * 2
    q = DiagMixture(*(torch.tensor(a) for a in (logits, loc, scale)))
    got = q.log_prob(torch.tensor(z)).numpy()
    for r in range(R):
        for b in range(B):
            w = np.exp(logits[r, 0, b]) / np.exp(logits[r, 0, b]).sum()
            ref = scipy_mixture_logpdf(z[r, :, b], w, loc[r, 0, b], scale[r, 0, b])
            np.testing.assert_allclose(got[r, :, b], ref, rtol=1e-12, atol=1e-12)


def test_standard_normal_prior_matches_scipy():
    model = build_model(preset("mfg", latent_dim=2), replicas=2).double()
    z = torch.randn(2, 7, 1, 2, dtype=torch.float64)
    ref = stats.multivariate_normal(np.zeros(2), np.eye(2)).logpdf(z.numpy().reshape(-1, 2)).reshape(2, 7, 1)
    np.testing.assert_allclose(model.prior().log_prob(z).detach().numpy(), ref, rtol=1e-12)


def test_mixture_prior_matches_scipy_with_its_learned_parameters():
    model = build_model(preset("mog-prior", n_components=5), replicas=3).double()
    initialize(model, [1, 2, 3])
    with torch.no_grad():
        model.prior.raw_scale.normal_()  # arbitrary scales
    p = model.prior()
    z = torch.linspace(-4, 4, 50, dtype=torch.float64).reshape(1, 50, 1, 1).expand(3, -1, -1, -1)
    got = p.log_prob(z).detach().numpy()[:, :, 0]
    for r in range(3):
        ref = scipy_mixture_logpdf(z[r, :, 0].numpy(), np.full(5, 0.2), p.loc[r, 0, 0].detach().numpy(),
                                   p.scale[r, 0, 0].detach().numpy())
        np.testing.assert_allclose(got[r], ref, rtol=1e-12)


def test_mixture_posterior_is_normalized_and_matches_scipy():
    model = build_model(preset("mog-posterior", n_components=4), replicas=2).double()
    initialize(model, [5, 6])
    y = torch.tensor([[[0.1], [0.3]], [[-0.2], [1.0]]], dtype=torch.float64)  # [R=2, B=2, 1]
    q = model.posterior(y)
    z = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    zz = z.reshape(1, -1, 1, 1).expand(2, -1, 2, 1)
    dens = torch.exp(q.log_prob(zz))                                         # [R, S, B]
    np.testing.assert_allclose(torch.trapezoid(dens, z, dim=1).detach().numpy(), 1.0, atol=1e-9)
    r, b = 1, 0
    ref = scipy_mixture_logpdf(z[:100, None].numpy(), np.full(4, 0.25), q.loc[r, 0, b].detach().numpy(),
                               q.scale[r, 0, b].detach().numpy())
    np.testing.assert_allclose(q.log_prob(zz)[r, :100, b].detach().numpy(), ref, rtol=1e-12)


def test_decoder_log_prob_matches_scipy():
    model = build_model(preset("mfg"), replicas=2, noise=0.3).double()
    initialize(model, [0, 1])
    z = torch.randn(2, 4, 3, 1, dtype=torch.float64)
    y = torch.randn(2, 3, 1, dtype=torch.float64)
    mean = model.decoder.mean(z)
    got = model.decoder.log_prob(y, z).detach().numpy()
    ref = stats.norm.logpdf(y[:, None].numpy(), mean.detach().numpy(), 0.3)[..., 0]
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_a_decoder_with_learned_noise_per_output_matches_scipy():
    """Several outputs (summed axis by axis) and more than SQUARED_BY_AXIS (summed by torch.sum), each
    with its own learned noise, in float64 and float32."""
    from mogvae.model.distributions import SQUARED_BY_AXIS
    for Y in (3, SQUARED_BY_AXIS + 4):
        for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            model = build_model(preset("mog-posterior", learn_decoder_noise=True), replicas=2, data_dim=Y).to(dtype)
            initialize(model, [3, 4])
            with torch.no_grad():
                model.decoder.log_noise.uniform_(-3, 1)
            z = torch.randn(2, 4, 3, 1, dtype=dtype)
            y = torch.randn(2, 3, Y, dtype=dtype)
            mean = model.decoder.mean(z).detach().double().numpy()
            sigma = model.decoder.noise().detach().double().numpy()                    # [R, Y]
            got = model.decoder.log_prob(y, z).detach().double().numpy()
            ref = stats.norm.logpdf(y[:, None].double().numpy(), mean, sigma[:, None, None]).sum(-1)
            np.testing.assert_allclose(got, ref, rtol=rtol)


def test_stratified_draws_use_each_component_and_weights_are_the_mixture_weights():
    model = build_model(preset("mog-posterior", n_components=3, learn_weights=True), replicas=1).double()
    initialize(model, [0])
    y = torch.zeros(1, 2, 1, dtype=torch.float64)
    q = model.posterior(y)
    eps = torch.zeros(1, 1, 3, 2, 1, dtype=torch.float64)
    z = q.stratified_rsample(eps)  # zero noise: exactly the component means
    np.testing.assert_allclose(z[0, 0, :, :, 0].detach().numpy(), q.loc[0, 0, :, :, 0].T.detach().numpy())
    # learned (unequal) weights: the strata carry torch.distributions' own mixture probabilities
    probs = q.distribution().mixture_distribution.probs[0, 0]                     # [B, K]
    assert float(probs.detach().std()) > 1e-3
    np.testing.assert_allclose(q.stratum_weights()[0, 0].T.detach().numpy(), probs.detach().numpy(), rtol=1e-12)


def test_direct_density_equals_exp_log_prob():
    rng = np.random.default_rng(1)
    q = DiagMixture(torch.tensor(rng.normal(size=(2, 1, 3, 4))), torch.tensor(rng.normal(size=(2, 1, 3, 4, 2))),
                    torch.tensor(rng.uniform(0.2, 1.5, size=(2, 1, 3, 4, 2))))
    z = torch.tensor(rng.normal(size=(2, 6, 3, 2)) * 2)
    torch.testing.assert_close(q.density(z), torch.exp(q.log_prob(z)), rtol=1e-12, atol=0)


def test_mixture_log_prob_and_its_gradient_match_torch_distributions_on_narrow_components_far_out():
    """log_prob is written out (fewer passes than MixtureSameFamily): it must give torch.distributions'
    values and gradients, also for components of scale 1e-4 met at up to 60 scales, in float32 (training)
    and float64 (evaluation)."""
    rng = np.random.default_rng(1)
    R, B, S, K, D = 2, 3, 40, 5, 2
    raw = [rng.normal(size=(R, 1, B, K)), rng.normal(size=(R, 1, B, K, D)),
           10 ** rng.uniform(-4, 0, size=(R, 1, B, K, D))]
    offsets = rng.uniform(-60, 60, size=(R, S, B, D))
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        params = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in raw]
        q = DiagMixture(*params)
        z = (q.loc[:, :, :, 0].detach() + torch.tensor(offsets, dtype=dtype) * q.scale[:, :, :, 0].detach())
        z = z.reshape(R, S, B, D).requires_grad_(True)
        ours, theirs = q.log_prob(z), q.distribution().log_prob(z)
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=0)
        for a, b in zip(torch.autograd.grad(ours.sum(), [*params, z]), torch.autograd.grad(theirs.sum(), [*params, z])):
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())
