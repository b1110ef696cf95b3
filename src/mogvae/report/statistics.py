"""The statistics behind every report: metrics.csv read back by model or run, the
summary table's columns, and 95% t intervals over seeds (paired by seed index)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import stdtrit

from ..storage.files import UnreadableFile, read_csv

TABLE = [("test_log_likelihood", "test LL", 4), ("kl_to_truth", "KL to truth", 4), ("test_elbo", "test ELBO", 4),
         ("inference_gap", "inference gap", 4), ("approximation_gap", "approx. gap", 5),
         ("amortization_gap", "amort. gap", 5), ("w1_to_truth", "W1 exact", 4), ("w1_samples", "W1 samples", 4),
         ("w1_decoder", "W1 decoder", 4), ("std_ratio", "std ratio", 3), ("train_seconds", "train s/seed", 1),
         ("error_bound", "error bound", 0)]
BOUND_COLUMN = "error_bound"   # not a mean: the largest over the counted replicas, with how many were left out


TEXT_COLUMNS = {"model", "run", "preset", "diverged", "diverged_epoch", "flagged"}  # the rest are numbers (grid axes: dotted)
DEFAULT_TOLERANCE = 1e-4   # eval.tolerance's default: the flag of a row written before the flag was


EXACT_BOUNDS = ("quadrature_error", "elbo_quadrature_error", "gap_rule_error")   # as estimators.evaluate's
# (repeated, not imported: the reports read metrics.csv without importing PyTorch)


def error_bound(row: dict) -> float:
    """A replica's error bound: metrics.csv's `error_bound`, or for a row written before it existed the
    largest of its EXACT_BOUNDS (NaN where it has none: importance sampling)."""
    if "error_bound" in row:
        return float(row["error_bound"])
    return max([v for k in EXACT_BOUNDS if not math.isnan(v := float(row.get(k, math.nan)))], default=math.nan)


def flagged(row: dict) -> bool:
    """Whether a replica's exact numbers missed their tolerance (metrics.csv's `flagged`; a row
    written before it existed: its bound against the default tolerance)."""
    if "flagged" in row:
        return row["flagged"] == "True"
    return error_bound(row) > DEFAULT_TOLERANCE


def counted(row: dict) -> bool:
    """Whether a replica enters means, comparisons and verdicts: it neither diverged nor was flagged.
    A row without `diverged` is a study's selection of values from rows it already kept (paired.by_cell)."""
    return "diverged" not in row or row["diverged"] != "True" and not flagged(row)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def describe(self, unit: str = "nats") -> str:
        if self.n < 2:
            return f"{self.mean:+.4f} {unit} (one seed: no interval)"
        return f"{self.mean:+.4f} {unit} [95% CI {self.low:+.4f}, {self.high:+.4f}], n = {self.n} seeds"


def t_interval(x: np.ndarray) -> Interval:
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return Interval(float(x.mean()) if len(x) else math.nan, math.nan, math.nan, len(x))
    # Student's t quantile, as scipy.stats.t.ppf computes it: scipy.stats alone took 0.45 s to import,
    # in every process that writes a report
    half = stdtrit(len(x) - 1, 0.975) * x.std(ddof=1) / math.sqrt(len(x))
    return Interval(float(x.mean()), float(x.mean() - half), float(x.mean() + half), len(x))


def load_metrics(path: Path, by: str | None = "model", label: str = "run") -> dict[str, dict[int, dict[str, float]]]:
    """metrics.csv as {model (or run): {seed: {column: value}}}; diverged runs carry NaN metrics.
    by = None: one group, `label` (a run folder's metrics.csv, which has no model column).
    A table that is not the one mogvae wrote is refused in one line (UnreadableFile)."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    try:
        for row in read_csv(path):
            values = {k: (v if k in TEXT_COLUMNS else float(v)) for k, v in row.items()
                      if k != "seed" and "." not in k}
            out.setdefault(row[by] if by else label, {})[int(row["seed"])] = values
    except (KeyError, ValueError) as e:
        if isinstance(e, UnreadableFile):
            raise
        raise UnreadableFile(f"{path}: damaged (not the table mogvae wrote); re-run the command that wrote it to "
                             "rebuild it from the run folders") from None
    return out


def paired(metrics, a: str, b: str, key: str) -> Interval:
    """Mean over seeds of metric(a) - metric(b), paired by seed (same data order), over the seeds
    whose replicas both count (neither diverged nor flagged)."""
    seeds = sorted(s for s in set(metrics.get(a, {})) & set(metrics.get(b, {}))
                   if counted(metrics[a][s]) and counted(metrics[b][s]))
    return t_interval(np.array([metrics[a][s][key] - metrics[b][s][key] for s in seeds], dtype=float))


def has_values(metrics, key: str) -> bool:
    """Whether some replica has a number for `key` (a column without: the truth's metrics without a
    known truth, W1 exact for D > 1, the gaps without gap points, a column older runs lack). An
    infinite error bound is a value: a window that could not hold a posterior."""
    ok = (lambda v: not np.isnan(v)) if key == BOUND_COLUMN else np.isfinite
    return any(ok(float(r.get(key, np.nan))) for runs in metrics.values() for r in runs.values())


def shown_columns(metrics) -> list[tuple[str, str, int]]:
    """TABLE's columns that hold a value for some replica: a table never prints a column of nan."""
    return [column for column in TABLE if has_values(metrics, column[0])]


def summary_rows(metrics, models, columns=None) -> list[list[str]]:
    """Per model: name, runs, diverged, then 'mean ± sd' over the seeds that count (neither diverged
    nor flagged) for each of `columns` (TABLE's, by default); the error bound's column: the largest
    over them, and how many flagged replicas were left out."""
    rows = []
    for m in models:
        runs = metrics[m]
        ok = [r for r in runs.values() if counted(r)]
        cells = []
        for key, _, digits in columns or TABLE:
            v = np.array([r.get(key, np.nan) for r in ok], dtype=float)   # a column older runs lack: nan
            if key == BOUND_COLUMN:
                cells.append(_bound_cell(v, sum(r["diverged"] != "True" and flagged(r) for r in runs.values())))
                continue
            cells.append("n/a" if np.isnan(v).all() else     # none counted, or not evaluated (an oracle's ELBO)
                         f"{v.mean():.{digits}f} ± {v.std(ddof=1) if len(v) > 1 else 0:.{digits}f}")
        rows.append([m, str(len(runs)), str(sum(r["diverged"] == "True" for r in runs.values())), *cells])
    return rows


def _bound_cell(bounds: np.ndarray, left_out: int) -> str:
    """The largest error bound of the counted replicas, and the flagged ones left out."""
    bounds = bounds[~np.isnan(bounds)]
    text = f"≤ {bounds.max():.1e}" if len(bounds) else "n/a"
    return text + (f" ({left_out} flagged, left out)" if left_out else "")
