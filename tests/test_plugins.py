"""Each plug-in point takes a toy plug-in from the test folder: one object and one registry
entry, with no edit of mogvae (issue 19). Each toy is checked against an independent
reference, not only for running."""
import math
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from pydantic import Field, ValidationError
from scipy.stats import norm

from mogvae.config.files import dotted_fields
from mogvae.config.schema import describe_error
from mogvae.data.base import DataSource, Source, SplitsSection, UnknownTruth
from mogvae.data.paper import make_splits
from mogvae.data.sources import SOURCES
from mogvae.model.posteriors import POSTERIORS, MixturePosterior
from mogvae.objectives import OBJECTIVES
from mogvae.objectives.bounds import SampledBound, draw_noise, elbo
from mogvae.runs.run import RunConfig, RunSession
from mogvae.storage.files import read_csv

TINY = {"seeds": 2, "checkpoint_every": 1, "model": {"hidden": [8]},
        "data": {"n_train": 200, "n_val": 50, "n_test": 100},
        "train": {"epochs": 2, "batch_size": 100},
        "eval": {"grid_size": 201, "n_generated": 200, "gap_points": 0}}


def train(tmp_path: Path, name: str, **sections) -> Path:
    config = RunConfig(**{**TINY, **{k: {**TINY.get(k, {}), **v} for k, v in sections.items()}})
    out = tmp_path / name
    RunSession(config, out, log=lambda m: None).train()
    return out


def metrics(out: Path) -> list[dict]:
    return read_csv(out / "metrics.csv")


# A posterior family: two Gaussian components, whatever n_components says.
def TwoComponents(replicas, latent_dim, data_dim, hidden, activation="tanh", **_):
    return MixturePosterior(replicas, latent_dim, data_dim, hidden, activation, n_components=2)


def test_a_posterior_family_plugs_in_and_is_evaluated_exactly(tmp_path, monkeypatch):
    monkeypatch.setitem(POSTERIORS, "two", TwoComponents)
    out = train(tmp_path, "two", model={"posterior": "two"})
    from mogvae.runs.run import trained_model
    model, config, seeds = trained_model(out)
    assert model.posterior.k == 2 and config.model.posterior == "two"
    y = torch.as_tensor(np.load(out / "data" / "test.npy")[:40], dtype=torch.float64).reshape(1, -1, 1).expand(2, -1, 1)
    with torch.no_grad():       # the ELBO by many reparameterized draws, beside evaluation's quadrature
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        eps = draw_noise(model, gens, y.shape[1], n_samples=4000, dtype=torch.float64)
        sampled = elbo(model.double(), y, eps).mean(1).numpy()               # [R]
    from mogvae.estimators.quadrature import integrate, latent_grid
    exact = integrate(model, y[0].numpy(), latent_grid(model, 801, 8.0, y=y[0].numpy())).elbo.mean(1).numpy()
    np.testing.assert_allclose(exact, sampled, atol=0.02)
    for row in metrics(out):
        assert float(row["test_elbo"]) <= float(row["test_log_likelihood"]) + 1e-6


# A data source: N(0, scale^2) points, whose truth is scipy's normal density.
class NormalSection(SplitsSection):
    """Normal points with a known density."""
    name: Literal["normal"] = "normal"
    scale: float = Field(0.5, gt=0, description="the standard deviation of the points")


class NormalTruth(UnknownTruth):
    def __init__(self, scale):
        self.scale = scale

    def sample(self, n, seed):
        return None, np.random.default_rng(seed).normal(0.0, self.scale, n)

    def log_prob(self, y):
        return norm(0.0, self.scale).logpdf(np.atleast_1d(y))


def load_normal(d: NormalSection) -> Source:
    truth = NormalTruth(d.scale)
    return Source(make_splits(truth, d.sizes(), d.seed), truth, 1)


