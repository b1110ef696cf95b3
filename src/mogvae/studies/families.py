"""The families study: the four-term decomposition of log p*(y) - ELBO(y) per
prior x posterior and sigma (estimators/gaps.py), each VAE paired by seed with the
exact-likelihood oracle of its prior; a stacked-bar figure; paired answers to
"does a richer prior, or a richer posterior, shrink each term?"."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from ..config.schema import ModelConfig
from ..estimators.gaps import decomposition
from ..objectives import OBJECTIVES
from ..report.html import md_text
from ..report.statistics import Interval, counted, t_interval
from ..storage.files import read_csv, write_csv

DEFAULT_POSTERIOR = ModelConfig().posterior
TERMS = (("misspecification", "misspecification", "#8172b3"),
         ("over_regularization", "over-regularization", "#dd8452"),
         ("approximation_gap", "approximation gap", "#55a868"),
         ("amortization_gap", "amortization gap", "#4c72b0"))
NEEDED = ("gap_true_log_likelihood", "gap_log_likelihood", "gap_elbo", "approximation_gap", "amortization_gap",
          "test_log_likelihood")


def prior_family(prior: str, posterior: str) -> tuple[str, str]:
    """What fixes the prior's family: the prior, and for a VampPrior also the posterior,
    whose encoder family it pools (a pool of Gaussians, of mixtures, or of flows)."""
    return (prior, posterior if prior == "vamp" else "")


def _rows(out: Path) -> tuple[dict, dict]:
    """(VAE replicas {(sigma, prior, posterior): {seed: metrics}},
    oracles {(sigma, prior_family): {seed: metrics}})."""
    vaes: dict = {}
    oracles: dict = {}
    for r in read_csv(out / "metrics.csv"):
        if not counted(r):           # diverged, or its error bound missed the tolerance
            continue
        values = {k: float(r[k]) for k in NEEDED}
        # a cell that does not set the posterior (the first oracles) has the default one
        sigma, prior, posterior = float(r["data.sigma"]), r["model.prior"], r["model.posterior"] or DEFAULT_POSTERIOR
        if getattr(OBJECTIVES.get(r.get("train.objective") or "elbo"), "oracle", False):
            oracles.setdefault((sigma, prior_family(prior, posterior)), {})[int(r["seed"])] = values
        else:
            vaes.setdefault((sigma, prior, posterior), {})[int(r["seed"])] = values
    return vaes, oracles


def decompositions(out: Path) -> list[dict]:
    """One row per VAE replica with an oracle replica of the same prior family, sigma and seed."""
    vaes, oracles = _rows(out)
    rows = []
    for (sigma, prior, posterior), seeds in vaes.items():
        for seed, vae in sorted(seeds.items()):
            oracle = oracles.get((sigma, prior_family(prior, posterior)), {}).get(seed)
            if oracle is None:
                continue
            rows.append({"sigma": sigma, "prior": prior, "posterior": posterior, "seed": seed,
                         **decomposition(vae, oracle)})
    return rows


def _intervals(rows: list[dict]) -> dict:
    """{(sigma, prior, posterior): {term: Interval}}."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["sigma"], r["prior"], r["posterior"]), []).append(r)
    return {k: {t: t_interval(np.array([r[t] for r in v])) for t in (*(x[0] for x in TERMS), "total")}
            for k, v in cells.items()}


def families_figure(out: Path) -> Path:
    import matplotlib.pyplot as plt

    from ..report.figures import _save
    rows = decompositions(out)
    write_csv(out / "figures" / "decomposition.csv", rows,
              ["sigma", "prior", "posterior", "seed", *(t[0] for t in TERMS), "total"])
    cells = _intervals(rows)
    sigmas = sorted({k[0] for k in cells}, reverse=True)
    fig, axes = plt.subplots(1, len(sigmas), figsize=(7 * len(sigmas) + 2.5, 4.8), squeeze=False)   # + the legend
    for ax, sigma in zip(axes[0], sigmas):
        keys = sorted(k for k in cells if k[0] == sigma)
        x = np.arange(len(keys))
        up, down = np.zeros(len(keys)), np.zeros(len(keys))
        for term, label, color in TERMS:
            v = np.array([cells[k][term].mean for k in keys])
            pos, neg = np.clip(v, 0, None), np.clip(v, None, 0)
            ax.bar(x, pos, bottom=up, color=color, label=label)
            ax.bar(x, neg, bottom=down, color=color, hatch="//", edgecolor="white")
            up, down = up + pos, down + neg
        total = [cells[k]["total"] for k in keys]
        ax.errorbar(x, [t.mean for t in total], yerr=[[t.mean - t.low for t in total], [t.high - t.mean for t in total]],
                    fmt="k_", ms=14, capsize=4, label="total, log p* − ELBO (95% CI)")
        ax.axhline(0, color="k", lw=0.8)
        span = max(up.max(), *(t.mean for t in total)) - min(down.min(), 0.0)
        ax.set_ylim(min(down.min(), 0.0) - 0.15 * span, max(up.max(), *(t.mean for t in total)) + 0.25 * span)
        ax.set_xticks(x, [f"{k[1]}\n+{k[2]}" for k in keys])
        ax.set(title=f"sigma = {sigma:g}", ylabel="nats per test point, mean over seeds")
    # one legend, outside the last panel: inside, "best" still covered intervals that run off the top
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Where the ELBO falls short of log p*: prior + posterior family (negative parts hatched, below 0; "
                 "axes span the bars, an interval may run off an edge)", fontsize=10)
    fig.tight_layout()
    path = out / "figures" / "families.png"
    _save(fig, path)
    return path


