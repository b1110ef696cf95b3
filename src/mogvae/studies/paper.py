"""The paper's study (`mogvae study paper`; `mogvae reproduce` is its alias, with the output
contract the README gives): its plan is runs/reproduce.py's, four presets over seeds on the
paper's process, and its reading is the paper's claims (report/paper.py) with the truth's and the
models' comparison figures, put first in the one report every sweep gets (report/sweep.py)."""
from __future__ import annotations

from pathlib import Path

from ..report.figures import comparison_figure, truth_figure
from ..report.paper import largest, read_study, read_truth, reading
from ..report.statistics import load_metrics
from ..storage.files import UnreadableFile

IDENTIFIABILITY = (
    "Note on identifiability: a 1-D latent with a N(0, 1) prior can represent the true p(y) with a",
    "*monotone* decoder (z -> quantile of f(U)), whose posterior is unimodal. The true f and its bimodal",
    "posterior are one of many equivalent solutions, so the learned decoders are compared through",
    "identifiable quantities (W1 between pushforwards) and through the prior-quantile alignment.")


def present(out: Path) -> tuple[list[str], list[Path]]:
    """The table by model, the truth, the paper's claims decided by paired intervals, and the
    truth and comparison figures (the sweep report adds the training and per-model figures)."""
    out = Path(out)
    study, truth = read_study(out), read_truth(out)
    metrics = load_metrics(out / "metrics.csv")
    models = list(study.models)
    if any(m not in metrics for m in models):
        raise UnreadableFile(f"{out / 'metrics.csv'}: has no rows of {sorted(set(models) - set(metrics))}; re-run "
                             "mogvae reproduce to rebuild it from the run folders")
    truth_figure(out)
    comparison_figure(out, models)
    lines = [
        f"Data: the paper's process (sigma = {truth['sigma']:g}), {study.data.n_train} train / "
        f"{study.data.n_test} test points, {study.train.epochs} epochs (the table: under Per run).",
        "",
        f"True test log-likelihood: {truth['test_log_likelihood']:.4f}. Quadrature error bound (max over runs and "
        f"points): marginal {largest(metrics, 'quadrature_error'):.1e}, ELBO "
        f"{largest(metrics, 'elbo_quadrature_error'):.1e} nats; largest posterior mass at the grid's edge "
        f"{largest(metrics, 'grid_edge_mass'):.1e} (near zero: no truncation).",
        "",
        "## What the numbers say",
        "",
        "Differences are paired by seed index (the same data order); an interval that",
        "contains zero means this many seeds cannot tell the models apart.",
        "",
        *reading(metrics, truth),
        "",
        *IDENTIFIABILITY,
        "",
    ]
    return lines, [out / "figures" / "truth.png", out / "figures" / "comparison.png"]
