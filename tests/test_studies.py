"""The noise study: its reference curve against an independent integration, and
the study end to end at toy size (figures, reading, report)."""
import math

import numpy as np
import pytest
from scipy import integrate

from mogvae.cli import main
from mogvae.studies.noise import best_gaussian_kl


def _normal_pdf(x: float, mean: float, sd: float) -> float:
    """The normal density written out: stats.norm.pdf per scalar call made this nested quad 10x slower."""
    return math.exp(-0.5 * ((x - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


def _density(y: float, sigma: float) -> float:
    f = lambda z: (2 * z - 0.5) ** 2 if z < 0.5 else (2 * z - 1.5) ** 2  # noqa: E731
    return integrate.quad(lambda z: _normal_pdf(y, f(z), sigma), 0, 1, points=[0.5], epsabs=1e-13)[0]


@pytest.mark.parametrize("sigma", [0.1, 0.05])
def test_best_gaussian_kl_against_nested_adaptive_quadrature(sigma):
    lo, hi = -0.25 - 10 * sigma, 0.25 + 10 * sigma
    moment = lambda g: integrate.quad(lambda y: g(y) * _density(y, sigma), lo, hi, limit=200)[0]  # noqa: E731
    m = moment(lambda y: y)
    v = moment(lambda y: (y - m) ** 2)
    kl = moment(lambda y: math.log(_density(y, sigma)) - math.log(_normal_pdf(y, m, math.sqrt(v))))
    assert best_gaussian_kl(sigma) == pytest.approx(kl, abs=1e-7)


def test_the_noise_study_runs_at_toy_size_and_reads_its_question(tmp_path, capsys):
    out = tmp_path / "noise"
    assert main(["study", "noise", "--quick", "--seeds", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "## Where richer priors and posteriors begin to matter" in report
    assert sum(line.startswith("| 0.01 | 0.2495 |") for line in report.splitlines()) == 1
    assert "![noise](figures/noise.png)" in report
    rows = (out / "figures" / "noise.csv").read_text().splitlines()
    reference = [r for r in rows if r.startswith("best_gaussian_kl")]
    assert len(reference) == 3                          # --quick: sigma = 0.1, 0.03, 0.01
    assert float(reference[0].split(",")[3]) == pytest.approx(best_gaussian_kl(0.01), rel=1e-12)
    assert np.isfinite([float(r.split(",")[3]) for r in rows[1:] if r.startswith("kl_to_truth")]).all()


def _metric(out, model, key, **axes):
    """Per-seed values of `key` for `model` at the given grid axes, straight from metrics.csv."""
    import csv
    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["model"] == model
            and all(r[k] == str(v) for k, v in axes.items())]
    return {int(r["seed"]): float(r[key]) for r in rows}


def _row(text: str, *keys: str) -> dict[str, str]:
    """The cells of the table row that starts with `keys`, by column header, gathered across the
    tables a wide one is split into (report/tables.py repeats the key columns in each)."""
    cells, lines = {}, text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and lines[i + 1].startswith("|---") and (i == 0 or not lines[i - 1].startswith("|")):
            head = [c.strip() for c in line.strip().strip("|").split("|")]
            for row_line in lines[i + 2:]:
                if not row_line.startswith("|"):
                    break
                row = [c.strip() for c in row_line.strip().strip("|").split("|")]
                if row[:len(keys)] == list(keys):
                    cells.update(zip(head, row))
    return cells


def test_the_noise_figures_axes_span_every_models_means_as_its_caption_says(tmp_path, monkeypatch):
    """Its caption says the axes span the means. The std-ratio panel took robust limits, which dropped
    mfg's means (0.91-0.96 in the noise study, the others 0.98-1.03) as outliers; every mean must show."""
    import matplotlib.pyplot as plt

    from mogvae.report import figures
    from mogvae.storage.files import write_csv
    from mogvae.studies.noise import noise_figure
    rows = [{"model": m, "data.sigma": s, "seed": seed, "kl_to_truth": 0.01, "inference_gap": 0.01,
             "test_log_likelihood": 1.0, "std_ratio": (0.91 if m == "mfg" else 1.0) + 0.01 * seed + 0.02 * s}
            for m in ("mfg", "mog-prior", "mog-posterior", "mog-both") for s in (0.1, 0.03, 0.01) for seed in range(3)]
    write_csv(tmp_path / "metrics.csv", rows, list(rows[0]))
    (tmp_path / "figures").mkdir()
    kept = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path, inputs=None: kept.setdefault("limits", fig.axes[2].get_ylim()))
    noise_figure(tmp_path)
    plt.close("all")
    lo, hi = kept["limits"]
    lowest, highest = 0.91 + 0.01 + 0.02 * 0.01, 1.0 + 0.01 + 0.02 * 0.1      # mfg at 0.01, the others at 0.1
    assert lo <= lowest and hi >= highest
