"""The batched rules between the shared grid and the per-point panels (estimators/local_rules.py): each
meets the tolerance where the grid cannot, against a closed form or a rule of 200,001 nodes, and each
gives no bound (inf) where its integrand is finer than its own nodes, so that the panels take over."""
import math

import numpy as np
import torch
from scipy import stats

from mogvae.estimators.local_rules import (COARSE_SPACING, LIKELIHOOD_SLOPE, NODES, SPAN, _too_steep,
                                           narrow_prior_log_p, strata_elbo, zoom_log_p, zoom_log_p_2d)
from mogvae.estimators.quadrature import _refined_elbo, _refined_log_p, _spacing, as_batch, integrate
from mogvae.model.distributions import box
from mogvae.model.mixtures import DiagMixture
from mogvae.model.posteriors import MIN_SCALE
from test_quadrature import SIGMA, linear_vae, linear_vae_3d, random_model
from test_tolerance import _exact, _fine_log_p

F64 = torch.float64


def _narrow_prior_model(scale: float = 2e-3):
    model = random_model("mog-both").double()
    with torch.no_grad():
        model.prior.raw_scale[:, 0, 0] = math.log(math.expm1(scale - MIN_SCALE))
        model.prior.loc[:, 0, 0] = 0.3
    return model


def test_a_prior_component_narrower_than_the_grid_gets_its_own_rule_for_every_point_at_once():
    """A component of scale 2e-3 at a grid spacing near 0.01: split off the grid, it meets 1e-6 in one
    pass at every point whose posterior the grid's core holds, within its bound of 200,001 nodes over
    the point's window; a point whose posterior reaches beyond the core (its window was followed) gets
    no bound here, and the panels take it (to the tolerance all the same)."""
    model = _narrow_prior_model()
    y = np.linspace(-1.5, 1.5, 11)
    grid, exact = _exact(model, y)
    assert bool((model.prior().scale[:, 0, 0, 0, 0] < _spacing(grid)).all())
    log_p, bound = narrow_prior_log_p(model, y, grid, _spacing(grid))
    lo, hi = box(*model.prior().to(F64).reach(8.0))                              # the prior's window, [R, 1]
    core = (exact.window[..., 0] == lo) & (exact.window[..., 1] == hi)             # [R, N]: not followed
    assert int(core.sum()) >= 14 and torch.equal(torch.isfinite(bound), core)
    assert float(bound[core].max()) <= 1e-6
    refined, refined_bound = _refined_log_p(model, y, grid, exact, 1e-6)
    assert torch.equal(refined[core], log_p[core])                                # the panels had nothing to do there
    assert float(refined_bound.max()) <= 1e-6
    for i in range(len(y)):
        err = np.abs(refined[:, i].numpy() - _fine_log_p(model, y[i], exact.window[:, i]))
        assert (err <= refined_bound[:, i].numpy() + 1e-10).all(), (i, err, refined_bound[:, i])


def test_a_likelihood_steeper_than_a_narrow_components_rule_gives_no_bound():
    """The guard: the rule's |fine - coarse| bounds it only while s |f'| / sigma <= LIKELIHOOD_SLOPE on
    its nodes; a linear f of slope a on a component of scale s is judged at s a / sigma."""
    J = NODES[0]
    eps = torch.linspace(-SPAN, SPAN, J, dtype=F64)
    scale, sigma = torch.tensor([[0.01, 0.5]], dtype=F64), 0.1          # [R = 1, K = 2]
    for slope, steep in ((0.9 * LIKELIHOOD_SLOPE, False), (1.1 * LIKELIHOOD_SLOPE, True)):
        a = slope * sigma / 0.01                                         # s a / sigma = slope on the narrow one
        mean = (a * scale[..., None] * eps).reshape(1, -1, 1)           # f at mu_k + s_k eps (mu_k = 0)
        inv = torch.full((1, 1, 1), 1 / sigma, dtype=F64)
        assert bool(_too_steep(mean, inv, scale, torch.tensor([[True, False]]), J)[0]) == steep
    # the wide component is not narrow: it is not judged
    assert not bool(_too_steep(mean, inv, scale, torch.tensor([[False, False]]), J)[0])