def reading(out: Path) -> list[str]:
    rows = decompositions(out)
    cells = _intervals(rows)
    if not cells:
        return ["No VAE has an oracle of its prior to pair with: the decomposition needs both."]
    lines = ["Mean over seeds [95% t interval], nats per test point, on the first `eval.gap_points` test points. "
             "The four terms sum to the total exactly, per replica.", "",
             "| sigma | prior + posterior | " + " | ".join(t[1] for t in TERMS) + " | total |",
             "|" + "---|" * (3 + len(TERMS))]
    for key in sorted(cells, key=lambda k: (-k[0], k[1], k[2])):
        iv = cells[key]
        lines.append(f"| {key[0]:g} | {md_text(key[1])} + {md_text(key[2])} | " +
                     " | ".join(_fmt(iv[t]) for t, _, _ in TERMS) + f" | {_fmt(iv['total'])} |")
    lines += ["", "### Does a richer prior or a richer posterior shrink each term? (paired by seed, "
              "against normal + gaussian)", "",
              "| sigma | change | " + " | ".join(t[1] for t in TERMS) + " | total |",
              "|" + "---|" * (3 + len(TERMS))]
    by_key: dict = {}
    verdicts: dict = {}
    for r in rows:
        by_key.setdefault((r["sigma"], r["prior"], r["posterior"]), {})[r["seed"]] = r
    for sigma in sorted({k[0] for k in cells}, reverse=True):
        base = by_key.get((sigma, "normal", "gaussian"), {})
        for key in sorted(k for k in by_key if k[0] == sigma and k[1:] != ("normal", "gaussian")):
            seeds = sorted(set(base) & set(by_key[key]))
            diffs = {t: t_interval(np.array([by_key[key][s][t] - base[s][t] for s in seeds]))
                     for t in (*(x[0] for x in TERMS), "total")}
            lines.append(f"| {sigma:g} | {md_text(key[1])} + {md_text(key[2])} | " +
                         " | ".join(_fmt(diffs[t]) for t, _, _ in TERMS) + f" | {_fmt(diffs['total'])} |")
            verdicts.setdefault(sigma, []).append((key[1:], diffs))
    lines += ["", *_sentences(verdicts)]
    lines += ["", "A negative change shrinks the term; ** marks an interval that excludes zero. Misspecification "
              "and over-regularization pair each VAE with the oracle of its own prior (train.objective = "
              "\"exact\"; a VampPrior's oracle pools the same encoder family as its VAE); an oracle that trains worse "
              "than its VAE shows as negative over-regularization."]
    return lines


RICHER = {("normal", "mog"): "a richer posterior (normal + mog)", ("normal", "flow"): "a flow posterior (normal + flow)",
          ("mog", "gaussian"): "a richer prior (mog + gaussian)", ("vamp", "gaussian"): "a VampPrior (vamp + gaussian)",
          ("mog", "mog"): "both (mog + mog)"}


def _sentences(verdicts: dict) -> list[str]:
    """Yacoby et al.'s question, read off the paired intervals: does a richer
    posterior, or a richer prior, shrink the over-regularization?"""
    out = []
    for sigma, changes in verdicts.items():
        parts = []
        for family, diffs in changes:
            if family not in RICHER:
                continue
            iv = diffs["over_regularization"]
            verdict = ("shrinks it" if iv.excludes_zero() and iv.mean < 0 else
                       "grows it" if iv.excludes_zero() else "does not change it detectably")
            parts.append(f"{RICHER[family]} {verdict} ({iv.mean:+.5f} nats)")
        if parts:
            out.append(f"- Over-regularization at sigma = {sigma:g}: " + "; ".join(parts) + ".")
    return out


def _fmt(iv: Interval) -> str:
    if iv.n < 2 or not math.isfinite(iv.low):
        return f"{iv.mean:+.5f} (n = {iv.n})"
    return f"{iv.mean:+.5f} [{iv.low:+.5f}, {iv.high:+.5f}]" + (" **" if iv.excludes_zero() else "")


def after_run(out: str, quick: bool, run: str) -> None:
    """What a worker does as one of the study's runs finishes, beside the others: its importance-sampling rows."""
    from . import importance
    importance.after_run(out, quick, run)


def present(out) -> tuple[list[str], list]:
    """The study's reading and figures (the decomposition, then importance sampling against
    quadrature, at toy size under --quick), first in its report."""
    from ..runs.sweep import read_record
    from . import importance
    figure = families_figure(out)
    quick = read_record(out).get("title", "").endswith("(quick)")
    # the rows the workers did not compute (a folder from before, --no-report) are computed here: said on stderr
    sampled, rows = importance.importance_figure(out, *importance.sizes(quick),
                                                 log=lambda line: print(f"report: {line}", file=sys.stderr))
    return (["## Where each family's shortfall comes from", "", *reading(out), "",
             "## Importance sampling against quadrature", "", *importance.reading(rows), ""], [figure, sampled])