def test_a_data_source_plugs_in_with_its_own_keys_and_truth(tmp_path, monkeypatch):
    monkeypatch.setitem(SOURCES, "normal", DataSource(NormalSection, load_normal, data_dim=lambda d: 1))
    assert "data.scale" in dotted_fields(RunConfig)                 # --set and the reference see its key
    with pytest.raises(ValidationError) as e:
        RunConfig(data={"name": "normal", "scale": -1.0})
    assert describe_error(e.value).startswith("data.scale: Input should be greater than 0")
    with pytest.raises(ValidationError) as e:
        RunConfig(data={"name": "absent"})
    assert "normal" in describe_error(e.value)                       # the error lists the registered names
    out = train(tmp_path, "normal", data={"name": "normal", "scale": 0.3})
    test = np.load(out / "data" / "test.npy")
    assert 0.2 < test.std() < 0.4
    truth = norm(0.0, 0.3).logpdf(test).mean()                        # scipy, on the saved split
    for row in metrics(out):
        assert math.isclose(float(row["true_log_likelihood"]), truth, rel_tol=1e-12)
    assert '"scale": 0.3' in (out / "config.json").read_text()        # the run records its source's own key


def test_an_objective_plugs_in_and_trains_as_its_definition_says(tmp_path, monkeypatch):
    """A toy objective defined as the ELBO must train exactly as the built-in ELBO does."""
    monkeypatch.setitem(OBJECTIVES, "toy-elbo", SampledBound("toy-elbo", lambda m, y, eps: elbo(m, y, eps), "the ELBO"))
    with pytest.raises(ValidationError):
        RunConfig(train={"objective": "absent"})
    toy = train(tmp_path, "toy", train={"objective": "toy-elbo", "compile": "off"})
    builtin = train(tmp_path, "builtin", train={"objective": "elbo", "compile": "off"})
    skip = {"train_seconds"}
    assert [{k: v for k, v in r.items() if k not in skip} for r in metrics(toy)] == \
           [{k: v for k, v in r.items() if k not in skip} for r in metrics(builtin)]


def test_a_study_plugs_in_from_outside_and_its_reading_leads_the_report(tmp_path, monkeypatch, capsys):
    from mogvae.cli import main
    from mogvae.studies import STUDIES, Study
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugins"))
    sys.modules.pop("toy_study", None)
    monkeypatch.setitem(STUDIES, "toy", Study("toy", "a toy study", "toy_study"))
    out = tmp_path / "toy"
    assert main(["study", "toy", "--out", str(out), "--workers", "1"]) == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert report.index("## Toy reading") < report.index("## Per run")
    rows = read_csv(out / "metrics.csv")
    for name in ("preset=mfg", "preset=mog-prior"):
        mean = np.mean([float(r["test_log_likelihood"]) for r in rows if r["run"] == name])
        assert f"- toy mean {name}: {mean:.6f}" in report


# A likelihood estimator: plain Monte Carlo over the prior, p(y) = E_p(z) p(y|z), with its standard error.
def prior_monte_carlo(model, y, *, n_samples, seeds, **_):
    from mogvae.estimators.base import Estimate
    from mogvae.model.grid import as_batch
    R = len(seeds)
    y = as_batch(y, R, torch.device("cpu"))                                           # [R, N, Y]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    z = model.prior().sample(gens, n_samples).double()                                # [R, S, D]
    log_lik = model.decoder.log_prob(y, z[:, :, None, :].expand(-1, -1, y.shape[1], -1))  # [R, S, N]
    log_mean = torch.logsumexp(log_lik, 1) - math.log(n_samples)
    w = torch.exp(log_lik - log_mean[:, None])
    return Estimate(log_mean, w.std(1) / math.sqrt(n_samples), "prior-mc")