def test_a_posterior_narrower_than_the_grid_meets_the_tolerance_on_a_zoomed_window():
    """y = 300 z + b with sigma = 0.3: a posterior of width 1e-3, a tenth of the grid's spacing. On a
    window of its own, log p is N(y; b, sqrt(a^2 + sigma^2)) within a bound of 1e-6, every point at once."""
    a, b = 300.0, 0.2
    model = linear_vae([a], b)
    y = np.array([-250.0, -3.0, 0.0, 41.0, 600.0])
    grid, exact = _exact(model, y)
    assert float((exact.log_p - exact.log_p_coarse).abs().max()) > 1e-3        # the grid does not resolve it
    log_p, bound = zoom_log_p(model, y, grid, torch.ones(len(grid.log_w), len(y), dtype=torch.bool), 1e-6)
    ref = stats.norm.logpdf(y, b, math.sqrt(a ** 2 + SIGMA ** 2))
    assert float(bound.max()) <= 1e-6
    assert (np.abs(log_p[0].numpy() - ref) <= bound[0].numpy() + 1e-10).all()


def test_a_zoomed_window_over_a_narrow_prior_component_gives_no_bound():
    """The zoom's nodes must resolve the prior too: a component narrower than the window's spacing that
    reaches into the window, or narrower than the grid's spacing anywhere (the grid does not see its mass,
    so a window built from the grid's mass could leave it out uncounted: the review's finding), gives
    every point of its replica no bound."""
    model = _narrow_prior_model(2 * MIN_SCALE)
    y = np.linspace(-1.5, 1.5, 5)
    grid, _ = _exact(model, y)
    _, bound = zoom_log_p(model, y, grid, torch.ones(len(grid.log_w), len(y), dtype=torch.bool), 1e-6)
    assert bool(torch.isinf(bound).all())


def _gaussian_q(loc, scale) -> DiagMixture:
    loc = torch.as_tensor(loc, dtype=F64).reshape(1, 1, -1, 1, 1)
    return DiagMixture(torch.zeros(*loc.shape[:4], dtype=F64), loc, torch.full_like(loc, scale))


def _linear_gaussian_elbo(y, a, b, mu, s):
    """ELBO of N(mu, s^2) under y = a z + b + N(0, SIGMA^2), z ~ N(0, 1), in closed form."""
    expected_log_lik = -0.5 * math.log(2 * math.pi * SIGMA ** 2) - ((y - a * mu - b) ** 2 + a ** 2 * s ** 2) / (2 * SIGMA ** 2)
    expected_log_prior = -0.5 * math.log(2 * math.pi) - (mu ** 2 + s ** 2) / 2
    return expected_log_lik + expected_log_prior + 0.5 * math.log(2 * math.pi * math.e * s ** 2)


def test_the_elbo_of_a_q_narrower_than_the_grid_meets_the_tolerance_on_its_strata():
    """A Gaussian q of scale 1e-3 (a tenth of the grid's spacing): the grid gives no bound, and the rule
    on q's own draws meets 1e-6 against the closed form, for every point at once: the panels get none."""
    a, b, s = 300.0, 0.2, 1e-3
    model = linear_vae([a], b)
    y = np.array([-250.0, -3.0, 0.0, 41.0, 600.0])
    mu = (y - b) / a + 2e-4                                     # near the posterior, not at it
    q = _gaussian_q(mu, s)
    elbo, bound = strata_elbo(model, as_batch(y, 1, "cpu"), q, model.prior().to(F64))
    ref = np.array([_linear_gaussian_elbo(v, a, b, m, s) for v, m in zip(y, mu)])
    assert float(bound.max()) <= 1e-6
    assert (np.abs(elbo[0].numpy() - ref) <= bound[0].numpy() + 1e-9).all(), (elbo[0].numpy() - ref, bound)
    grid, _ = _exact(model, y)
    on_grid = integrate(model, y, grid, q=q)
    refined, refined_bound = _refined_elbo(model, y, grid, on_grid, 1e-6, q=q)
    assert torch.equal(refined, elbo) and torch.equal(refined_bound, bound)


