"""The importance-sampling estimator validated against quadrature on every
trained model of a study: its bias (quadrature minus the estimate, averaged
over points and replicas) against the number of samples K, and how often the
estimate lies beyond three of its own standard errors from the exact value.

Computed once per run, where the run finishes: the study's workers compute a run's rows beside the other
runs (`after_run`, as they draw its figures) and save them in figures/importance/<run>.json with what they
were computed from (K, the points, the run's metrics.csv digest, which changes whenever it is retrained or
re-evaluated). The report reads them, and computes only a run's that are missing or stale (a folder from
before, or a worker that died between its run and its rows). At the end of the study, one process, it had
taken about 17 min of the families study on defaults."""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..report.html import md_text
from ..runs.sweep import read_record
from ..storage.files import UnreadableFile, read_bytes, read_json, read_npy, write_csv, write_json

K_VALUES = (1, 10, 100, 1000, 5000)
POINTS = 200
QUICK = ((1, 10, 100, 1000), 50)     # --quick: K and points at toy size
SAVED = "importance"                 # figures/importance/<run>.json: a run's rows and what they were computed from
FIELDS = {"run": str, "model": str, "sigma": float, "k": int, "draws": int, "bias": float, "bias_stderr": float,
          "mean_stderr": float, "beyond_3se": float}     # k: draws asked for; draws: taken (likelihood.importance_draws)


def sizes(quick: bool) -> tuple[tuple[int, ...], int]:
    """(K values, test points): the study's, or toy size under --quick."""
    return QUICK if quick else (K_VALUES, POINTS)


def _is_sampled(config: dict) -> bool:
    """A VAE's run (an oracle's encoder is not the importance proposal studied)."""
    from ..objectives import OBJECTIVES
    objective = OBJECTIVES.get(config.get("train", {}).get("objective", "elbo"))
    return objective is not None and not objective.oracle


def _sampled_runs(out: Path) -> dict[str, Path]:
    """The finished VAEs of the sweep."""
    runs = {}
    for cell in read_record(out)["cells"]:
        run = out / "runs" / cell["name"]
        if _is_sampled(cell["config"]) and (run / "metrics.csv").exists():
            runs[cell["name"]] = run
    return runs


def _source(run: Path, ks, points: int) -> dict:
    """What a run's rows are computed from: K, the points, its metrics.csv digest, and mogvae's version."""
    from ..runs.sweep import versions
    return {"ks": [int(k) for k in ks], "points": int(points),
            "metrics": hashlib.sha256(read_bytes(run / "metrics.csv")).hexdigest(), "mogvae": versions()["mogvae"]}


def _saved_rows(path: Path, name: str, source: dict) -> list[dict] | None:
    """The rows saved at `path` if they were computed from exactly `source` and are well-formed, else None
    (then they are computed again: a damaged or stale file costs time, never a wrong number)."""
    if not path.is_file():
        return None
    try:
        saved = read_json(path)
    except UnreadableFile:
        return None
    if not isinstance(saved, dict) or {k: saved.get(k) for k in source} != source:
        return None
    rows = saved.get("rows")
    ok = isinstance(rows, list) and all(isinstance(r, dict) and set(r) == set(FIELDS) and r["run"] == name and
                                        all(_is(r[k], t) for k, t in FIELDS.items()) for r in rows)
    # each K once, or none (no replica's reference met its tolerance)
    return rows if ok and sorted(r["k"] for r in rows) in (sorted(source["ks"]), []) else None


def _is(value, kind: type) -> bool:
    """JSON's value of a field: a float field may hold an integer, never a boolean."""
    if isinstance(value, bool):
        return False
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def run_rows(out: Path, name: str, run: Path, ks=K_VALUES, points: int = POINTS, log=None) -> list[dict]:
    """One VAE run's rows, one per K: from figures/importance/<name>.json when they were computed from this
    run, K and points; else computed (every replica, the first `points` test points; `log(line)` says so
    first: a minute or more on defaults) and saved there."""
    from ..runs.sweep import SWEEP_LAYOUT
    from ..storage.folders import check_own_folders
    check_own_folders(Path(out), SWEEP_LAYOUT, option="report")    # figures/importance a real folder, even where
    source = _source(run, ks, points)                                # the folder's manifest predates it
    path = Path(out) / "figures" / SAVED / f"{name}.json"
    rows = _saved_rows(path, name, source)
    if rows is None:
        from ..runs.train_api import torch_threads
        if log:
            log(f"importance sampling against quadrature: {name} (K up to {max(ks):,}, {points:,} test points)")
        with torch_threads(1):      # as in a worker: the rows do not depend on who computed them (1e-9 apart)
            rows = _compute(name, run, ks, points)
        write_json(path, {**source, "rows": rows})
    return rows


