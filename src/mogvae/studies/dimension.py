"""The dimension study: the folded process at D = 1 ... 20 observed dimensions, ambiguous
(breaking = 0) or symmetry-broken (breaking = all). Per setting and D: KL to the truth and the
inference gap of each model with 95% intervals over seeds, and whether a richer prior or a richer
posterior beats mfg, decided by paired intervals."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..report.statistics import t_interval
from ..storage.files import read_csv, write_csv
from .paired import MEANS_CAPTION, RICHER, by_cell, interval_cell, richer_against_mfg, verdicts

PANELS = (("kl_to_truth", "KL(p* || p_theta), nats per point"), ("inference_gap", "inference gap, nats per point"))
SETTINGS = (("0", "ambiguous (breaking = 0): bimodal true posterior at every D"),
            ("all", "symmetry-broken (breaking = all): unimodal as D grows"))
KEYS = ("kl_to_truth", "inference_gap", "test_log_likelihood", "true_log_likelihood")


def _level(row: dict) -> tuple[str, int]:
    """(setting, D); D = 1 has nothing to break, so it belongs to both settings."""
    return str(row["data.breaking"]), int(float(row["data.data_dim"]))


def _cells(out: Path) -> tuple[dict, list[str]]:
    rows = read_csv(out / "metrics.csv")
    cells = by_cell(rows, _level, KEYS)
    for (model, (setting, d)), seeds in list(cells.items()):
        if d == 1:
            cells.setdefault((model, ("all", 1)), seeds)
    return cells, list(dict.fromkeys(r["model"] for r in rows))


def _dims(cells: dict, setting: str) -> list[int]:
    return sorted({d for _, (s, d) in cells if s == setting})


def dimension_figure(out: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    from ..report.figures import COLORS, _save
    cells, models = _cells(out)
    settings = [s for s in SETTINGS if _dims(cells, s[0])]
    fig, axes = plt.subplots(len(settings), len(PANELS), figsize=(12, 4.2 * len(settings)), squeeze=False)
    csv_rows = []
    for row, (setting, title) in zip(axes, settings):
        dims = _dims(cells, setting)
        for ax, (key, label) in zip(row, PANELS):
            shown = []
            for i, m in enumerate(models):
                ivs = [t_interval(np.array([v[key] for v in cells.get((m, (setting, d)), {}).values()]))
                       for d in dims]
                mean = np.array([iv.mean for iv in ivs])
                low = np.maximum(np.array([iv.low for iv in ivs]), mean * 1e-3)   # a log axis: keep bars positive
                high = np.array([iv.high for iv in ivs])
                x = np.array(dims) * (1 + 0.04 * (i - 1.5))                      # offsets: bars do not overlap
                ax.errorbar(x, mean, yerr=[np.nan_to_num(mean - low), np.nan_to_num(high - mean)], marker="o",
                            ms=4, capsize=3, color=COLORS.get(m, "k"), label=m)
                shown += [v for v in mean if np.isfinite(v) and v > 0]
                csv_rows += [{"setting": setting, "data_dim": d, "metric": key, "model": m, "mean": iv.mean,
                              "low": iv.low, "high": iv.high, "n": iv.n} for d, iv in zip(dims, ivs)]
            ax.set_xscale("log")
            ax.set_yscale("log")
            if shown:   # the means set the axis; an interval longer than it runs off the edge
                ax.set_ylim(min(shown) / 3, max(shown) * 3)
            ax.set_xticks(dims, [str(d) for d in dims])
            ax.xaxis.set_minor_locator(NullLocator())          # the log axis's 2x10^0 ... labels would crowd D
            ax.set(xlabel="observed dimensions D", ylabel=label, title=f"{label.split(',')[0]}: {title}")
            ax.title.set_fontsize(9)
            ax.legend(fontsize=8)
    fig.suptitle(MEANS_CAPTION, fontsize=10)
    fig.tight_layout()
    path = out / "figures" / "dimension.png"
    _save(fig, path)
    write_csv(out / "figures" / "dimension.csv", csv_rows,
              ["setting", "data_dim", "metric", "model", "mean", "low", "high", "n"])
    return path


def reading(out: Path) -> list[str]:
    """Per setting and D: mfg's KL to the truth and inference gap, and each richer model minus
    mfg in test log-likelihood, paired by seed."""
    cells, _ = _cells(out)
    lines = []
    for setting, title in SETTINGS:
        dims = _dims(cells, setting)
        if not dims:
            continue
        lines += [f"### {title[0].upper()}{title[1:]}", "",
                  "| D | true LL | mfg KL to truth | mfg inference gap | mog-posterior inference gap | "
                  + " | ".join(f"{m} − mfg, test LL" for m, _ in RICHER) + " |", "|" + "---|" * (5 + len(RICHER))]
        helps: dict[str, list[str]] = {m: [] for m, _ in RICHER}
        for d in dims:
            mfg = cells.get(("mfg", (setting, d)), {})
            post = cells.get(("mog-posterior", (setting, d)), {})
            truth = np.mean([v["true_log_likelihood"] for v in mfg.values()]) if mfg else np.nan
            intervals = richer_against_mfg(cells, (setting, d))
            for (m, _), iv in zip(RICHER, intervals):
                if iv.excludes_zero() and iv.mean > 0:
                    helps[m].append(str(d))
            summary = [_mean_interval(mfg, "kl_to_truth"), _mean_interval(mfg, "inference_gap"),
                       _mean_interval(post, "inference_gap")]
            lines.append(f"| {d} | {truth:.4f} | " + " | ".join(summary) + " | "
                         + " | ".join(map(interval_cell, intervals)) + " |")
        lines += ["", *verdicts(helps, "D"), ""]
    lines += ["Nats per test point; a model's KL to the truth and inference gap as mean [95% t interval over "
              "seeds]; differences paired by seed, ** where the interval excludes zero. D = 1 is the paper's "
              "process and appears in both settings (it has nothing to break)."]
    return lines


def _mean_interval(cell: dict, key: str) -> str:
    iv = t_interval(np.array([v[key] for v in cell.values()]))
    return f"{iv.mean:.4f} [{iv.low:.4f}, {iv.high:.4f}]" if iv.n > 1 else f"{iv.mean:.4f} (n = {iv.n})"


def present(out) -> tuple[list[str], list]:
    """The study's reading and figure, first in its report."""
    figure = dimension_figure(out)
    return ["## Does the paper's finding survive more observed dimensions?", "", *reading(out), ""], [figure]