def test_a_q_whose_widest_stratum_cannot_resolve_a_narrow_feature_gives_no_bound():
    """A wide stratum's nodes are COARSE_SPACING of its scale apart: a prior or q component narrower than
    that (a narrow bump in log p(z) or log q(z)) could fall between them, so the rule is not trusted."""
    model = _narrow_prior_model(1e-2)
    y = np.array([0.0, 0.5])
    wide = _gaussian_q([0.3, 0.3], 1e-2 / COARSE_SPACING * 1.5)
    resolved = _gaussian_q([0.3, 0.3], 1e-2 / COARSE_SPACING * 0.5)
    for q, finite in ((wide, False), (resolved, True)):
        q2 = DiagMixture(*(t.expand(2, *t.shape[1:]) for t in (q.logits, q.loc, q.scale)))
        _, bound = strata_elbo(model, as_batch(y, 2, "cpu"), q2, model.prior().to(F64))
        assert bool(torch.isfinite(bound).all()) == finite


def test_a_2d_posterior_narrower_than_the_grid_meets_the_tolerance_in_a_box_of_its_own():
    """A 2-D latent whose posterior (width near 0.006) is far narrower than the 101^2 grid's spacing (0.16):
    the grid's log p is off and its bound misses 1e-6; each point refined on a box of its own meets it,
    against the closed form N(y; b, A A^T + sigma^2 I)."""
    from mogvae.estimators.quadrature import latent_grid, log_p_bound
    model, truth = linear_vae_3d(scale=30.0)
    y = truth.rvs(6, random_state=3)
    grid = latent_grid(model, 101, 8.0)
    exact = integrate(model, y, grid, elbo=False)
    ref = truth.logpdf(y)
    assert float(log_p_bound(exact, followed=False).max()) > 1e-6
    log_p, bound = _refined_log_p(model, y, grid, exact, 1e-6)
    assert float(bound.max()) <= 1e-6
    assert (np.abs(log_p[0].numpy() - ref) <= bound[0].numpy() + 1e-9).all(), (log_p[0].numpy() - ref, bound)


def test_a_2d_box_whose_likelihood_is_too_steep_for_its_nodes_gives_no_bound():
    """The guard in 2-D: a box from a grid too coarse to see the posterior's width, on one round, is
    nats off, and its bound is inf (f / sigma changes by more than 1 across its coarse step), not the
    |fine - coarse| that would pass it."""
    from mogvae.estimators import local_rules
    from mogvae.estimators.quadrature import latent_grid
    model, truth = linear_vae_3d(scale=3000.0)
    y = truth.rvs(2, random_state=4)
    grid = latent_grid(model, 101, 8.0)
    rounds, local_rules.ZOOM_ROUNDS = local_rules.ZOOM_ROUNDS, 1
    try:
        value, bound = zoom_log_p_2d(model, y, grid, torch.ones(1, 2, dtype=torch.bool), 1e-6)
    finally:
        local_rules.ZOOM_ROUNDS = rounds
    assert np.abs(value[0].numpy() - truth.logpdf(y)).min() > 1.0       # what the guard keeps out: nats off
    assert bool(torch.isinf(bound).all())


