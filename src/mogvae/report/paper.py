"""The paper's study's reading: a table and the paper's claims, each decided by a paired
interval, generated from metrics.csv alone (one source of truth for every number), and the
readers of a reproduce folder's own files (config.json, truth.json). studies/paper.py puts
them first in the study's report."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..storage.files import UnreadableFile, read_json
from .html import md_text
from .statistics import Interval, counted, flagged, paired, t_interval


def _verdict(iv: Interval, better: str, worse: str) -> str:
    if iv.n < 2:
        return f"cannot be decided from one seed: {iv.describe()}"
    if not iv.excludes_zero():
        return f"is indistinguishable from zero at this number of seeds: {iv.describe()}"
    return f"{better if iv.mean > 0 else worse}: {iv.describe()}"


def reading(metrics, truth: dict) -> list[str]:
    """Sentences on the paper's claims, each decided by a paired 95% interval."""
    have = set(metrics)
    out = []
    if {"mfg", "mog-prior"} <= have:
        out.append("- **More expressive prior** (mog-prior − mfg), test log-likelihood "
                   + _verdict(paired(metrics, "mog-prior", "mfg", "test_log_likelihood"), "helps", "hurts"))
    if {"mfg", "mog-posterior"} <= have:
        out.append("- **More expressive posterior** (mog-posterior − mfg), test log-likelihood "
                   + _verdict(paired(metrics, "mog-posterior", "mfg", "test_log_likelihood"), "helps", "hurts"))
        out.append("- Mixture posterior, inference gap (mfg − mog-posterior) "
                   + _verdict(paired(metrics, "mfg", "mog-posterior", "inference_gap"),
                              "shrinks: the richer q fits the model's posterior better",
                              "grows"))
    if {"mog-prior", "mog-posterior"} <= have:
        iv = paired(metrics, "mog-prior", "mog-posterior", "test_log_likelihood")
        out.append("- **Prior vs posterior** (mog-prior − mog-posterior), test log-likelihood "
                   + _verdict(iv, "favours the richer prior, as the paper claims",
                              "favours the richer posterior, against the paper's claim"))
    if {"mog-both", "mfg"} <= have:
        out.append("- Both (mog-both − mfg), test log-likelihood "
                   + _verdict(paired(metrics, "mog-both", "mfg", "test_log_likelihood"), "helps", "hurts"))
    for m in metrics:
        ratio = t_interval(np.array([r["std_ratio"] for r in metrics[m].values() if counted(r)], dtype=float))
        if ratio.n > 1:
            learns = ratio.low <= 1 <= ratio.high
            out.append(f"- {md_text(m)}: std(generated)/std(test) = {ratio.mean:.3f} [95% CI {ratio.low:.3f}, {ratio.high:.3f}]: "
                       + ("consistent with learning the variance." if learns else
                          "does not learn the variance (the paper's observation)."))
    kl = {m: t_interval(np.array([r["kl_to_truth"] for r in metrics[m].values() if counted(r)], dtype=float))
          for m in metrics}
    out.append("- Distance to the truth, KL(p* || p_theta) in nats: "
               + ", ".join(f"{md_text(m)} {iv.mean:.4f}" for m, iv in kl.items())
               + f" (true test log-likelihood {truth['test_log_likelihood']:.4f}).")
    diverged = sum(r["diverged"] == "True" for runs in metrics.values() for r in runs.values())
    total = sum(len(runs) for runs in metrics.values())
    out.append(f"- Diverged runs: {diverged} of {total}" + (" (excluded from every mean above; see metrics.csv)."
                                                           if diverged else "."))
    missed = sum(r["diverged"] != "True" and flagged(r) for runs in metrics.values() for r in runs.values())
    if missed:
        out.append(f"- Replicas whose error bound missed the tolerance: {missed} of {total} (flagged in metrics.csv, "
                   "excluded from every mean and interval above; the exactness line lists them).")
    return out


def read_study(out: Path):
    """The ReproduceConfig in a reproduce folder's config.json, validated: its model names become
    paths (runs/preset=NAME, figures/NAME.png), so anything but the known presets is damage."""
    from pydantic import ValidationError

    from ..config.schema import ReproduceConfig
    path = Path(out) / "config.json"
    record = read_json(path)
    try:
        return ReproduceConfig(**record["study"])
    except (ValidationError, KeyError, TypeError):
        raise UnreadableFile(f"{path}: damaged (not the study configuration mogvae wrote)") from None



def read_truth(out: Path) -> dict[str, float]:
    """A reproduce folder's truth.json as numbers (sigma, val_ and test_log_likelihood)."""
    path = Path(out) / "truth.json"
    record = read_json(path)
    try:
        return {k: float(record[k]) for k in ("sigma", "val_log_likelihood", "test_log_likelihood")}
    except (KeyError, TypeError, ValueError):
        raise UnreadableFile(f"{path}: damaged (not the numbers mogvae wrote)") from None



def largest(metrics, key) -> float:
    v = [r[key] for runs in metrics.values() for r in runs.values() if math.isfinite(r[key])]
    return max(v) if v else math.nan
