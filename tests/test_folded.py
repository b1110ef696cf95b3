"""The folded process (D observed dimensions, 1 or 2 latent ones): its truth against independent
integration, its posterior normalized, its mirrored modes, and its refusals."""
import numpy as np
import pytest
from scipy import integrate

from mogvae.data.paper import PaperProcess
from mogvae.data.folded import TRUTH_TOLERANCE, FoldedProcess, mirror_images


def test_one_latent_one_observed_dimension_is_the_papers_process():
    folded, paper = FoldedProcess(1, 1, 0, 0.07), PaperProcess(0.07)
    z, y = folded.sample(200, 3)
    np.testing.assert_array_equal(folded.mean(z)[:, 0], paper.f(z[:, 0]))
    np.testing.assert_allclose(folded.log_prob(y[:, 0]), paper.log_prob(y[:, 0]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("data_dim, breaking", [(4, 0), (4, 2)])
def test_1d_latent_truth_matches_scipy_adaptive_quadrature(data_dim, breaking):
    process = FoldedProcess(data_dim, 1, breaking, 0.1)
    _, y = process.sample(4, 11)

    def reference(point):
        value, _ = integrate.quad(lambda z: np.exp(process.log_likelihood(point, np.array([z]))), 0, 1,
                                  points=[0.5], limit=500, epsabs=0, epsrel=1e-12)
        return np.log(value)
    np.testing.assert_allclose(process.log_prob(y), [reference(p) for p in y], rtol=0, atol=1e-9)


@pytest.mark.parametrize("breaking", [0, 1])
def test_2d_latent_truth_matches_an_extrapolated_trapezoid_grid(breaking):
    """Trapezoid rules on 1001^2 and 2001^2 nodes (0.5, the kink, is a grid line of both: the
    integrand is smooth between), Richardson-extrapolated: an O(h^4) reference independent of
    the process's own Gauss-Legendre rule (within 2e-10 of the truth here; 2001^2 and 4001^2,
    four times the cost, agree with it within 1.2e-11)."""
    process = FoldedProcess(3, 2, breaking, 0.1)
    _, y = process.sample(3, 5)

    def trapezoid(point, n):
        z = np.linspace(0, 1, n)
        w = np.full(n, 1 / (n - 1))
        w[[0, -1]] /= 2
        grid = np.stack(np.meshgrid(z, z, indexing="ij"), -1)
        return w @ np.exp(process.log_likelihood(point, grid)) @ w
    for point, log_p in zip(y, process.log_prob(y)):
        coarse, fine = trapezoid(point, 1001), trapezoid(point, 2001)
        assert abs(np.log((4 * fine - coarse) / 3) - log_p) < 1e-9


@pytest.mark.parametrize("data_dim, breaking, start", [(6, 0, None), (200, 3, 8.0)])
def test_each_point_refines_until_its_estimate_meets_the_tolerance_and_the_estimate_bounds_its_error(
        data_dim, breaking, start):
    """Against the same sum on panels 4 times finer from the start: at D = 6, where the posterior is
    wide, and at D = 200, where 200 coordinates narrow it, from a first rule 4 times coarser than the
    default (`start` 8), which must refine further to the same value."""
    process = FoldedProcess(data_dim, 2, breaking, 0.1,
                            panel_fraction=None if start is None else start * (50 / data_dim) ** 0.5)
    default = 2 * min(1.0, (50 / data_dim) ** 0.5)
    finer = FoldedProcess(data_dim, 2, breaking, 0.1, panel_fraction=0.25 * default)
    _, y = process.sample(3, 4)
    log_p, error = process.log_prob_and_error(y)
    reference = finer.log_prob(y)
    assert np.all(error <= TRUTH_TOLERANCE)
    assert np.all(np.abs(log_p - reference) <= np.maximum(error, 1e-12))     # the estimate bounds the error
    assert np.abs(log_p - reference).max() < 1e-9                           # and the kept rule is far closer
    if start is not None:                       # the test can tell: the first refinement alone is off
        first = process._log_sum(process._point_terms(y, 10**6)[0], 1, 10**6) + process._point_terms(y, 10**6)[1]
        assert np.abs(first - reference).max() > 1e-6


def test_a_points_truth_does_not_depend_on_the_points_beside_it():
    """A coarse first rule (panel_fraction 4), on which 2 of the 7 points refine once more than the others:
    each point's value and estimate are its own, alone or beside points that stopped sooner."""
    process = FoldedProcess(20, 2, 3, 0.05, panel_fraction=4.0)
    _, y = process.sample(7, 9)
    together, error = process.log_prob_and_error(y, budget=50_000)
    for i in range(len(y)):
        alone, alone_error = process.log_prob_and_error(y[i:i + 1], budget=50_000)
        np.testing.assert_allclose(alone, together[i:i + 1], rtol=0, atol=1e-13)
        np.testing.assert_allclose(alone_error, error[i:i + 1], rtol=0, atol=1e-13)


@pytest.mark.parametrize("latent_dim, breaking", [(1, 0), (1, 3), (2, 0), (2, 2)])
def test_the_posterior_integrates_to_one(latent_dim, breaking):
    process = FoldedProcess(5, latent_dim, breaking, 0.1)
    _, y = process.sample(3, 8)
    n = 2001 if latent_dim == 1 else 801
    z = np.linspace(0, 1, n)
    w = np.full(n, 1 / (n - 1))
    w[[0, -1]] /= 2
    if latent_dim == 1:
        mass = process.posterior(y, z) @ w
    else:
        grid = np.stack(np.meshgrid(z, z, indexing="ij"), -1).reshape(-1, 2)
        mass = process.posterior(y, grid).reshape(len(y), n, n) @ w @ w
    np.testing.assert_allclose(mass, 1.0, atol=2e-4)


@pytest.mark.parametrize("latent_dim", [1, 2])
def test_without_breaking_coordinates_every_mirror_image_is_equally_probable(latent_dim):
    process = FoldedProcess(6, latent_dim, 0, 0.05)
    z, y = process.sample(5, 2)
    images = mirror_images(z)                                   # [2^L, 5, L]
    dens = np.stack([np.diag(process.posterior(y, img)) for img in images])
    np.testing.assert_allclose(dens, np.broadcast_to(dens[:1], dens.shape), rtol=1e-9)


def test_breaking_coordinates_make_the_true_image_the_mode():
    process = FoldedProcess(8, 1, 6, 0.05)
    z, y = process.sample(50, 4)
    images = mirror_images(z)                                   # [2, 50, 1]: the truth and its mirror
    at_truth = np.diag(process.posterior(y, images[0]))
    at_mirror = np.diag(process.posterior(y, images[1]))
    assert (at_truth > 100 * at_mirror).mean() > 0.9


@pytest.mark.parametrize("kwargs, message", [
    ({"latent_dim": 3, "data_dim": 3}, "latent_dim must be 1 or 2"),
    ({"latent_dim": 2, "data_dim": 1}, "data_dim must be in [latent_dim, 1000]"),
    ({"data_dim": 3, "breaking": 3}, "breaking must be in [0, data_dim - latent_dim] = [0, 2]"),
    ({"sigma": float("nan")}, "sigma must be a positive finite number"),
])
def test_bad_parameters_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        FoldedProcess(**kwargs)


def test_points_of_the_wrong_dimension_are_refused():
    with pytest.raises(ValueError, match="y has 2 columns; this process has data_dim = 3"):
        FoldedProcess(3).log_prob(np.zeros((4, 2)))