def test_a_2d_elbo_that_misses_the_tolerance_is_refined_on_finer_strata():
    """A 2-D Gaussian q of scale 0.5 over a prior with a component of scale 0.2: a bump in log p(z) that
    the (61, 41) rule on q's draws samples 0.4 of q's scale apart, and its bound misses 1e-6; the
    (121, 81) rule meets 1e-6, within its bound of a 1601^2-node trapezoid rule over z written here in
    NumPy. (At a component of 0.25 the (61, 41) rule's |61 - 41| was 1.8e-10 for an error of 1.7e-8: a
    feature at one coarse node per scale is resolved to about 1e-8, not to the last digit.)"""
    from mogvae.estimators.quadrature import latent_grid
    from mogvae.model.priors import MixturePrior
    model, truth = linear_vae_3d()
    prior = MixturePrior(1, 2, 2).double()
    with torch.no_grad():
        prior.loc[:] = torch.tensor([[[0.0, 0.0], [0.3, 0.2]]])
        prior.raw_scale[:] = torch.log(torch.expm1(torch.tensor([[[1.0, 1.0], [0.2, 0.2]]]) - MIN_SCALE))
    model.prior = prior
    y = truth.rvs(2, random_state=5)
    m, s = np.array([[0.2, 0.1], [-0.3, 0.4]]), 0.5
    q = DiagMixture(torch.zeros(1, 1, 2, 1, dtype=F64), torch.tensor(m).reshape(1, 1, 2, 1, 2),
                    torch.full((1, 1, 2, 1, 2), s, dtype=F64))
    grid = latent_grid(model, 101, 8.0, y=y, q=q)
    exact = integrate(model, y, grid, q=q)
    assert float((exact.elbo - exact.elbo_coarse).abs().max()) > 1e-6
    elbo, bound = _refined_elbo(model, y, grid, exact, 1e-6, q=q)
    assert float(bound.max()) <= 1e-6
    A, b = model.decoder.net.net[0].weight[0].detach().numpy().T, model.decoder.net.net[0].bias[0, 0].detach().numpy()
    for i in range(len(y)):
        t = np.linspace(-8 * s, 8 * s, 1601)
        z = np.stack(np.meshgrid(m[i, 0] + t, m[i, 1] + t, indexing="ij"), -1)          # [n, n, 2]
        log_q = stats.multivariate_normal(m[i], s * s * np.eye(2)).logpdf(z)
        log_lik = stats.multivariate_normal(np.zeros(3), SIGMA**2 * np.eye(3)).logpdf(y[i] - z @ A.T - b)
        log_prior = np.logaddexp(stats.multivariate_normal([0, 0], np.eye(2)).logpdf(z),
                                 stats.multivariate_normal([0.3, 0.2], 0.2**2 * np.eye(2)).logpdf(z)) + math.log(0.5)
        w = np.full(len(t), t[1] - t[0])
        w[[0, -1]] /= 2
        ref = float((np.exp(log_q) * (log_lik + log_prior - log_q) * w[:, None] * w[None, :]).sum())
        assert abs(float(elbo[0, i]) - ref) <= float(bound[0, i]) + 1e-9, (float(elbo[0, i]) - ref, bound)


def test_a_narrow_components_rule_gives_no_bound_where_the_likelihood_peaks_beyond_its_nodes():
    """Review: a likelihood of scale s (s a / sigma = 1, which the steepness guard passes) peaking 11.5
    scales from a narrow component puts much of that component's share of p(y) beyond its rule's +-8
    scales; the rule's |61 - 41| does not see it (measured by the review: 3.5e-4 off, 'bound' 1.25e-4).
    Its outermost nodes do, and the bound is inf; where it is finite it bounds the closed form
    p(y) = sum_k pi_k N(y; a mu_k + b, sqrt(a^2 s_k^2 + sigma^2))."""
    from mogvae.model.priors import MixturePrior
    s = 2e-3
    a, b = SIGMA / s, 0.2                                                    # s a / sigma = 1
    model = linear_vae([a], b)
    prior = MixturePrior(1, 1, 2).double()
    loc, scale = torch.tensor([[[0.3], [5.0]]], dtype=F64), torch.tensor([[[s], [0.5]]], dtype=F64)
    with torch.no_grad():
        prior.loc[:] = loc
        prior.raw_scale[:] = torch.log(torch.expm1(scale - MIN_SCALE))
    model.prior = prior
    y = a * (0.3 + np.array([0.0, 3.0, 11.5, 13.0]) * s) + b               # likelihood peaks 0 to 13 scales out
    grid, exact = _exact(model, y)
    assert float(_spacing(grid)[0].detach()) > s                                     # the component is narrower than the grid
    log_p, bound = narrow_prior_log_p(model, y, grid, _spacing(grid))
    s0, s1 = (float(v) for v in model.prior().scale.detach().flatten())
    ref = np.log(0.5 * stats.norm.pdf(y, a * 0.3 + b, math.hypot(a * s0, SIGMA)) +
                 0.5 * stats.norm.pdf(y, a * 5.0 + b, math.hypot(a * s1, SIGMA)))
    err = np.abs(log_p[0].numpy() - ref)
    assert bool(torch.isinf(bound[0, 2:]).all()) and err[2] > 1e-4          # the far peaks: no bound (and it is off)
    assert (err[:2] <= bound[0, :2].numpy() + 1e-10).all() and float(bound[0, :2].max()) <= 1e-6


