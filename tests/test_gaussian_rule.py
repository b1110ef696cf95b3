"""The gap search's rule for a Gaussian q in 1-D (estimators/gaussian_rule.py) and the search on it, against
SciPy's adaptive quadrature, finite differences and a brute-force search scored by a fine trapezoid."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from mogvae.estimators import gaussian_rule
from mogvae.estimators.gaps import best_posterior
from mogvae.estimators.quadrature import as_batch, hermite_rule
from mogvae.estimators.tabulated import tabulated
from mogvae.model.mixtures import DiagMixture
from test_quadrature import random_model

F64 = torch.float64


def _model(name: str, seed: int = 3, noise: float | None = None, sharpness: float = 1.0):
    """test_quadrature's steep random model in float64 (so that SciPy's quad integrates a smooth function,
    not a float32 staircase), out of autograd as the search holds it; `noise`, the decoder's sigma;
    `sharpness` scales its first layer (features that much narrower in z, as trained decoders have)."""
    model = random_model(name, seed=seed).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.decoder.net.net[0].weight.mul_(sharpness)
    if noise is not None:
        model.decoder.known_noise = noise
    return model


def _log_joint(model, y: float, z: np.ndarray, replica: int) -> np.ndarray:
    """log p(y, z) of the network at the nodes z, for one replica."""
    zz = torch.as_tensor(z, dtype=F64).reshape(1, -1, 1, 1).expand(2, -1, 1, 1)
    yy = torch.full((2, 1, 1), y, dtype=F64)
    with torch.no_grad():
        return (model.decoder.log_prob(yy, zz) + model.prior().to(F64).log_prob(zz))[replica, :, 0].numpy()


def _elbo_by_quad(model, y: float, loc: float, scale: float, replica: int) -> float:
    """E_q[log p(y, z) - log q(z)] by scipy.integrate.quad over q's +-14 scales, with breakpoints every
    half scale (the integrand's features are narrower than a wide q)."""
    def integrand(z):
        t = (z - loc) / scale
        log_q = -0.5 * t * t - math.log(scale) - 0.5 * math.log(2 * math.pi)
        return math.exp(log_q) * (float(_log_joint(model, y, np.array([z]), replica)[0]) - log_q)
    edges = loc + scale * np.arange(-14, 14.5, 0.5)
    return sum(quad(integrand, a, b, epsabs=1e-12, epsrel=1e-12, limit=200)[0] for a, b in zip(edges[:-1], edges[1:]))


def _gauss_hermite_64(model, y: float, loc: float, scale: float, replica: int) -> float:
    """The rule the search kept its best by until 2026-12-07: Gauss-Hermite with 64 nodes on q's scale."""
    t, w = (a[:, 0].numpy() if a.dim() > 1 else a.numpy() for a in hermite_rule(64, 1))
    return float((w * (_log_joint(model, y, loc + scale * t, replica) + 0.5 * t * t + math.log(scale)
                       + 0.5 * math.log(2 * math.pi))).sum())


def _rule(model, y: float, loc: float, scale: float) -> torch.Tensor:
    """The rule's ELBO of N(loc, scale^2) at y, per replica [2]."""
    q = DiagMixture(torch.zeros(2, 1, 1, 1, dtype=F64), torch.full((2, 1, 1, 1, 1), loc, dtype=F64),
                    torch.full((2, 1, 1, 1, 1), scale, dtype=F64))
    return gaussian_rule.gaussian_elbo(model, as_batch(np.array([y]), 2, torch.device("cpu")), q)[:, 0]


@pytest.mark.parametrize("name", ["mfg", "mog-prior"])
def test_the_rule_matches_scipys_quad_for_narrow_blended_and_wide_q(name):
    """Within 1e-6 nats (and 1e-10 of the value, where it is -4e5) of SciPy's quad for q's from 0.3 of the
    grid's spacing (Gauss-Hermite), through the blend, to wide ones over the steep decoder, on the network
    and on its table; the wide ones are where the old 64-node Gauss-Hermite rule was off by over 1e-3 (so
    this fails with it)."""
    model = _model(name, noise=0.02, sharpness=10.0)
    table = tabulated(model)
    h = float(gaussian_rule.grid_axes(model)[1].h)
    worst_hermite = 0.0
    for loc, scale in [(-0.4, 0.3 * h), (0.2, 2.0 * h), (0.1, 4.0 * h), (-0.3, 0.2), (0.5, 0.8), (0.0, 1.2)]:
        reference = _elbo_by_quad(model, -0.7, loc, scale, replica=1)
        for source in (model, table):
            error = abs(float(_rule(source, -0.7, loc, scale)[1]) - reference)
            assert error < 1e-6 + 1e-10 * abs(reference), (name, loc, scale, source, error)
        worst_hermite = max(worst_hermite, abs(_gauss_hermite_64(model, -0.7, loc, scale, 1) - reference))
    assert worst_hermite > 1e-3


def test_a_narrow_prior_component_makes_its_replicas_grid_finer_and_the_rule_stays_within_1e_6():
    """A mixture prior whose component in replica 1 is 50x narrower than at initialization: that replica's
    grid spaces its nodes at most 1 / PRIOR_SPACINGS of the component's scale (the other replica keeps
    GRID_SIZE), and the rule over it stays within 1e-6 of quad for a q that straddles the component (the
    rule on GRID_SIZE nodes is not)."""
    model = _model("mog-prior")
    with torch.no_grad():
        model.prior.raw_scale[1, 0] = math.log(math.expm1(0.03))
    prior = model.prior().to(F64)
    narrow, loc = float(prior.scale[1].min()), float(prior.loc[1].reshape(-1)[0])
    axes = gaussian_rule.grid_axes(model)
    assert axes[0].size == gaussian_rule.GRID_SIZE
    assert float(axes[1].h) <= narrow / gaussian_rule.PRIOR_SPACINGS * (1 + 1e-12)
    reference = _elbo_by_quad(model, 0.3, loc + 0.05, 0.3, replica=1)
    assert abs(float(_rule(model, 0.3, loc + 0.05, 0.3)[1]) - reference) < 1e-6


def test_the_gradient_is_the_derivative_of_the_value_and_a_points_are_bitwise_its_own():
    """The closed-form gradient (the grid part) and autograd's (Gauss-Hermite's) within 1e-6 (relative) of
    central differences, in and around the blend; the value bitwise gaussian_elbo's; and a point's value and
    gradient bitwise the same alone as among others, or beside points whose q is not finite."""
    model = tabulated(_model("mfg"))
    y = as_batch(np.linspace(-1.5, 1.5, 7), 2, torch.device("cpu"))
    h = float(gaussian_rule.grid_axes(model)[0].h)
    for scale in (0.5 * h, 2.0 * h, 2.5 * h, 0.3, 2.0):
        raw_scale = torch.full((7,), math.log(math.expm1(scale)), dtype=F64)
        raw = torch.stack([torch.linspace(-1, 1, 7, dtype=F64), raw_scale], -1)
        raw = raw.expand(2, -1, -1).contiguous()
        f, g = gaussian_rule.gaussian_value_and_gradient(model, y, raw)
        assert torch.equal(-f, gaussian_rule.gaussian_elbo(model, y, model.posterior.from_raw(raw)))
        alone = gaussian_rule.gaussian_value_and_gradient(model, y[:, 3:4], raw[:, 3:4])
        assert torch.equal(alone[0][:, 0], f[:, 3]) and torch.equal(alone[1][:, 0], g[:, 3])
        wild = raw.clone()
        wild[:, 0, 0], wild[:, 1, 0] = math.nan, math.inf          # a search's wild steps: no error, no effect
        f_wild, g_wild = gaussian_rule.gaussian_value_and_gradient(model, y, wild)
        assert torch.equal(f_wild[:, 2:], f[:, 2:]) and torch.equal(g_wild[:, 2:], g[:, 2:])
        for k in range(2):
            step = torch.zeros_like(raw)
            step[..., k] = 1e-6
            difference = (gaussian_rule.gaussian_value_and_gradient(model, y, raw + step)[0]
                          - gaussian_rule.gaussian_value_and_gradient(model, y, raw - step)[0]) / 2e-6
            assert ((g[..., k] - difference).abs() <= 1e-6 * difference.abs().clamp_min(1.0) + 1e-7).all(), (scale, k)


def test_the_search_reaches_a_brute_force_best_gaussian_on_multimodal_posteriors():
    """ELBO* of a mean-field Gaussian at points whose posteriors have several modes, against a brute force
    that shares nothing with the search: every (location, scale) of a lattice, then three finer lattices
    around the best, each scored by the trapezoid on 20,001 nodes of the network's log p(y, z) over
    [-10, 10] (the first on every tenth). The search
    is never below it by over 1e-6 (on trained noise-study runs the search before the rule and its lattice
    starts fell up to 0.6 nats below such a brute force at points of one replica; on these random models it
    did not, so this test guards the search rather than shows that fix: the rule's test above does)."""
    model = _model("mfg")
    y = np.array([-1.5, 0.4])
    found = best_posterior(model, y).elbo_star
    z = np.linspace(-10, 10, 20001)
    dz = z[1] - z[0]
    for r in range(2):
        for i, yi in enumerate(y):
            joint = _log_joint(model, float(yi), z, r)

            def elbo(loc, scale, coarse=False):
                every = 10 if coarse else 1                 # the first lattice on every 10th node
                t = (z[None, ::every] - loc[:, None]) / scale[:, None]
                log_q = -0.5 * t * t - np.log(scale)[:, None] - 0.5 * math.log(2 * math.pi)
                return (np.exp(log_q) * (joint[None, ::every] - log_q)).sum(1) * dz * every

            loc, log_scale = np.meshgrid(np.linspace(-6, 6, 121), np.linspace(-4, 1, 26), indexing="ij")
            values = elbo(loc.ravel(), np.exp(log_scale.ravel()), coarse=True)
            best_loc, best_log = loc.ravel()[values.argmax()], log_scale.ravel()[values.argmax()]
            for width in (0.1, 0.01, 0.001):
                loc, log_scale = np.meshgrid(best_loc + width * np.linspace(-1, 1, 21),
                                             best_log + 2 * width * np.linspace(-1, 1, 21), indexing="ij")
                values = elbo(loc.ravel(), np.exp(log_scale.ravel()))
                best_loc, best_log = loc.ravel()[values.argmax()], log_scale.ravel()[values.argmax()]
            assert float(found[r, i]) >= values.max() - 1e-6, (r, yi, float(found[r, i]), values.max())
