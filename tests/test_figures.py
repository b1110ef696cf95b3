"""Figures that cannot lie: every plotted density integrates to 1 on its own
plotting grid, and one outlying seed cannot set an axis."""
import json

import numpy as np
import pytest
from scipy.integrate import trapezoid

from mogvae.data.paper import PaperProcess
from mogvae.storage.files import read_npz
from mogvae.report.figures import robust_limits

MODELS = ["mfg", "mog-prior", "mog-posterior", "mog-both"]


@pytest.mark.parametrize("model", MODELS)
def test_every_plotted_latent_density_integrates_to_one_on_its_grid(quick_run, model):
    out, _ = quick_run
    c = read_npz(out / "runs" / f"preset={model}" / "curves.npz")
    R, P = c["q_density"].shape[:2]
    for r in range(R):
        assert trapezoid(c["prior_density"][r], c["z_grid"][r]) == pytest.approx(1, abs=1e-3)
        for j in range(P):
            z = c["probe_z_grid"][r, j]
            assert np.all(np.diff(z) >= 0)
            assert trapezoid(c["q_density"][r, j], z) == pytest.approx(1, abs=0.01), ("q", r, j)
            assert trapezoid(c["p_density"][r, j], z) == pytest.approx(1, abs=0.01), ("p", r, j)
    for j in range(P):
        assert trapezoid(c["true_posterior"][j], c["z_true"]) == pytest.approx(1, abs=0.01)
    y = c["y_grid"]
    assert trapezoid(c["true_density"], y) == pytest.approx(1, abs=0.01)
    for r in range(R):
        assert trapezoid(c["model_density"][r], y) == pytest.approx(1, abs=0.01)


