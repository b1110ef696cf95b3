"""The tabular study: three scikit-learn data sets x the four models x d_z = 2 and 5. With no
truth, the models are compared by test log-likelihood (2-D quadrature, or importance sampling
with its standard error), per point and per observed dimension, each richer model against mfg
paired by seed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..report.html import md_text
from ..report.statistics import t_interval
from ..runs.sweep import read_record
from ..storage.files import read_csv, read_npy, write_csv
from .paired import RICHER, by_cell, interval_cell, richer_against_mfg, verdicts

MODELS = ("mfg", *(m for m, _ in RICHER))
KEYS = ("test_log_likelihood", "test_log_likelihood_stderr", "inference_gap", "quadrature_error")


def _level(row: dict) -> tuple[str, int]:
    return row["data.dataset"], int(float(row["model.latent_dim"]))


def _dimensions(out: Path) -> dict[str, int]:
    """Observed dimensions of each data set, from a run's saved test split."""
    dims = {}
    for cell in read_record(out)["cells"]:
        test = out / "runs" / cell["name"] / "data" / "test.npy"
        if test.exists():
            dims[cell["values"]["data.dataset"]] = int(read_npy(test).shape[1])
    return dims


def _cells(out: Path) -> dict:
    return by_cell(read_csv(out / "metrics.csv"), _level, KEYS)


def tabular_figure(out: Path) -> Path:
    """Test log-likelihood per observed dimension, per data set (panels) and d_z (x), each model's
    mean over seeds with its 95% interval."""
    import matplotlib.pyplot as plt

    from ..report.figures import COLORS, _save
    cells, dims = _cells(out), _dimensions(out)
    sets = [s for s in dims if any(level[0] == s for _, level in cells)]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.5 * len(sets), 4.2), squeeze=False)
    csv_rows = []
    for ax, name in zip(axes[0], sets):
        latents = sorted({d for _, (s, d) in cells if s == name})
        for i, m in enumerate(MODELS):
            ivs = [t_interval(np.array([v["test_log_likelihood"] for v in cells.get((m, (name, d)), {}).values()])
                              / dims[name]) for d in latents]
            mean = np.array([iv.mean for iv in ivs])
            x = np.arange(len(latents)) + 0.12 * (i - 1.5)
            ax.errorbar(x, mean, yerr=[np.nan_to_num(mean - [iv.low for iv in ivs]),
                                       np.nan_to_num([iv.high for iv in ivs] - mean)],
                        fmt="o", capsize=3, color=COLORS.get(m, "k"), label=m)
            csv_rows += [{"dataset": name, "latent_dim": d, "model": m, "mean_per_dim": iv.mean, "low": iv.low,
                          "high": iv.high, "n": iv.n} for d, iv in zip(latents, ivs)]
        ax.set_xticks(range(len(latents)), [f"d_z = {d}" for d in latents])
        ax.set(ylabel="test log-likelihood, nats per dimension", title=f"{name} (D = {dims[name]})")
        ax.legend(fontsize=8)
    fig.suptitle("mean over seeds with 95% t intervals (higher is better)", fontsize=10)
    fig.tight_layout()
    path = out / "figures" / "tabular.png"
    _save(fig, path)
    write_csv(out / "figures" / "tabular.csv", csv_rows,
              ["dataset", "latent_dim", "model", "mean_per_dim", "low", "high", "n"])
    return path


def reading(out: Path) -> list[str]:
    cells, dims = _cells(out), _dimensions(out)
    levels = sorted({level for _, level in cells}, key=lambda lv: (list(dims).index(lv[0]) if lv[0] in dims else 0,
                                                                    lv[1]))
    lines = ["| data set | d_z | evaluated by | mfg test LL | "
             + " | ".join(f"{m} − mfg" for m, _ in RICHER) + " | same, per dimension |",
             "|" + "---|" * (5 + len(RICHER))]
    helps: dict[str, list[str]] = {m: [] for m, _ in RICHER}
    for name, d in levels:
        mfg = cells.get(("mfg", (name, d)), {})
        iv = t_interval(np.array([v["test_log_likelihood"] for v in mfg.values()]))
        stderr = np.array([v["test_log_likelihood_stderr"] for v in mfg.values()])
        how = (f"importance sampling (SE ≤ {np.nanmax(stderr):.3f})" if np.isfinite(stderr).any()
               else "2-D quadrature")
        intervals = richer_against_mfg(cells, (name, d))
        for (m, _), diff in zip(RICHER, intervals):
            if diff.excludes_zero() and diff.mean > 0:
                helps[m].append(f"{md_text(name)} (d_z = {d})")
        per_dim = " / ".join(f"{diff.mean / dims.get(name, np.nan):+.4f}" for diff in intervals)
        lines.append(f"| {md_text(name)} | {d} | {how} | {iv.mean:.3f} [{iv.low:.3f}, {iv.high:.3f}] | "
                     + " | ".join(interval_cell(diff, 3) for diff in intervals) + f" | {per_dim} |")
    lines += ["", "Test log-likelihood in nats per test point (higher is better): mfg's mean [95% t interval over "
              "seeds], then each richer model minus mfg, paired by seed, ** where the interval excludes zero; the "
              "last column divides those means by the data set's observed dimensions. The importance-sampling "
              "SE is the largest replica's standard error of its mean over test points.", "",
              *verdicts(helps, "data set")]
    return lines


def present(out) -> tuple[list[str], list]:
    """The study's reading and figure, first in its report."""
    figure = tabular_figure(out)
    return ["## Richer prior or richer posterior on real data?", "", *reading(out), ""], [figure]