def after_run(out: str, quick: bool, run: str) -> None:
    """A study's worker, as a run finishes (report.sweep.figure_drawers): its rows, computed and saved
    beside the other runs rather than one after another by the report."""
    from ..runs.run import stored_config
    run = Path(run)
    if _is_sampled(stored_config(read_json(run / "config.json"))):
        run_rows(Path(out), run.name, run, *sizes(quick))


def importance_rows(out: Path, ks=K_VALUES, points: int = POINTS, log=None) -> list[dict]:
    """One row per (VAE run, K): each run's as run_rows reads or computes them (`log(line)` before each
    run it computes, numbered among the runs)."""
    runs = _sampled_runs(out)
    return [row for i, (name, run) in enumerate(runs.items(), 1)
            for row in run_rows(out, name, run, ks, points, log and (lambda line: log(f"{line}, run {i} of {len(runs)}")))]


def _compute(name: str, run: Path, ks, points: int) -> list[dict]:
    from ..estimators.likelihood import importance_draws, log_likelihood
    from ..runs.run import trained_model
    model, config, seeds = trained_model(run)
    y = read_npy(run / "data" / "test.npy")[:points]
    ev = config.eval
    exact = log_likelihood(model, y, "quadrature", grid_size=ev.grid_size, grid_span=ev.grid_span,
                           tolerance=ev.tolerance)
    kept = (exact.error <= ev.tolerance).all(1)      # a replica whose reference misses its tolerance is no reference
    if not bool(kept.any()):
        return []
    exact = exact.value[kept]
    rows = []
    for k in ks:
        est = log_likelihood(model, y, "importance", n_samples=k, seeds=seeds)
        value, error = est.value[kept], est.error[kept]
        z = (value - exact) / error
        rows.append({"run": name, "model": f"{config.model.prior}+{config.model.posterior}",
                     "sigma": float(config.data.sigma), "k": int(k), "draws": importance_draws(model, k),
                     "bias": float((exact - value).mean()),
                     "bias_stderr": float(error.square().sum().sqrt() / error.numel()),
                     "mean_stderr": float(error.mean()),
                     "beyond_3se": float((z.abs() > 3).double().mean())})
    return rows


def importance_figure(out: Path, ks=K_VALUES, points: int = POINTS, log=None) -> tuple[Path, list[dict]]:
    import matplotlib.pyplot as plt

    from ..report.figures import _save
    rows = importance_rows(out, ks, points, log)
    write_csv(out / "figures" / "importance.csv", rows, list(FIELDS))
    sigmas = sorted({r["sigma"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(sigmas), figsize=(6.5 * len(sigmas), 4.5), squeeze=False)
    for ax, sigma in zip(axes[0], sigmas):
        ringed = False
        for model in sorted({r["model"] for r in rows if r["sigma"] == sigma}):
            mine = [r for r in rows if r["sigma"] == sigma and r["model"] == model]
            # at the draws taken: a K below two per stratum of the proposal takes as many as the next K, the same
            # estimate, which at K's own place would draw a level line that is no measurement
            ax.errorbar([r["draws"] for r in mine], [r["bias"] for r in mine],
                        yerr=[2 * r["bias_stderr"] for r in mine], marker="o", capsize=3, label=model)
            bad = [r for r in mine if fails_check(r)]
            ax.scatter([r["draws"] for r in bad], [r["bias"] for r in bad], s=140, facecolors="none", edgecolors="red",
                       linewidths=1.5, label="fails its own check" if bad and not ringed else None, zorder=3)
            ringed = ringed or bool(bad)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-4)   # signed: a bias below zero is sampling noise, shown as such
        ax.set(xlabel="importance samples per point, as taken\n(K asked for, at least two per stratum of the proposal)",
               ylabel="bias, log p (quadrature) − estimate, nats",
               title=f"sigma = {sigma:g}")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))     # beside the panel, not over its data
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