def test_the_generated_histogram_estimates_the_density_with_what_falls_beyond_the_axis_left_out():
    """The histogram beside the exact p_theta(y): its area is the share of points inside the axis (numpy's
    density=True rescaled it to 1, overstating the density, and gave 0 / 0 with none inside), and on each
    bin it is that bin's probability over its width, here against the normal CDF."""
    import warnings

    from scipy import stats

    from mogvae.estimators.evaluate import _histograms
    y = stats.norm.ppf((np.arange(200_000) + 0.5) / 200_000)[None]           # N(0, 1) quantiles
    grid = np.linspace(-1.0, 1.5, 801)
    h = _histograms(y, grid)
    edges, width = h["hist_edges"], np.diff(h["hist_edges"])
    assert float(np.sum(h["hist_density"] * width)) == pytest.approx(stats.norm.cdf(1.5) - stats.norm.cdf(-1.0), abs=1e-5)
    expected = np.diff(stats.norm.cdf(edges)) / width
    np.testing.assert_allclose(h["hist_density"][0], expected, rtol=0, atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                          # no 0 / 0
        far = _histograms(np.full((2, 50), 9.0), grid)["hist_density"]
    assert far.shape == (2, 80) and not far.any()


def test_a_narrow_mixture_component_is_resolved_by_the_plotting_grid():
    """The case that misled: q with a component far narrower than a uniform
    plotting grid's spacing. On the union grid its area is right."""
    import torch
    from mogvae.config.schema import preset
    from mogvae.estimators.evaluate import _probe_posteriors
    from mogvae.model.vae import build_model
    from mogvae.model.layers import initialize
    model = build_model(preset("mog-posterior", n_components=3, hidden=(8,)), replicas=1)
    initialize(model, [0])
    with torch.no_grad():
        last = model.posterior.encoder.net[-1]
        last.bias[0, 0, 3:6] = torch.tensor([-12.0, 0.0, 1.0])     # softplus(-12) + 1e-4: a scale of ~1e-4
    z, q, p = _probe_posteriors(model, np.array([1.0, 0.2, -3.0]))
    for j in range(3):
        assert trapezoid(q[0, j], z[0, j]) == pytest.approx(1, abs=0.01)
        assert trapezoid(p[0, j], z[0, j]) == pytest.approx(1, abs=0.01)


def test_the_truth_figure_posteriors_integrate_to_one_on_its_grid(quick_run):
    out, _ = quick_run
    import csv
    rows = [r for r in csv.DictReader(open(out / "figures" / "truth.csv")) if r["panel"] == "posterior"]
    for y in {r["y"] for r in rows}:
        pts = sorted((float(r["z"]), float(r["value"])) for r in rows if r["y"] == y)
        z, v = np.array(pts).T
        assert trapezoid(v, z) == pytest.approx(1, abs=0.01), y
    sigma = json.loads((out / "truth.json").read_text())["sigma"]
    assert sigma == PaperProcess().sigma


def test_one_outlying_seed_does_not_set_the_axis():
    values = np.array([0.0021, 0.0019, 0.0024, 0.0020, 0.0023, 0.0022, 0.35])
    lo, hi = robust_limits(values)
    assert hi < 0.01 and lo < 0.0019                            # the bulk is readable; the outlier is marked
    assert robust_limits(np.array([1.0, 1.0, 1.0]))[0] < 1.0 < robust_limits(np.array([1.0, 1.0, 1.0]))[1]


def test_a_figure_is_drawn_again_only_when_what_it_shows_changed(quick_run, tmp_path, monkeypatch):
    """A report keeps a figure drawn from the same saved files (the digest in its PNG) and draws it
    again when its curves change or its PNG is damaged; the kept PNG is byte for byte the old one."""
    import shutil

    from mogvae.report import figures
    out, _ = quick_run
    run = tmp_path / "run"
    shutil.copytree(out / "runs" / "preset=mfg", run)
    (tmp_path / "figures").mkdir()
    drawn = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path, inputs=None: (drawn.append(path.name),
                                                                           save(fig, path, inputs)))
    png = tmp_path / "figures" / "mfg.png"
    figures.model_figure(tmp_path, "mfg", run)
    first = png.read_bytes()
    figures.model_figure(tmp_path, "mfg", run)
    assert drawn == ["mfg.png"] and png.read_bytes() == first
    figures.model_figure(tmp_path, "mog-prior", run)        # another label: another title and colour
    assert drawn == ["mfg.png", "mog-prior.png"]
    curves = dict(np.load(run / "curves.npz"))
    curves["decoder"] = curves["decoder"] + 1e-3
    np.savez(run / "curves.npz", **curves)
    figures.model_figure(tmp_path, "mfg", run)
    assert drawn[-1] == "mfg.png" and len(drawn) == 3 and png.read_bytes() != first
    png.write_bytes(png.read_bytes()[:100])                  # a damaged PNG is drawn again, not trusted
    figures.model_figure(tmp_path, "mfg", run)
    assert len(drawn) == 4 and figures.already_drawn(png, figures.inputs_digest(
        "model", "mfg", (run / "curves.npz").read_bytes()))


def test_a_second_report_of_a_finished_folder_draws_nothing(quick_run, tmp_path, monkeypatch):
    """`mogvae report` only reads: on a finished reproduce folder whose figures were drawn, it draws none
    again (the paper's comparison and truth figures were redrawn on every report: 6 s of its 12); a
    changed metrics.csv redraws the figures that show it and no other."""
    import shutil

    from mogvae.cli import main
    from mogvae.report import figures
    out = tmp_path / "copy"
    shutil.copytree(quick_run[0], out)
    drawn = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path, inputs=None: (drawn.append(path.name),
                                                                           save(fig, path, inputs)))
    assert main(["report", str(out)]) == 0
    assert drawn == []
    metrics = (out / "metrics.csv").read_text().splitlines()
    header, first = metrics[0].split(","), metrics[1].split(",")
    column = header.index("w1_samples")
    first[column] = repr(float(first[column]) * 1.5)
    (out / "metrics.csv").write_text("\n".join([metrics[0], ",".join(first), *metrics[2:]]) + "\n")
    assert main(["report", str(out)]) == 0
    assert "comparison.png" in drawn and not any(name.startswith(("mfg", "mog", "truth")) for name in drawn), drawn
