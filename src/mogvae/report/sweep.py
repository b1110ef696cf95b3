"""The report of any sweep, from its saved files only (sweep.json, metrics.csv,
the run folders): per-cell tables, paired comparisons along every grid axis,
divergence rates, training curves and each cell's model figure. Written as
report.md and the self-contained report.html (html.py).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from ..storage.files import UnreadableFile, write_text
from .html import md_text, write_html
from .tables import fit_tables
from .statistics import Interval, counted, error_bound, flagged, has_values, load_metrics, paired, shown_columns, summary_rows

COMPARED = (("test_log_likelihood", "test LL"), ("inference_gap", "inference gap"), ("kl_to_truth", "KL to truth"))


def _fmt(value) -> str:
    """A grid value as report text (escaped: a value is the user's, or read back from sweep.json)."""
    return md_text("-".join(map(str, value)) if isinstance(value, list) else value)


def _axes(cells: list[dict]) -> list[str]:
    """Every grid key, in order of first appearance ([[grid.also]] cells may add or lack some)."""
    return list(dict.fromkeys(a for c in cells for a in c["values"]))


FIT_COLUMNS = {"test_log_likelihood", "kl_to_truth", "test_elbo", "inference_gap", "approximation_gap",
               "amortization_gap"}   # the per-run table's first half; samples and cost are the second


def cell_table(cells: list[dict], metrics) -> list[str]:
    """Per run, mean ± sd over seeds: the likelihood columns, then (a second table, so that neither
    runs off a 1,280-pixel page) the sample-based ones and the cost; columns with no value are left out."""
    axes = _axes(cells)
    names = _figure_names(cells)
    if axes == ["preset"] and all(names[c["name"]] != c["name"] for c in cells):
        axes = []                    # a grid over the preset alone: the run is named by its preset
    settings = [tuple(json.dumps(c["values"].get(a)) for a in axes) for c in cells]
    named_by_axes = bool(axes) and len(set(settings)) == len(settings)   # the run's name only repeats them
    columns = shown_columns(metrics)
    halves = [[c for c in columns if c[0] in FIT_COLUMNS], [c for c in columns if c[0] not in FIT_COLUMNS]]
    lines = []
    for half, counts in zip(halves, (True, False)):
        if not half:
            continue
        head = [*([] if named_by_axes else ["run"]), *map(md_text, axes), *(["seeds (diverged)"] if counts else []),
                *(t[1] for t in half)]
        lines += ["" if lines else None, "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for cell, row in zip(cells, summary_rows(metrics, [c["name"] for c in cells], half)):
            _, n, diverged, *values = row
            run = [] if named_by_axes else [md_text(names[cell["name"]] if not axes else cell["name"])]
            lines.append("| " + " | ".join([*run, *(_fmt(cell["values"].get(a, "–")) for a in axes),
                                             *([f"{n} ({diverged})"] if counts else []), *values]) + " |")
    return [line for line in lines if line is not None]


def comparisons(cells: list[dict], metrics) -> list[str]:
    """Along each grid axis: every value against the axis's first value, the other
    axes held fixed, paired by seed index (the same data order and noise)."""
    lines = []
    axes = list(cells[0]["values"]) if cells else []
    cells = [c for c in cells if list(c["values"]) == axes]   # the main grid; [[grid.also]] cells stand apart
    by_values = {tuple((a, json.dumps(c["values"][a])) for a in axes): c["name"] for c in cells}
    compared = [(key, label) for key, label in COMPARED if has_values(metrics, key)]
    for axis in axes:
        levels = list(dict.fromkeys(json.dumps(c["values"][axis]) for c in cells))
        if len(levels) < 2:
            continue
        lines += ["", f"### Along {md_text(axis)} (each value minus {_fmt(json.loads(levels[0]))}, paired by seed)", ""]
        if axis.startswith("data."):
            lines += ["This axis changes the data: test log-likelihoods are then on different test sets and "
                      "differ with the data's own entropy; KL to the truth compares like with like.", ""]
        lines += ["| fixed | " + md_text(axis) + " | " + " | ".join(label for _, label in compared) + " |",
                  "|" + "---|" * (2 + len(compared))]
        for cell in cells:
            if json.dumps(cell["values"][axis]) == levels[0]:
                continue
            base_key = tuple((a, levels[0] if a == axis else json.dumps(cell["values"][a])) for a in axes)
            base = by_values.get(base_key)
            if base is None:   # a [[grid.also]] cell with the main grid's keys, at a level the grid lacks
                continue
            fixed = ", ".join(f"{md_text(a)}={_fmt(cell['values'][a])}" for a in axes if a != axis) or "-"
            intervals = [paired(metrics, cell["name"], base, key) for key, _ in compared]
            lines.append(f"| {fixed} | {_fmt(cell['values'][axis])} | " + " | ".join(map(_interval, intervals)) + " |")
    return lines


def _interval(iv: Interval) -> str:
    if iv.n < 2:
        return f"{iv.mean:+.4f} (n = {iv.n})"
    mark = " **" if iv.excludes_zero() else ""
    return f"{iv.mean:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]{mark}"


def exactness_lines(cells: list[dict], metrics) -> list[str]:
    """The largest error bound of the replicas that count, and those flagged: their bound (max over test
    points of log p, the ELBO, ELBO*) missed the tolerance, so they are left out of every mean,
    comparison and verdict."""
    rows = [(c["name"], seed, r) for c in cells for seed, r in sorted(metrics[c["name"]].items())
            if r["diverged"] != "True"]
    missed = [(name, seed, error_bound(r), r.get("tolerance", math.nan)) for name, seed, r in rows if flagged(r)]
    bounds = [b for _, _, r in rows if not flagged(r) and not math.isnan(b := error_bound(r))]
    out = [f"Every number is within its error bound (exact: max over test points of log p, the ELBO and ELBO*; "
           f"importance sampling: two standard errors of the means plus the bias of log p); the largest bound of a "
           f"replica that counts: {max(bounds):.1e} nats." if bounds else
           "No replica that counts has a number with a bound." if missed else
           "No replica has a number with a bound (written before bounds were saved)."]
    if missed:
        out += ["", f"{len(missed)} of {len(rows)} replicas missed their tolerance even after adaptive refinement "
                "(at some test point a rule could not resolve a posterior, a prior or q within the budget, or a "
                "window could not hold a posterior: bound inf; under importance sampling, the means' sampling "
                "error stayed above it with 16 times the draws). They stay in metrics.csv (flagged = True) and "
                "are left out of every mean, comparison and verdict here:", "",
                *(f"- {md_text(name)}, seed {seed}: bound {bound:.2g} nats (tolerance {tol:g})"
                  for name, seed, bound, tol in missed)]
    return out


def _mean(metrics, name: str, key: str) -> float:
    v = [r.get(key, math.nan) for r in metrics[name].values() if counted(r)]
    v = [x for x in v if isinstance(x, float) and math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan


def verdict_lines(cells: list[dict], metrics) -> list[str]:
    """The one line that leads a plain sweep's (or a run's) report. Runs on the same data: the
    highest mean test log-likelihood, and how far ahead it is of each other run, paired by seed.
    Runs on different data (a data.* axis): by KL to the truth where it is known, as test
    log-likelihoods of different test sets do not compare."""
    names = [c["name"] for c in cells]
    same_data = not any(a.startswith("data.") for a in _axes(cells))
    key, better = (("test_log_likelihood", "highest") if same_data else ("kl_to_truth", "lowest"))
    means = {n: _mean(metrics, n, key) for n in names}
    ranked = sorted((n for n in names if math.isfinite(means[n])), key=means.get, reverse=better == "highest")
    what = "test log-likelihood" if same_data else "KL to the truth"
    missed = sum(r["diverged"] != "True" and flagged(r) for n in names for r in metrics[n].values())
    left_out = f" {missed} flagged replica{'s' if missed > 1 else ''} left out (Exactness)." if missed else ""
    if not ranked:
        why = (" that counts: every replica diverged or missed its tolerance" if missed else
               "" if same_data else " (the runs differ in their data, and the truth is unknown, so no one number "
               "compares them)")
        return [f"**Verdict:** none: no run has a finite {what}{why}." + left_out]
    best = ranked[0]
    if len(names) == 1:
        kl = _mean(metrics, best, "kl_to_truth")
        return [f"**Result:** test log-likelihood {means[best]:.4f} nats per point, mean over seeds"
                + (f"; {kl:.4f} nats from the truth" if math.isfinite(kl) else "") + "." + left_out]
    ahead = [(n, paired(metrics, best, n, key)) for n in ranked[1:]]
    decided = [n for n, iv in ahead if iv.excludes_zero()]
    sign = 1 if better == "highest" else -1        # "ahead" is the difference in the better direction
    against = ", ".join(f"{md_text(n)} by {sign * iv.mean:+.4f} {_bracket(iv, sign)}" for n, iv in ahead)
    return [f"**Verdict:** {md_text(best)} has the {better} mean {what} ({means[best]:.4f} nats per point), ahead "
            f"of {against} (paired by seed, 95% interval); the interval excludes zero against {len(decided)} of "
            f"{len(ahead)}" + (f" ({', '.join(map(md_text, decided))})" if decided and len(decided) < len(ahead)
                               else "") + "." + left_out]


def _bracket(iv: Interval, sign: int) -> str:
    if iv.n < 2:
        return f"(n = {iv.n})"
    low, high = sorted((sign * iv.low, sign * iv.high))
    return f"[{low:+.4f}, {high:+.4f}]"


def divergence_lines(cells: list[dict], metrics) -> list[str]:
    total = sum(len(metrics[c["name"]]) for c in cells)
    diverged = {c["name"]: sum(r["diverged"] == "True" for r in metrics[c["name"]].values()) for c in cells}
    out = [f"Diverged replicas: {sum(diverged.values())} of {total}."]
    out += [f"- {md_text(name)}: {k} of {len(metrics[name])}" for name, k in diverged.items() if k]
    return out


def _how_evaluated(metrics) -> str:
    """Quadrature (exact, with its error bound) unless some run has latent_dim > 2, whose
    log-likelihood is an importance-sampling estimate with a standard error."""
    sampled = any(math.isfinite(r.get("test_log_likelihood_stderr", math.nan))
                  for runs in metrics.values() for r in runs.values())
    return ("likelihoods by quadrature where latent_dim <= 2 (exact, with its error bound), by importance sampling "
            "beyond (an estimate with its standard error)" if sampled else "every likelihood exact (quadrature)")


def _finished_metrics(out: Path) -> dict:
    """metrics.csv by run ({} before any run finished); a damaged one is refused in one line."""
    path = out / "metrics.csv"
    return load_metrics(path, by="run") if path.exists() else {}


def write_sweep_report(out: Path, present: Callable[[str, Path], tuple | None] | None = None,
                       study: str | None = None, title: str | None = None) -> Path:
    """report.md and report.html of any sweep, study or reproduce folder, titled as sweep.json
    says (or `title`); a study puts its own reading and figures first: `present(study name,
    folder)` gives them, or None for a plain sweep (the caller passes studies.present, as
    studies/ sits above report/). `study` names it where sweep.json does not (a reproduce
    folder written before reproduce was the study `paper`)."""
    from ..runs.sweep import read_record
    out = Path(out)
    record = read_record(out)
    title, cells = title or record.get("title", "mogvae sweep"), record["cells"]
    study = study or record.get("study")
    metrics = _finished_metrics(out)
    unfinished = [c["name"] for c in cells if c["name"] not in metrics]
    names = _figure_names(cells)          # of every cell, finished or not: as the workers name the figures they draw
    cells = [c for c in cells if c["name"] in metrics]     # a sweep stopped before its end: what is finished
    if not cells:
        raise UnreadableFile(f"{out}: no run of this sweep has finished yet; re-run its command to train them")
    own = present(study, out) if present and study and not unfinished else None
    return _write(out, str(title), cells, metrics, {names[c["name"]]: out / "runs" / c["name"] for c in cells},
                  own or ([], []), unfinished)


def write_run_report(run: Path, label: str) -> Path:
    """report.md and report.html of one run folder (`mogvae train`'s), `label` naming its model:
    the same report as a sweep of that one run, with the figures in the run's own figures/."""
    run = Path(run)
    metrics = load_metrics(run / "metrics.csv", by=None, label=label)
    return _write(run, f"mogvae train: {label}", [{"name": label, "values": {}}], metrics, {label: run}, ([], []), [])


def _write(out: Path, title: str, cells: list[dict], metrics: dict, runs: dict[str, Path], own: tuple,
           unfinished: list[str]) -> Path:
    """The one report: a study's own lines and figures first, then per run, paired comparisons,
    divergence, exactness and the figures (training curves, each run's model figure)."""
    from .figures import comparison_figure, sweep_figures
    lead, first_figures = own
    if not lead:      # a plain sweep or run: the generic verdict, and the per-seed figure where runs compare
        lead = [*verdict_lines(cells, metrics), ""]
        first_figures = [comparison_figure(out, [c["name"] for c in cells], by="run", labels=_figure_names(cells))
                         ] if len(cells) > 1 else []
    answer, figures = first_figures[:1], [*first_figures[1:], *sweep_figures(out, runs)]
    seeds = sorted({len(m) for m in metrics.values()})
    lines = [f"# {md_text(title)}", "",
             *([f"**Unfinished:** {len(unfinished)} of {len(unfinished) + len(cells)} runs have not finished; this "
                "report shows the others (a study's own reading waits for all of them).", ""] if unfinished else []),
             f"{len(cells)} run{'s' if len(cells) > 1 else ''}, {'/'.join(map(str, seeds))} seed(s) each; "
             f"{_how_evaluated(metrics)}, "
             "in nats per test point; mean ± sd over seeds, diverged replicas and those whose error bound missed "
             "the tolerance (Exactness) excluded.", "", *lead,
             *(f"![{md_text(p.stem)}](figures/{p.name})" for p in answer), *([""] if answer else []),
             "## Per run", "", *cell_table(cells, metrics), "",
             *(["## Paired comparisons", "",
                "Mean difference over seeds with its 95% t interval; ** marks an interval that excludes zero.",
                *comparisons(cells, metrics), ""] if len(cells) > 1 else []),
             "## Divergence", "", *divergence_lines(cells, metrics), "",
             "## Exactness", "", *exactness_lines(cells, metrics), "",
             "## Figures", "", *(f"![{md_text(p.stem)}](figures/{p.name})" for p in figures), ""]
    report = write_text(out / "report.md", "\n".join(fit_tables(lines)))
    write_html(report, title)
    return report


LEAD_LINES = 10   # at most this many of a study's verdict lines at the end of a command


def report_lead(report: Path) -> list[str]:
    """The lines that lead a written report.md, as plain text for a terminal: the paragraph
    after the opening one (a plain sweep's verdict), then the verdict lines of a study's reading
    (its bullets and bold lines) up to the per-run table, at most LEAD_LINES in all."""
    lines = Path(report).read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if " nats per test point; " in line), None)
    if start is None:
        return []
    body = [line for line in lines[start + 1:] if line.strip()]
    body = body[:next((i for i, line in enumerate(body) if line == "## Per run"), len(body))]
    opening = next((i for i, line in enumerate(body) if line.startswith(("![", "#", "|"))), len(body))
    lead = [*body[:opening], *(line for line in body[opening:] if line.startswith(("- ", "**")))]
    if len(lead) > LEAD_LINES:
        lead = [*lead[:LEAD_LINES], f"... and {len(lead) - LEAD_LINES} more in {Path(report).name}"]
    return [line.replace("**", "").replace("\\_", "_") for line in lead]


def figure_drawers(out: Path, cells, also=None) -> dict[str, Callable[[str], None]]:
    """For each cell (runs.sweep.Cell) of the sweep at `out`, what its worker does once its run is
    finished (runs.sweep.execute's `after`): draw the run's own figures, named as this report names
    them, into out/figures/, then `also(run)` where given (a study's per-run work: Study.after_run). So
    they are done beside the other runs, in parallel, and the report only keeps them (figures.already_drawn)."""
    from functools import partial
    names = _figure_names([{"name": c.name, "values": c.values} for c in cells])
    # absolute: a Dask worker's working folder is not the driver's
    return {c.name: partial(_draw_run_figures, str(Path(out).resolve()), names[c.name], also) for c in cells}


def _draw_run_figures(out: str, name: str, also, run: str) -> None:
    from .figures import run_figures
    try:
        run_figures(Path(out), name, Path(run))
    except Exception:   # noqa: BLE001 -- drawn again by the report, which then says why; the study's work goes on
        pass
    if also is not None:    # (not on an interrupt: a stopped worker stops, and the report or a re-run does this)
        also(run)


def _figure_names(cells: list[dict]) -> dict[str, str]:
    """Each run's name in the figures: its preset where the grid varies the preset alone (a model's
    name, as in reproduce's contract: figures/mfg.png), else the cell's name (figures/NAME.png)."""
    presets = [c["values"].get("preset") if set(c["values"]) == {"preset"} else None for c in cells]
    if all(isinstance(p, str) and re.fullmatch(r"[a-z0-9][a-z0-9-]*", p) for p in presets) and \
            len(set(presets)) == len(presets):
        return {c["name"]: p for c, p in zip(cells, presets)}
    return {c["name"]: c["name"] for c in cells}