def _step_vae(k: float, c: float, height: float, sigma: float = 0.3):
    """f(z) = height (tanh(k (z - c)) + 1) / 2: a step of width 1 / k at c (one tanh unit), prior N(0, 1)."""
    from mogvae.model.decoders import GaussianDecoder
    from mogvae.model.posteriors import GaussianPosterior
    from mogvae.model.priors import StandardNormalPrior
    from mogvae.model.vae import VAE
    decoder = GaussianDecoder(1, 1, 1, hidden=(1,), activation="tanh", noise=sigma).double()
    with torch.no_grad():
        first, second = decoder.net.net[0], decoder.net.net[2]
        first.weight[:], first.bias[:] = k, -k * c
        second.weight[:], second.bias[:] = height / 2, height / 2
    return VAE(StandardNormalPrior(1, 1).double(), GaussianPosterior(1, 1, 1, hidden=()).double(), decoder)


def test_a_decoder_step_between_the_strata_nodes_enters_the_bound():
    """Review: a decoder step narrower than q's nodes (a tanh of width 1e-4 under q = N(0, 1)) falls
    between the nodes of the 61- and the 41-node rule alike; both are 0.1-0.27 nats off while |61 - 41|
    is up to 2.3x smaller. The step's size times the mass between its nodes (local_rules.step_bound)
    enters the bound, which then holds against SciPy's quad with the step as a breakpoint, on q's
    strata and on the 1-D grid; a smooth decoder (width 1) adds nothing that matters."""
    from scipy import integrate as scipy_integrate
    from mogvae.estimators.quadrature import latent_grid, stratum_trapezoid_elbo
    sigma, q = 0.3, _gaussian_q([0.0], 1.0)
    beyond_fine_coarse = []
    for k, c in ((1e4, 0.26), (1e4, 0.54), (1e4, 0.8), (1.0, 0.54)):
        model = _step_vae(k, c, 1.0, sigma).requires_grad_(False)    # evaluated, not trained
        f = lambda z: (math.tanh(k * (z - c)) + 1) / 2                                  # noqa: E731
        integrand = lambda z: stats.norm.pdf(z) * stats.norm.logpdf(0.0, f(z), sigma)     # noqa: E731 (q = p(z))
        ref = scipy_integrate.quad(integrand, -12, 12, points=[c], limit=500, epsabs=1e-13, epsrel=1e-13)[0]
        elbo, bound = strata_elbo(model, as_batch([0.0], 1, "cpu"), q, model.prior().to(F64))
        parts = {"elbo": [], "elbo_coarse": [], "q_mass": []}
        stratum_trapezoid_elbo(model, as_batch([0.0], 1, "cpu"), q, parts, NODES, SPAN)
        error, fine_coarse = abs(float(elbo[0, 0]) - ref), abs(float(parts["elbo"][0] - parts["elbo_coarse"][0]))
        assert error <= float(bound[0, 0]), (k, c, error, bound)
        grid = latent_grid(model, 2001, 8.0, q=q)                      # the 1-D grid's own rule carries it too
        on_grid = _refined_elbo(model, [0.0], grid, integrate(model, [0.0], grid, q=q), None, q=q)
        assert abs(float(on_grid[0][0, 0]) - ref) <= float(on_grid[1][0, 0]), (k, c, on_grid, ref)
        if k > 1:
            beyond_fine_coarse.append(error / fine_coarse)
        else:
            assert float(parts["elbo_steps"][0]) < 1e-9 and error < 1e-9
    assert max(beyond_fine_coarse) > 1.5                   # what the step's term is for: |61 - 41| missed it
