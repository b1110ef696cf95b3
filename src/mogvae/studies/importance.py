"""The importance-sampling estimator validated against quadrature on every
trained model of a study: its bias (quadrature minus the estimate, averaged
over points and replicas) against the number of samples K, and how often the
estimate lies beyond three of its own standard errors from the exact value."""
from __future__ import annotations

from pathlib import Path


from ..report.html import md_text
from ..runs.sweep import read_record
from ..storage.files import read_npy, write_csv

K_VALUES = (1, 10, 100, 1000, 5000)
POINTS = 200


def importance_rows(out: Path, ks=K_VALUES, points: int = POINTS) -> list[dict]:
    from ..estimators.likelihood import log_likelihood
    from ..runs.run import trained_model
    cells = read_record(out)["cells"]
    rows = []
    for cell in cells:
        run = out / "runs" / cell["name"]
        if cell["config"]["train"]["objective"] != "elbo" or not (run / "metrics.csv").exists():
            continue
        model, config, seeds = trained_model(run)
        y = read_npy(run / "data" / "test.npy")[:points]
        exact = log_likelihood(model, y, "quadrature", grid_size=config.eval.grid_size).value
        for k in ks:
            est = log_likelihood(model, y, "importance", n_samples=k, seeds=seeds)
            z = (est.value - exact) / est.error
            rows.append({"run": cell["name"], "model": f"{config.model.prior}+{config.model.posterior}",
                         "sigma": config.data.sigma, "k": k, "bias": float((exact - est.value).mean()),
                         "bias_stderr": float(est.error.square().sum().sqrt() / est.error.numel()),
                         "mean_stderr": float(est.error.mean()),
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


def reading(rows: list[dict]) -> list[str]:
    top = max(r["k"] for r in rows)
    at_top = [r for r in rows if r["k"] == top]
    worst = max(at_top, key=lambda r: r["beyond_3se"])
    return [f"At K = {top}, over every VAE of the study, the importance-sampling estimate's bias is at most "
            f"{max(r['bias'] for r in at_top):.2e} nats and its mean standard error at most "
            f"{max(r['mean_stderr'] for r in at_top):.2e}; the share of points beyond three standard errors of the "
            f"exact value is at most {worst['beyond_3se']:.1%} ({md_text(worst['run'])}; 0.3% if the errors were Gaussian). "
            "Table: figures/importance.csv."]
