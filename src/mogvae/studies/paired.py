"""What the studies share: metrics.csv grouped by (model, level of the study's axis), and each
richer model against mfg, paired by seed, at every level."""
from __future__ import annotations

from ..report.statistics import Interval, counted, paired

MEANS_CAPTION = ("mean over seeds with 95% t intervals; axes span the means (an interval may run off "
                 "an edge)")   # the noise and dimension figures
RICHER = (("mog-prior", "a richer prior"), ("mog-posterior", "a richer posterior"), ("mog-both", "both"))


def by_cell(rows: list[dict], level, keys) -> dict[tuple[str, object], dict[int, dict[str, float]]]:
    """{(model, level(row)): {seed: {key: value}}} over the replicas that count (neither diverged nor
    flagged: error bound above the tolerance)."""
    out: dict = {}
    for r in rows:
        if counted(r):
            out.setdefault((r["model"], level(r)), {})[int(r["seed"])] = {k: float(r[k]) for k in keys}
    return out


def richer_against_mfg(cells: dict, level, key: str = "test_log_likelihood") -> list[Interval]:
    """Each RICHER model minus mfg in `key` at one level, paired by seed."""
    metrics = {m: cells.get((m, level), {}) for m in ("mfg", *(m for m, _ in RICHER))}
    return [paired(metrics, m, "mfg", key) for m, _ in RICHER]


def interval_cell(iv: Interval, digits: int = 4) -> str:
    if iv.n < 2:
        return f"{iv.mean:+.{digits}f} (n = {iv.n})"
    return f"{iv.mean:+.{digits}f} [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]" + (" **" if iv.excludes_zero() else "")


def verdicts(helps: dict[str, list[str]], where: str) -> list[str]:
    """One line per richer model: the levels (`where` names them) at which it beats mfg."""
    lines = []
    for m, words in RICHER:
        at = ", ".join(helps[m])
        lines.append(f"- **{words.capitalize()}** ({m}) " + (
            f"beats mfg, by an interval that excludes zero, at {where} = {at}; elsewhere this many seeds cannot "
            "tell them apart, or mfg is ahead." if at else
            f"beats mfg at no {where} in this study (no interval excludes zero in its favour)."))
    return lines