def test_a_likelihood_estimator_plugs_in_by_name_and_in_autos_order(monkeypatch):
    from mogvae.estimators import likelihood
    from mogvae.estimators.base import Estimator
    from mogvae.model.vae import build_model
    from mogvae.config.schema import preset
    toy = Estimator("prior-mc", exact=False, fits=lambda latent_dim, grid_size: True,
                    log_likelihood=prior_monte_carlo, evaluation_terms=None)
    monkeypatch.setattr(likelihood, "ESTIMATORS", {"prior-mc": toy, **likelihood.ESTIMATORS})
    from mogvae.model.layers import initialize
    model = build_model(preset("mog-prior", hidden=(8,)), replicas=2)
    initialize(model, [1, 2])
    model = model.double()
    y = np.array([0.05, 0.2, 0.4])
    with torch.no_grad():
        got = likelihood.log_likelihood(model, y, n_samples=200_000, seeds=[1, 2])      # "auto": the toy comes first
        exact = likelihood.log_likelihood(model, y, "quadrature")
    assert got.method == "prior-mc" and exact.method == "quadrature"
    assert torch.all(got.error > 0) and torch.all((got.value - exact.value).abs() <= 4 * got.error + exact.error + 1e-9)
    with pytest.raises(ValueError, match="prior-mc"):
        likelihood.log_likelihood(model, y, "absent")


def test_a_prior_of_your_own_is_its_density_and_trains_to_an_exact_likelihood(tmp_path, monkeypatch):
    """A Student-t prior from the test folder (tests/plugins/student_t.py): its density and draws
    are SciPy's t, and the trained model's log p(y) by mogvae's quadrature is SciPy's adaptive
    quad of p(z) p(y|z) within the error bound the run reports."""
    from scipy import integrate, stats
    from mogvae.model.priors import PRIORS
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugins"))
    from student_t import DF, StudentTPrior, StudentTLatent
    monkeypatch.setitem(PRIORS, "student-t", StudentTPrior)

    latent = StudentTLatent(torch.tensor([[[[0.3]]]], dtype=torch.float64), torch.tensor([[[[0.7]]]], dtype=torch.float64))
    z = np.linspace(-6, 6, 41)
    ours = latent.log_prob(torch.as_tensor(z).reshape(1, -1, 1, 1))[0, :, 0].numpy()
    assert np.allclose(ours, stats.t.logpdf(z, DF, loc=0.3, scale=0.7), atol=1e-12)
    draws = latent.sample([torch.Generator().manual_seed(0)], 4000)[0, :, 0].numpy()
    assert stats.kstest(draws, stats.t(DF, loc=0.3, scale=0.7).cdf).pvalue > 1e-3

    out = train(tmp_path, "student", model={"prior": "student-t"}, eval={"grid_size": 4001})
    import mogvae
    run = mogvae.load(out)
    bound = run.metrics["quadrature_error"].max()
    assert 0 < bound < 1e-3 and list(run.metrics["diverged"]) == [False, False]
    y = run.data("test")[:4]
    for r in range(2):
        model = run.model(replica=r)
        with torch.no_grad():
            sigma, prior = float(model.decoder.noise()[0, 0]), model.prior()
        loc, scale = float(prior.loc[0, 0, 0, 0].detach()), float(prior.scale[0, 0, 0, 0].detach())

        def integrand(zz, yy):
            with torch.no_grad():
                f = float(model.decoder.mean(torch.full((1, 1, 1, 1), zz))[0, 0, 0, 0])
            return stats.t.pdf(zz, DF, loc=loc, scale=scale) * stats.norm.pdf(yy, f, sigma)
        scan = np.linspace(loc - 100 * scale, loc + 100 * scale, 8001)
        with torch.no_grad():
            f_scan = model.decoder.mean(torch.as_tensor(scan, dtype=torch.float32).reshape(1, -1, 1, 1))[0, :, 0, 0].numpy()

        def quad_log_p(yy):
            """quad (to 1e-7: the float32 decoder is noisy below) over loc +- 100 scales, told where the
            posterior's peak is (on a scan). Beyond, the integrand is below N's peak times the t's
            tail mass, 2e-20 here: nothing at 1e-6."""
            peak = scan[np.argmax(stats.t.pdf(scan, DF, loc=loc, scale=scale) * stats.norm.pdf(yy, f_scan, sigma))]
            return np.log(integrate.quad(integrand, scan[0], scan[-1], args=(yy,), points=[peak], epsabs=0,
                                         epsrel=1e-7, limit=500)[0])
        assert 2 * stats.t.sf(100, DF) / sigma < 1e-12
        reference = [quad_log_p(yy) for yy in y]
        assert np.abs(run.log_prob(y, replica=r) - reference).max() <= max(bound, 1e-6)
