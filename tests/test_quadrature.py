"""Quadrature against closed forms (a linear-Gaussian VAE), finer grids and Monte Carlo."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from mogvae.config.schema import EvalConfig, preset
from mogvae.model.decoders import GaussianDecoder
from mogvae.model.mixtures import DiagMixture
from mogvae.model.vae import VAE, build_model
from mogvae.objectives.bounds import draw_noise, elbo, iwae_bound, log_weights
from mogvae.model.posteriors import GaussianPosterior
from mogvae.model.priors import StandardNormalPrior
from mogvae.estimators.quadrature import hermite_rule, integrate, latent_grid, log_marginal, posterior_on_grid
from mogvae.model.layers import initialize, make_generators
from reference import quadrature_elbo

SIGMA = 0.3
Y = np.array([-1.0, -0.2, 0.0, 0.4, 1.3, 2.5])


def linear_vae(a: list[float], b: float, enc=(0.5, 0.1, -1.0, 0.2)) -> VAE:
    """Decoder y = a.z + b (no hidden layer), prior N(0, I), linear encoder:
    mu = enc[0] y + enc[1], raw scale = enc[2] y + enc[3] (per latent dim)."""
    D = len(a)
    decoder = GaussianDecoder(1, D, 1, hidden=(), noise=SIGMA).double()
    posterior = GaussianPosterior(1, D, 1, hidden=()).double()
    with torch.no_grad():
        decoder.net.net[0].weight[:] = torch.tensor(a, dtype=torch.float64).reshape(1, D, 1)
        decoder.net.net[0].bias[:] = b
        w = posterior.encoder.net[0].weight        # [1, 1, 2D]
        w[0, 0, :D], w[0, 0, D:] = enc[0], enc[2]
        bias = posterior.encoder.net[0].bias
        bias[0, 0, :D], bias[0, 0, D:] = enc[1], enc[3]
    return VAE(StandardNormalPrior(1, D).double(), posterior, decoder)


def gaussian_q(model, y):
    q = model.posterior(torch.tensor(y, dtype=torch.float64).reshape(1, -1, 1))
    return q.loc[0, 0, :, 0, 0].detach().numpy(), q.scale[0, 0, :, 0, 0].detach().numpy()


def test_marginal_matches_linear_gaussian_closed_form_1d():
    a, b = 1.7, 0.3
    model = linear_vae([a], b)
    grid = latent_grid(model, 2001, 8.0)
    got = log_marginal(model, Y, grid)
    ref = stats.norm.logpdf(Y, b, math.sqrt(a**2 + SIGMA**2))
    np.testing.assert_allclose(got.log_p[0].numpy(), ref, atol=1e-10)
    assert got.edge_mass.max() < 1e-12


def test_marginal_matches_linear_gaussian_closed_form_2d():
    a, b = [1.2, -0.7], -0.1
    model = linear_vae(a, b)
    grid = latent_grid(model, 301, 8.0)
    got = log_marginal(model, Y, grid).log_p[0].numpy()
    ref = stats.norm.logpdf(Y, b, math.sqrt(sum(x * x for x in a) + SIGMA**2))
    np.testing.assert_allclose(got, ref, atol=1e-8)


def linear_vae_3d(scale: float = 1.0):
    """y = scale A z + b + noise, A [3, 2], z ~ N(0, I_2), any encoder: (the model, p(y) = N(b, scale^2
    A A^T + sigma^2 I_3) as a SciPy distribution)."""
    A = scale * np.array([[1.2, -0.4], [0.3, 0.9], [-0.8, 0.5]])
    b = np.array([0.1, -0.3, 0.2])
    decoder = GaussianDecoder(1, 2, 3, hidden=(), noise=SIGMA).double()
    posterior = GaussianPosterior(1, 2, 3, hidden=()).double()
    initialize(posterior, [0])                                 # any encoder: log p does not depend on it
    with torch.no_grad():
        decoder.net.net[0].weight[:] = torch.tensor(A.T[None])    # [1, 2, 3]: z [.., 2] @ W -> [.., 3]
        decoder.net.net[0].bias[:] = torch.tensor(b)
    model = VAE(StandardNormalPrior(1, 2).double(), posterior, decoder)
    return model, stats.multivariate_normal(b, A @ A.T + SIGMA**2 * np.eye(3))


def test_marginal_matches_the_closed_form_with_3d_observations_and_a_2d_latent():
    """y = A z + b + noise, A [3, 2], z ~ N(0, I_2): p(y) = N(b, A A^T + sigma^2 I_3)."""
    model, truth = linear_vae_3d()
    y = truth.rvs(8, random_state=1)
    got = log_marginal(model, y, latent_grid(model, 301, 8.0)).log_p[0].numpy()
    np.testing.assert_allclose(got, truth.logpdf(y), atol=1e-8)


def test_model_posterior_matches_closed_form():
    a, b = 1.7, 0.3
    model = linear_vae([a], b)
    grid = latent_grid(model, 2001, 8.0)
    post = posterior_on_grid(model, Y, grid)[0].numpy()                     # [N, G]
    z = grid.nodes[0, :, 0].numpy()
    v = SIGMA**2 / (a**2 + SIGMA**2)
    m = a * (Y - b) / (a**2 + SIGMA**2)
    ref = stats.norm.pdf(z[None], m[:, None], math.sqrt(v))
    np.testing.assert_allclose(post, ref, atol=1e-9)


def test_quadrature_elbo_and_gap_match_closed_form():
    a, b = 1.7, 0.3
    model = linear_vae([a], b)
    mu, s = gaussian_q(model, Y)
    expected_loglik = -0.5 * math.log(2 * math.pi * SIGMA**2) - ((Y - a * mu - b) ** 2 + a**2 * s**2) / (2 * SIGMA**2)
    kl_prior = 0.5 * (s**2 + mu**2 - 1 - np.log(s**2))
    ref_elbo = expected_loglik - kl_prior
    got = quadrature_elbo(model, Y, 16)[0].numpy()
    np.testing.assert_allclose(got, ref_elbo, atol=1e-10)
    on_grid = integrate(model, Y, latent_grid(model, 2001, 8.0, y=Y))
    np.testing.assert_allclose(on_grid.elbo[0].numpy(), ref_elbo, atol=1e-9)
    np.testing.assert_allclose(on_grid.q_mass[0].numpy(), 1.0, atol=1e-12)
    # inference gap = KL(q || exact posterior), Gaussian closed form
    v = SIGMA**2 / (a**2 + SIGMA**2)
    m = a * (Y - b) / (a**2 + SIGMA**2)
    kl = np.log(np.sqrt(v) / s) + (s**2 + (mu - m) ** 2) / (2 * v) - 0.5
    log_p = log_marginal(model, Y, latent_grid(model, 2001, 8.0)).log_p[0].numpy()
    np.testing.assert_allclose(log_p - got, kl, atol=1e-9)


def test_hermite_rule_integrates_gaussian_moments():
    x, w = hermite_rule(10, 2)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-14)
    assert float((w * x[:, 0] ** 2 * x[:, 1] ** 4).sum()) == pytest.approx(3.0, abs=1e-12)  # E z1^2 z2^4


def random_model(name: str, seed: int = 0, latent_dim: int = 1, steepness: float = 8.0) -> VAE:
    model = build_model(preset(name, hidden=(16, 16), latent_dim=latent_dim, n_components=3), replicas=2)
    initialize(model, [seed, seed + 1])
    with torch.no_grad():  # a steeper decoder than at initialization: narrow, multimodal posteriors
        model.decoder.net.net[-1].weight.mul_(steepness)
    return model


@pytest.mark.parametrize("name", ["mfg", "mog-prior", "mog-posterior", "mog-both"])
@pytest.mark.parametrize("latent_dim", [1, 2])
def test_elbo_never_exceeds_exact_log_likelihood(name, latent_dim):
    model = random_model(name, latent_dim=latent_dim)
    y = np.linspace(-2, 2, 41)
    size = 2001 if latent_dim == 1 else 201
    exact = integrate(model, y, latent_grid(model, size, 8.0, y=y))
    err = (exact.log_p - exact.log_p_coarse).abs() + (exact.elbo - exact.elbo_coarse).abs()
    assert bool((exact.elbo <= exact.log_p + err + 1e-7).all()), float((exact.elbo - exact.log_p).max())


@pytest.mark.parametrize("name", ["mfg", "mog-posterior"])
def test_stratified_monte_carlo_elbo_converges_to_quadrature(name):
    model = random_model(name)
    y = torch.tensor([-0.5, 0.1, 0.8], dtype=torch.float64).reshape(1, 3, 1).expand(2, -1, -1)
    n = 4000
    eps = draw_noise(model, make_generators([11, 12]), 3, n_samples=n, dtype=torch.float64)
    with torch.no_grad():
        log_w, pi = log_weights(model, y, eps)                                # [R, n, K, B]
        per_draw = (log_w * pi).sum(2)                                       # [R, n, B]: iid draws of the estimator
        mc = per_draw.mean(1)
        se = per_draw.std(1) / math.sqrt(n)
        assert torch.allclose(mc, elbo(model, y, eps))
    exact = quadrature_elbo(model, y[0, :, 0].numpy(), 32)
    z = ((mc - exact) / se).abs()
    assert bool((z < 5).all()), z


@pytest.mark.parametrize("name", ["mfg", "mog-posterior"])
def test_iwae_bound_lies_between_elbo_and_log_likelihood_and_tightens(name):
    """E[IWAE_K] rises with K from about the ELBO towards log p, both by quadrature.
    Expectations are estimated over 400 independent realizations per K, with
    their standard errors: every claim is checked to 4 standard errors."""
    model = random_model(name, steepness=1.0)
    y = np.array([0.05, 0.1, 0.3])
    yt = torch.tensor(y, dtype=torch.float64).reshape(1, 3, 1).expand(2, -1, -1)
    log_p = log_marginal(model, y, latent_grid(model, 2001, 8.0)).log_p               # [R, 3]
    exact_elbo = quadrature_elbo(model, y, 32)
    assert bool((exact_elbo < log_p - 1e-3).all())                                    # a gap to close
    means, ses = [], []
    gens = make_generators([3, 4])
    with torch.no_grad():
        for K in (1, 4, 32, 256):
            draws = torch.stack([iwae_bound(model, yt, draw_noise(model, gens, 3, n_samples=K, dtype=torch.float64))
                                 for _ in range(400)])                                   # [400, R, 3]
            means.append(draws.mean(0))
            ses.append(draws.std(0) / math.sqrt(len(draws)))
    if name == "mfg":   # one draw of a Gaussian q: IWAE_1 is the ELBO's estimator, unbiased for it
        assert bool(((means[0] - exact_elbo).abs() < 4 * ses[0]).all())
    else:               # one draw per component, importance-weighted across them: already above the ELBO
        assert bool((means[0] > exact_elbo - 4 * ses[0]).all())
    for (m_lo, s_lo), (m_hi, s_hi) in zip(zip(means, ses), zip(means[1:], ses[1:])):
        assert bool((m_hi > m_lo - 4 * torch.sqrt(s_lo**2 + s_hi**2)).all())            # rises with K
        assert bool((m_hi < log_p + 4 * s_hi).all())                                    # a lower bound
    assert bool(((log_p - means[-1]) < 0.25 * (log_p - exact_elbo)).all())             # most of the gap closed


def test_grid_error_bound_holds_against_a_much_finer_grid():
    # float64 networks: a float32 decoder adds evaluation noise of ~1e-6 nats that
    # differs between grids (the bound covers quadrature error, not rounding).
    model = random_model("mog-both").double()
    y = np.linspace(-1.5, 1.5, 31)
    m = log_marginal(model, y, latent_grid(model, 401, 8.0))
    ref = log_marginal(model, y, latent_grid(model, 20001, 8.0)).log_p  # same span: resolution only
    actual = (m.log_p - ref).abs()
    bound = (m.log_p - m.log_p_coarse).abs()
    assert bool((actual <= bound + 1e-12).all())
    assert float(actual.max()) > 0  # the test has something to bound


def test_edge_mass_flags_a_truncating_grid():
    model = random_model("mog-both").double()
    y = np.array([0.0, 1.5])
    narrow, wide = (log_marginal(model, y, latent_grid(model, 2001, span)) for span in (3.0, 12.0))
    truncation = (narrow.log_p - wide.log_p).abs()
    assert float(truncation.max()) > 1e-6
    # wherever the narrow grid truncates, it says so through the edge mass
    flagged = narrow.edge_mass > 1e-8
    assert bool(flagged[truncation > 1e-6].all())
    assert float(wide.edge_mass.max()) < 1e-8


def test_default_grid_error_is_below_1e_4_nats_on_a_trained_model():
    from mogvae.config.schema import TrainConfig
    from mogvae.data.paper import PaperProcess, make_splits
    from mogvae.training.trainer import fit
    data = make_splits(PaperProcess(), {"train": 2000, "val": 200, "test": 2000}, 0)
    for name in ("mfg", "mog-posterior"):
        model = build_model(preset(name), replicas=1)
        gens = initialize(model, [0])
        fit(model, data["train"], data["val"], TrainConfig(epochs=15), [0], gens)
        cfg = EvalConfig()
        m = integrate(model, data["test"], latent_grid(model, cfg.grid_size, cfg.grid_span, y=data["test"]))
        assert float((m.log_p - m.log_p_coarse).abs().max()) < 1e-4
        assert float((m.elbo - m.elbo_coarse).abs().max()) < 1e-4
        assert float((1 - m.q_mass).abs().max()) < 1e-10
        assert float(m.edge_mass.max()) < 1e-10
        assert float((m.log_p - m.elbo).min()) > -1e-6  # the gap is a KL divergence



@pytest.mark.parametrize("name", ["mfg", "mog-prior", "mog-posterior", "mog-both"])
def test_grid_elbo_agrees_with_gauss_hermite(name):
    # two independent rules for the same integral; steepness 1 keeps the integrand smooth enough for GH
    model = random_model(name, steepness=1.0).double()
    y = np.linspace(-1, 1, 25)
    grid_elbo = integrate(model, y, latent_grid(model, 2001, 8.0, y=y)).elbo
    torch.testing.assert_close(grid_elbo, quadrature_elbo(model, y, 96), rtol=0, atol=1e-7)


def test_posterior_width_is_a_mode_width_not_the_spread_between_modes():
    from mogvae.estimators.quadrature import _posterior_scale
    z = torch.linspace(-10, 10, 20001, dtype=torch.float64)[None]
    one = stats.norm.logpdf(z.numpy(), 0, 0.05)
    two = np.logaddexp(stats.norm.logpdf(z.numpy(), -3, 0.05), stats.norm.logpdf(z.numpy(), 3, 0.05))
    terms = torch.tensor(np.stack([one, two], -1))                     # [1, G, 2]
    width = _posterior_scale(torch.softmax(terms, dim=1), z[:, 1] - z[:, 0])[0]
    assert float(width[0]) == pytest.approx(0.05, rel=1e-6)
    assert float(width[1]) == pytest.approx(0.10, rel=1e-6)            # two modes: twice a mode's sigma, not ~3


@pytest.mark.parametrize("name,latent_dim", [("mog-both", 1), ("mog-posterior", 2)])
def test_memory_bounded_chunks_give_the_same_numbers(name, latent_dim):
    """Evaluation works in chunks that bound its memory; the split must not change
    a single point's result (every point's sum is its own)."""
    model = random_model(name, latent_dim=latent_dim)
    y = np.linspace(-2, 2, 37)
    grid = latent_grid(model, 2001 if latent_dim == 1 else 101, 8.0, y=y)
    roomy = integrate(model, y, grid, budget=10**9, elbo_budget=10**12)
    tight = integrate(model, y, grid, budget=10**9, elbo_budget=5_000)         # a point or two at a time
    for field in ("elbo", "elbo_coarse", "q_mass"):
        torch.testing.assert_close(getattr(tight, field), getattr(roomy, field), rtol=0, atol=1e-12, msg=field)
    tight = integrate(model, y, grid, budget=5_000, elbo=False)
    for field in ("log_p", "log_p_coarse", "edge_mass"):
        torch.testing.assert_close(getattr(tight, field), getattr(roomy, field), rtol=0, atol=1e-12, msg=field)


def test_the_truth_in_small_chunks_is_the_same():
    from mogvae.data.paper import PaperProcess
    p = PaperProcess(0.01)                                   # many nodes: the default chunks are small
    y = np.linspace(-0.5, 1.0, 301)
    np.testing.assert_allclose(p.log_prob(y, budget=10**4), p.log_prob(y, budget=10**9), rtol=0, atol=1e-12)


def test_2d_elbo_of_a_narrow_q_matches_the_closed_form_with_3d_observations():
    """y = A z + b + noise, z ~ N(0, I_2), q = N(m(y), diag s^2) with s near 0.007: far narrower
    than the 301^2 grid's spacing over the prior (0.05), which the rule over q's own draws does not
    need. ELBO = E_q log N(y; Az + b, sigma^2 I) + E_q log N(z; 0, I) + H(q), each in closed form."""
    A = np.array([[1.2, -0.4], [0.3, 0.9], [-0.8, 0.5]])
    b = np.array([0.1, -0.3, 0.2])
    decoder = GaussianDecoder(1, 2, 3, hidden=(), noise=SIGMA).double()
    posterior = GaussianPosterior(1, 2, 3, hidden=()).double()
    initialize(posterior, [0])
    with torch.no_grad():
        decoder.net.net[0].weight[:] = torch.tensor(A.T[None])
        decoder.net.net[0].bias[:] = torch.tensor(b)
        posterior.encoder.net[0].weight[0, :, 2:] = 0.0           # a constant raw scale ...
        posterior.encoder.net[0].bias[0, 0, 2:] = -5.0            # ... of about 0.007
    model = VAE(StandardNormalPrior(1, 2).double(), posterior, decoder)
    y = stats.multivariate_normal(b, A @ A.T + SIGMA**2 * np.eye(3)).rvs(6, random_state=2)
    q = model.posterior(torch.tensor(y).reshape(1, -1, 3))
    m, s = q.loc[0, 0, :, 0].detach().numpy(), q.scale[0, 0, :, 0].detach().numpy()     # [N, 2]
    assert s.max() < 0.01
    fit = (-0.5 * 3 * math.log(2 * math.pi * SIGMA**2)
           - (((y - m @ A.T - b) ** 2).sum(1) + (s**2 @ (A**2).T).sum(1)) / (2 * SIGMA**2))
    prior = (-math.log(2 * math.pi) - 0.5 * (m**2 + s**2).sum(1))
    entropy = (0.5 * np.log(2 * math.pi * math.e * s**2)).sum(1)
    got = integrate(model, y, latent_grid(model, 301, 8.0))
    np.testing.assert_allclose(got.elbo[0].numpy(), fit + prior + entropy, rtol=0, atol=1e-8)
    assert (got.elbo - got.elbo_coarse).abs().max() < 1e-6 and (got.q_mass - 1).abs().max() < 1e-12


@pytest.mark.parametrize("name", ["mog-both", "mog-posterior", "mfg"])
def test_a_points_elbo_does_not_depend_on_the_points_beside_it(name):
    """Issue 21: the 1-D ELBO rule's stride was set per chunk of 128 sorted points, so a point's
    ELBO moved (2.6e-6 nats measured) with its neighbours. Now each point's own scales set it.
    q is given, so the float32 encoder's batch-size rounding (about 3e-8) is not in the comparison;
    what remains is float64 summation order (1e-16 relative)."""
    model = random_model(name, latent_dim=1)
    y = np.concatenate([np.linspace(-2, 2, 200), [0.37, 5.0, -4.0]])          # dense, and far from the rest
    grid = latent_grid(model, 2001, 8.0, y=y)
    with torch.no_grad():
        q = model.posterior(torch.as_tensor(y, dtype=torch.float32).reshape(1, -1, 1).expand(2, -1, 1))
    together = integrate(model, y, grid, q=q)
    for idx in ([200], [201, 202], list(range(0, 200, 7)), list(range(150, 203))):
        alone = integrate(model, y[idx], grid, q=q.select(torch.as_tensor(idx)))
        for field in ("elbo", "elbo_coarse", "q_mass", "elbo_steps"):
            torch.testing.assert_close(getattr(alone, field), getattr(together, field)[:, idx], rtol=1e-14, atol=1e-13,
                                       msg=f"{field} at {idx}")


def test_a_window_cut_by_the_grids_edge_reads_no_step_from_its_padding():
    """Each point's ELBO is summed over its own window, padded to the longest of the points evaluated
    with it. A window cut by the grid's edge ends where its q still has mass; the padding past it (its
    last node repeated) must not read as a decoder step there (issue 21: a point's bound would depend on
    its neighbours)."""
    model = random_model("mfg", latent_dim=1)
    grid = latent_grid(model, 201, 8.0)                                   # nodes on [-8, 8]
    loc = torch.tensor([7.0, 0.0], dtype=torch.float64).reshape(1, 1, 2, 1, 1).expand(2, 1, 2, 1, 1)
    scale = torch.tensor([0.5, 3.0], dtype=torch.float64).reshape(1, 1, 2, 1, 1).expand(2, 1, 2, 1, 1)
    q = DiagMixture(torch.zeros(2, 1, 2, 1, dtype=torch.float64), loc, scale)   # the first cut at z = 8
    y = np.array([0.4, -0.2])
    together = integrate(model, y, grid, q=q)
    alone = integrate(model, y[:1], grid, q=q.select(torch.tensor([0])))
    assert float(alone.q_mass.min()) < 0.99                               # the edge cuts the first q's mass
    for field in ("elbo", "elbo_coarse", "q_mass", "elbo_steps"):
        torch.testing.assert_close(getattr(alone, field), getattr(together, field)[:, :1], rtol=1e-14, atol=1e-15,
                                   msg=field)


def test_a_posterior_beyond_the_priors_window_is_followed_and_its_bound_bounds():
    """y far out puts the posterior of a linear-Gaussian VAE outside the prior's +-8 window (at z ~ 11
    and ~ -13 here): the window follows it, log p matches the closed form within the reported bound,
    and a point's value does not depend on the points evaluated beside it."""
    from mogvae.estimators.quadrature import follow_posteriors, log_p_bound, quadrature_log_likelihood
    a, b = 1.0, 0.0
    model = linear_vae([a], b)
    y = np.array([0.3, 12.0, -14.0, 1.0])
    ref = stats.norm.logpdf(y, b, math.sqrt(a**2 + SIGMA**2))
    grid = latent_grid(model, 2001, 8.0, y=y)
    truncated = integrate(model, y, grid, elbo=False)
    assert abs(float(truncated.log_p[0, 1]) - ref[1]) > 1.0      # the prior's window alone is far off
    followed = follow_posteriors(model, y, grid, truncated, 2001, 8.0)
    bound = log_p_bound(followed)[0].numpy()
    err = np.abs(followed.log_p[0].numpy() - ref)
    assert (err <= np.maximum(bound, 1e-12)).all() and err.max() < 1e-8, (err, bound)
    assert float(followed.edge_mass.max()) < 1e-9
    assert np.array_equal(followed.log_p[0, [0, 3]].numpy(), truncated.log_p[0, [0, 3]].numpy())  # only the far points
    alone = quadrature_log_likelihood(model, y[1:2])
    assert float(alone.value[0, 0]) == float(followed.log_p[0, 1])


def test_a_window_that_cannot_follow_its_posterior_far_enough_says_so_in_its_bound():
    """With too few nodes allowed to widen the window, the posterior goes on beyond it: no finite bound
    is reported (inf flags the replica), where the rule's |fine - coarse| alone understated the error."""
    from mogvae.estimators.quadrature import follow_posteriors, log_p_bound
    model = linear_vae([1.0], 0.0)
    y = np.array([40.0])
    ref = stats.norm.logpdf(y, 0.0, math.sqrt(1 + SIGMA**2))
    grid = latent_grid(model, 2001, 8.0)
    stuck = follow_posteriors(model, y, grid, integrate(model, y, grid, elbo=False), 2001, 8.0, max_nodes=4001)
    err = abs(float(stuck.log_p[0, 0]) - ref[0])
    assert err > 3 * float((stuck.log_p - stuck.log_p_coarse).abs().max())    # the rule alone understates it
    assert log_p_bound(stuck)[0, 0] == math.inf
