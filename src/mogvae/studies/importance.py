"""The importance-sampling estimator validated against quadrature on every
trained model of a study: its bias (quadrature minus the estimate, averaged
over points and replicas) against the number of samples K, and how often the
estimate lies beyond three of its own standard errors from the exact value.

Computed once: the rows are saved in figures/importance.json with what they were computed from
(K, the points, and each run's metrics.csv digest, which changes whenever a run is retrained or
re-evaluated), so a later report of the same runs reads them instead of sampling again (about
17 min for the families study on defaults)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..report.html import md_text
from ..runs.sweep import read_record
from ..storage.files import UnreadableFile, read_bytes, read_json, read_npy, write_csv, write_json

K_VALUES = (1, 10, 100, 1000, 5000)
POINTS = 200
SAVED = "importance.json"     # in figures/: the rows and what they were computed from
FIELDS = {"run": str, "model": str, "sigma": float, "k": int, "bias": float, "bias_stderr": float,
          "mean_stderr": float, "beyond_3se": float}


def _sampled_runs(out: Path) -> dict[str, Path]:
    """The finished VAEs of the sweep (an oracle's encoder is not the importance proposal studied)."""
    from ..objectives import OBJECTIVES
    runs = {}
    for cell in read_record(out)["cells"]:
        run = out / "runs" / cell["name"]
        objective = OBJECTIVES.get(cell["config"].get("train", {}).get("objective", "elbo"))
        if objective is not None and not objective.oracle and (run / "metrics.csv").exists():
            runs[cell["name"]] = run
    return runs


def _source(runs: dict[str, Path], ks, points: int) -> dict:
    """What the rows are computed from: K, the points, each run's metrics.csv digest, and mogvae's version."""
    from ..runs.sweep import versions
    digests = {name: hashlib.sha256(read_bytes(run / "metrics.csv")).hexdigest() for name, run in runs.items()}
    return {"ks": [int(k) for k in ks], "points": int(points), "runs": digests, "mogvae": versions()["mogvae"]}


def _saved_rows(out: Path, source: dict) -> list[dict] | None:
    """The saved rows if they were computed from exactly `source` and are well-formed, else None
    (then they are computed again: a damaged or stale file costs time, never a wrong number)."""
    path = out / "figures" / SAVED
    if not path.is_file():
        return None
    try:
        saved = read_json(path)
    except UnreadableFile:
        return None
    if not isinstance(saved, dict) or {k: saved.get(k) for k in source} != source:
        return None
    rows = saved.get("rows")
    ok = isinstance(rows, list) and all(isinstance(r, dict) and set(r) == set(FIELDS) and
                                        all(_is(r[k], t) for k, t in FIELDS.items()) for r in rows)
    expected = sorted((run, k) for run in source["runs"] for k in source["ks"])   # each run at each K, once
    return rows if ok and sorted((r["run"], r["k"]) for r in rows) == expected else None


def _is(value, kind: type) -> bool:
    """JSON's value of a field: a float field may hold an integer, never a boolean."""
    if isinstance(value, bool):
        return False
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def importance_rows(out: Path, ks=K_VALUES, points: int = POINTS) -> list[dict]:
    """One row per (VAE run, K), from figures/importance.json when it was computed from these
    runs, K and points; else computed (every replica, the first `points` test points) and saved."""
    runs = _sampled_runs(out)
    source = _source(runs, ks, points)
    rows = _saved_rows(out, source)
    if rows is None:
        rows = _compute(runs, ks, points)
        write_json(out / "figures" / SAVED, {**source, "rows": rows})
    return rows


def _compute(runs: dict[str, Path], ks, points: int) -> list[dict]:
    from ..estimators.likelihood import log_likelihood
    from ..runs.run import trained_model
    rows = []
    for name, run in runs.items():
        model, config, seeds = trained_model(run)
        y = read_npy(run / "data" / "test.npy")[:points]
        ev = config.eval
        exact = log_likelihood(model, y, "quadrature", grid_size=ev.grid_size, grid_span=ev.grid_span,
                               tolerance=ev.tolerance)
        kept = (exact.error <= ev.tolerance).all(1)      # a replica whose reference misses its tolerance is no reference
        if not bool(kept.any()):
            continue
        exact = exact.value[kept]
        for k in ks:
            est = log_likelihood(model, y, "importance", n_samples=k, seeds=seeds)
            value, error = est.value[kept], est.error[kept]
            z = (value - exact) / error
            rows.append({"run": name, "model": f"{config.model.prior}+{config.model.posterior}",
                         "sigma": float(config.data.sigma), "k": int(k), "bias": float((exact - value).mean()),
                         "bias_stderr": float(error.square().sum().sqrt() / error.numel()),
                         "mean_stderr": float(error.mean()),
                         "beyond_3se": float((z.abs() > 3).double().mean())})
    return rows


def importance_figure(out: Path, ks=K_VALUES, points: int = POINTS) -> tuple[Path, list[dict]]:
    import matplotlib.pyplot as plt

    from ..report.figures import _save
    rows = importance_rows(out, ks, points)
    write_csv(out / "figures" / "importance.csv", rows,
              ["run", "model", "sigma", "k", "bias", "bias_stderr", "mean_stderr", "beyond_3se"])
    sigmas = sorted({r["sigma"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(sigmas), figsize=(6.5 * len(sigmas), 4.5), squeeze=False)
    for ax, sigma in zip(axes[0], sigmas):
        for model in sorted({r["model"] for r in rows if r["sigma"] == sigma}):
            mine = [r for r in rows if r["sigma"] == sigma and r["model"] == model]
            ax.errorbar([r["k"] for r in mine], [r["bias"] for r in mine], yerr=[2 * r["bias_stderr"] for r in mine],
                        marker="o", capsize=3, label=model)
            bad = [r for r in mine if fails_check(r)]
            ax.scatter([r["k"] for r in bad], [r["bias"] for r in bad], s=140, facecolors="none", edgecolors="red",
                       linewidths=1.5, label="fails its own check" if bad else None, zorder=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-4)   # signed: a bias below zero is sampling noise, shown as such
        ax.set(xlabel="K, importance samples per point", ylabel="bias, log p (quadrature) − estimate, nats",
               title=f"sigma = {sigma:g}")
        ax.legend(fontsize=8)
    fig.suptitle(f"Importance-sampling log p(y) against quadrature, mean over the first {points} test points and all "
                 "replicas, ±2 standard errors (symmetric log axis, linear within ±1e-4)", fontsize=10)
    fig.tight_layout()
    path = out / "figures" / "importance.png"
    _save(fig, path)
    return path, rows


BEYOND_3SE_LIMIT = 0.05   # the share of points beyond 3 SE that fails the check (0.3% if the errors were Gaussian)


def fails_check(row: dict) -> bool:
    """An estimate whose own standard errors do not cover its error: the mean bias beyond three of
    its standard errors, or more than BEYOND_3SE_LIMIT of the points beyond three of theirs."""
    return abs(row["bias"]) > 3 * row["bias_stderr"] or row["beyond_3se"] > BEYOND_3SE_LIMIT


def reading(rows: list[dict]) -> list[str]:
    if not rows:
        return ["No VAE of this study has finished: there is no importance-sampling estimate to check."]
    top = max(r["k"] for r in rows)
    at_top = [r for r in rows if r["k"] == top]
    worst = max(at_top, key=lambda r: r["beyond_3se"])
    return [f"At K = {top}, over every VAE of the study, the importance-sampling estimate's bias is at most "
            f"{max(r['bias'] for r in at_top):.2e} nats and its mean standard error at most "
            f"{max(r['mean_stderr'] for r in at_top):.2e}; the share of points beyond three standard errors of the "
            f"exact value is at most {worst['beyond_3se']:.1%} ({md_text(worst['run'])}; 0.3% if the errors were Gaussian). "
            "Table: figures/importance.csv."] + _failures(at_top, top)


def _failures(rows: list[dict], k: int) -> list[str]:
    """The estimates at K = k that fail their own check, named (ringed red in the figure)."""
    bad = [r for r in rows if fails_check(r)]
    if not bad:
        return []
    return ["", f"**Fails its own check at K = {k}:** {len(bad)} of {len(rows)} runs' estimates (a mean bias beyond "
            f"three of its standard errors, or over {BEYOND_3SE_LIMIT:.0%} of points beyond three of theirs): their "
            "standard errors understate their error, so their importance-sampling numbers are not to be trusted at "
            "this K.", "", *(f"- {md_text(r['run'])}: bias {r['bias']:.3g} ± {r['bias_stderr']:.2g} nats, "
                             f"{r['beyond_3se']:.1%} of points beyond 3 SE" for r in bad)]
