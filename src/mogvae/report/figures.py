"""Figures, made only from a study's saved files. Each figure's data is written
beside it as CSV (long format), so every plotted number can be checked."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..data.paper import PaperProcess  # noqa: E402
from ..estimators.evaluate import mass_window  # noqa: E402
from ..storage.files import atomic_write_bytes, read_bytes, read_csv, read_npz, write_csv  # noqa: E402
from .statistics import counted  # noqa: E402

COLORS = {"mfg": "#4c72b0", "mog-prior": "#dd8452", "mog-posterior": "#55a868", "mog-both": "#c44e52"}
COMPARED = [("test_log_likelihood", "test log-likelihood (nats)"), ("kl_to_truth", "KL(p* || p_theta) (nats)"),
            ("test_elbo", "test ELBO (nats)"), ("inference_gap", "inference gap KL(q || p_theta(z|y))"),
            ("w1_to_truth", "W1(p_theta(y), p*(y)), exact"), ("w1_samples", "W1(generated, test)"),
            ("w1_decoder", "W1(f_phi(z), f(z)) pushforwards"), ("std_ratio", "std(generated) / std(test)")]
TRUTH_PROBES = {"the paper's y values": (1.0, 0.2, -3.0), "y inside the data": (0.0, 0.1, 0.3)}


INPUTS_KEY = "mogvae-inputs"   # a PNG text chunk: the digest of what the figure was drawn from
DPI = 110


def _save(fig, path: Path, inputs: str | None = None) -> None:
    """The PNG, with the digest of its inputs. Written after its CSV: a figure stopped between the two
    (a worker killed mid-sweep) has a stale digest or none, so it is drawn again, never kept half-new."""
    import io
    buf = io.BytesIO()
    # The saved area is the figure's tight box (a long title reaches beyond its panel; tight_layout, which
    # every figure ran, counts only titles' heights). savefig(bbox_inches="tight") draws the whole figure
    # once just to find that box, and tight_layout leaves a layout engine that asks for the same extra
    # draw: the box is measured here instead, without drawing, and the figure is drawn once.
    # Measured at the saved resolution: text measured at another dpi is a little wider or narrower,
    # and the box with it (at 110 dpi the PNGs are pixel for pixel what bbox_inches="tight" saved).
    fig.set_layout_engine(None)
    fig.set_dpi(DPI)
    box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(plt.rcParams["savefig.pad_inches"])
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches=box, metadata={INPUTS_KEY: inputs} if inputs else None)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), fault="figure")


def inputs_digest(*parts: bytes | str) -> str:
    """The digest of a figure's inputs (the saved files it reads, its labels) and of the code that
    draws it (this module, matplotlib's version): equal digests draw equal figures."""
    import hashlib
    h = hashlib.sha256(Path(__file__).read_bytes() + matplotlib.__version__.encode())
    for part in parts:
        h.update(hashlib.sha256(part.encode() if isinstance(part, str) else part).digest())
    return h.hexdigest()


def already_drawn(png: Path, inputs: str) -> bool:
    """Whether `png` and its CSV were drawn from exactly `inputs`: then a report keeps them instead
    of drawing again (a figure costs about a second; a study's report redrew dozens of unchanged
    ones). A damaged or stale PNG is drawn again, never trusted."""
    if not (png.is_file() and png.with_suffix(".csv").is_file()):
        return False
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(png) as image:
            return image.text.get(INPUTS_KEY) == inputs
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError):
        return False


def truth_figure(out: Path) -> None:
    """The paper's Figure 1: joint density, f, and posteriors p*(z|y). Each of the
    paper's probe values gets its own panel and y-range: the spikes at y = 1 and
    y = -3 (mass squeezed against z = 0 and 1) would flatten the y = 0.2 curve."""
    from .paper import read_truth
    inputs = inputs_digest("truth", read_bytes(out / "truth.json"))
    if already_drawn(out / "figures" / "truth.png", inputs):
        return
    process = PaperProcess(read_truth(out)["sigma"])
    z = np.linspace(0, 1, 1001)
    y = np.linspace(-0.4, 0.65, 301)
    joint = process.joint_density(y[:, None], z[None])
    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    im = ax[0, 0].pcolormesh(z, y, joint, shading="auto", cmap="viridis")
    fig.colorbar(im, ax=ax[0, 0])
    ax[0, 0].set(xlabel="z", ylabel="y", title="true joint density p*(y, z)")
    ax[0, 1].plot(z, process.f(z), color="k")
    ax[0, 1].set(xlabel="z", ylabel="f(z)", title=f"true f; y | z ~ N(f(z), {process.sigma:g}^2)")
    rows = [{"panel": "f", "z": a, "y": "", "value": b} for a, b in zip(z, process.f(z))]
    inside = TRUTH_PROBES["y inside the data"]
    for yy, p in zip(inside, process.posterior(np.asarray(inside), z)):
        ax[0, 2].plot(z, p, label=f"y = {yy:g}")
        rows += [{"panel": "posterior", "z": zz, "y": yy, "value": v} for zz, v in zip(z, p)]
    ax[0, 2].set(xlabel="z", ylabel="density", title="true posterior p*(z | y), y inside the data")
    ax[0, 2].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no curve hidden
    paper = TRUTH_PROBES["the paper's y values"]
    for a, yy, p in zip(ax[1], paper, process.posterior(np.asarray(paper), z)):
        a.plot(z, p, color="k")
        a.set(xlabel="z", ylabel="density", ylim=(0, 1.08 * p.max()), title=f"true posterior p*(z | y = {yy:g})")
        rows += [{"panel": "posterior", "z": zz, "y": yy, "value": v} for zz, v in zip(z, p)]
    fig.tight_layout()
    rows += [{"panel": "joint", "z": z[j], "y": y[i], "value": joint[i, j]}
             for i in range(0, len(y), 10) for j in range(0, len(z), 25)]
    write_csv(out / "figures" / "truth.csv", rows, ["panel", "z", "y", "value"])
    _save(fig, out / "figures" / "truth.png", inputs)


def model_figure(out: Path, model: str, run: Path) -> Path:
    """The paper's Figures 2-4 for one model (its run folder `run`): decoder, generated data, posteriors."""
    path = out / "figures" / f"{model}.png"
    inputs = inputs_digest("model", model, read_bytes(run / "curves.npz"))
    if already_drawn(path, inputs):
        return path
    c = read_npz(run / "curves.npz")
    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    color = COLORS.get(model, "k")
    R = c["decoder"].shape[0]
    rows = []
    for r in range(R):
        alpha, lw = (1.0, 2) if r == 0 else (0.3, 1)
        ax[0, 0].plot(c["z_grid"][r], c["decoder"][r], color=color, alpha=alpha, lw=lw)
        ax[0, 1].plot(c["u_grid"], c["decoder_aligned"][r], color=color, alpha=alpha, lw=lw)
        rows += [{"panel": "decoder_aligned", "seed": r, "x": u, "value": v}
                 for u, v in zip(c["u_grid"][::10], c["decoder_aligned"][r][::10])]
    twin = ax[0, 0].twinx()
    twin.fill_between(c["z_grid"][0], c["prior_density"][0], color="0.8", alpha=0.5)
    twin.set_ylabel("prior density p_theta(z), seed 0")
    lo, hi = mass_window(c["z_grid"][0], c["prior_density"][0], level=1e-4)
    ax[0, 0].set(xlim=(lo, hi), xlabel="z (model latent)", ylabel="f_phi(z)",
                 title="learned decoder (seed 0 bold, other seeds faint)")
    fig.suptitle(model, fontsize=11)          # a cell's name can be long: above the panels, not in one's title
    ax[0, 1].plot(c["u_grid"], c["true_f_aligned"], "k--", label="true f(u)")
    ax[0, 1].set(xlabel="u = F_theta(z), prior CDF", ylabel="decoder",
                 title="decoder vs true f, aligned by prior quantile")
    ax[0, 1].legend()
    edges = c["hist_edges"]
    outside = 1.0 - float(np.sum(c["hist_density"][0] * np.diff(edges)))        # the histogram's area is the share inside
    beyond = f", {outside:.1%} beyond the axis" if outside >= 0.001 else ""
    ax[0, 2].stairs(c["hist_density"][0], edges, fill=True, color=color, alpha=0.4, label=f"generated (seed 0{beyond})")
    ax[0, 2].plot(c["y_grid"], c["model_density"][0], color=color, label="p_theta(y), exact")
    ax[0, 2].plot(c["y_grid"], c["true_density"], "k--", label="p*(y), exact")
    ax[0, 2].set(xlabel="y", ylabel="density", title="generated data")
    ax[0, 2].legend(fontsize=8)
    rows += [{"panel": "density", "seed": 0, "x": y, "value": v} for y, v in zip(c["y_grid"], c["model_density"][0])]
    rows += [{"panel": "true_density", "seed": "", "x": y, "value": v} for y, v in zip(c["y_grid"], c["true_density"])]
    for j, y in enumerate(c["probe_y"]):
        a = ax[1, j]
        z, q, p = c["probe_z_grid"][0, j], c["q_density"][0, j], c["p_density"][0, j]
        a.plot(z, p, "k-", label="exact p_theta(z|y)")
        a.plot(z, q, color=color, ls="--", label="q(z|y)")
        where = f" ({c['probe_quantile'][j]:.0%} quantile of the test data)" if "probe_quantile" in c else ""
        a.set(xlim=mass_window(z, p, q, level=1e-3), xlabel="z (model latent)", ylabel="density",
              title=f"posterior at y = {y:g}{where}")
        if q.max() > 4 * p.max():  # narrow components of q (real, and of unit area) would flatten p: say so instead
            a.set_ylim(0, 2.5 * p.max())
            a.text(0.02, 0.97, f"q(z|y) peaks at {q.max():.3g}, above the axis", transform=a.transAxes,
                   fontsize=7, va="top", color=color)
        a.legend(fontsize=8)
        rows += [{"panel": f"posterior_y={y:g}", "seed": 0, "x": zz, "value": f"{pp};{qq}"}
                 for zz, pp, qq in zip(z[::5], p[::5], q[::5])]
    fig.tight_layout()
    write_csv(path.with_suffix(".csv"), rows, ["panel", "seed", "x", "value"])
    _save(fig, path, inputs)
    return path


NON_NEGATIVE = {"kl_to_truth", "inference_gap", "w1_to_truth", "w1_samples", "w1_decoder", "std_ratio"}


def robust_limits(values: np.ndarray, pad: float = 0.15) -> tuple[float, float]:
    """Axis limits from the bulk of the values (quartiles +- 3 IQR, widened to the
    points inside that fence): one outlying seed cannot set the range."""
    v = values[np.isfinite(values)]
    q1, q3 = np.percentile(v, [25, 75])
    fence = 3 * (q3 - q1) if q3 > q1 else 0.05 * max(abs(q1), 1e-12)
    inside = v[(v >= q1 - fence) & (v <= q3 + fence)]
    lo, hi = inside.min(), inside.max()
    span = hi - lo if hi > lo else max(abs(hi), 1e-12)
    return lo - pad * span, hi + pad * span


def comparison_figure(out: Path, models: list[str], by: str = "model", labels: dict[str, str] | None = None) -> Path:
    """Each seed as a point, the mean with its 95% t interval (clipped at zero for
    quantities that cannot be negative), per metric that some replica has a value for.
    Axes span the bulk of the seeds; the seeds of one model outside them are drawn at the
    edge as triangles, with one label (their count and most extreme value) per model and
    side, so labels never pile up. Non-negative quantities spanning more than a decade get a
    log axis instead. `by`: metrics.csv's column naming the model (a sweep's: "run"); `labels`:
    the names shown (and colored) for them."""
    shown = [(labels or {}).get(m, m) for m in models]
    path = out / "figures" / "comparison.png"
    truth_file = out / "truth.json"
    inputs = inputs_digest("comparison", read_bytes(out / "metrics.csv"), repr((models, by, shown)),
                           read_bytes(truth_file) if truth_file.exists() else b"")
    if already_drawn(path, inputs):
        return path
    from .statistics import t_interval
    rows = [r for r in read_csv(out / "metrics.csv") if counted(r)]
    truth = _read_truth_if_any(out)
    compared = [(k, label) for k, label in COMPARED if any(np.isfinite(float(r[k])) for r in rows if k in r)]
    cols = min(4, len(compared))
    fig, axes = plt.subplots((len(compared) + cols - 1) // cols, cols, figsize=(4.25 * cols, 3.75 * ((len(compared) + cols - 1) // cols)), squeeze=False)
    for ax in axes.ravel()[len(compared):]:
        ax.set_visible(False)
    csv_rows = []
    for ax, (key, label) in zip(axes.ravel(), compared):
        values = {m: np.array([float(r[key]) for r in rows if r[by] == m]) for m in models}
        every = np.concatenate(list(values.values()))
        every = every[np.isfinite(every)]
        log = key in NON_NEGATIVE and len(every) and every.min() > 0 and every.max() / every.min() > 10
        lo, hi = (every.min() / 1.5, every.max() * 1.5) if log else robust_limits(every) if len(every) else (0, 1)
        for i, m in enumerate(models):
            v = values[m]
            jitter = np.linspace(-0.12, 0.12, len(v)) if len(v) > 1 else np.zeros(len(v))
            inside = (v >= lo) & (v <= hi)
            ax.scatter((i + jitter)[inside], v[inside], color=_color(shown[i], i), s=14, alpha=0.7)
            for side, beyond, edge, extreme in (("above", v > hi, hi, np.max), ("below", v < lo, lo, np.min)):
                if beyond.any():
                    ax.scatter((i + jitter)[beyond], np.full(beyond.sum(), edge), marker="^" if side == "above" else "v",
                               color=_color(shown[i], i), s=30)
                    text = f"{extreme(v[beyond]):.3g}" if beyond.sum() == 1 else \
                        f"{beyond.sum()} {side}, {'max' if side == 'above' else 'min'} {extreme(v[beyond]):.3g}"
                    ax.annotate(text, (i, edge), fontsize=7, ha="center", xytext=(0, -9 if side == "above" else 4),
                                textcoords="offset points")
            iv = t_interval(v)
            if iv.n > 1:
                low = max(iv.low, 0.0) if key in NON_NEGATIVE else iv.low
                ax.errorbar(i + 0.3, iv.mean, yerr=[[iv.mean - low], [iv.high - iv.mean]], fmt="o", color="k",
                            capsize=3)
            csv_rows += [{"metric": key, "model": m, "seed": s, "value": x} for s, x in enumerate(v)]
        if key == "test_log_likelihood" and "test_log_likelihood" in truth:
            ax.axhline(truth["test_log_likelihood"], color="k", ls="--", lw=1, label="truth")
            ax.legend(fontsize=8)
        if key == "std_ratio":
            ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_yscale("log" if log else "linear")
        ax.set_ylim(lo, hi)
        ax.set_xticks(range(len(models)), shown, rotation=20 if max(map(len, shown)) < 16 else 35, fontsize=8,
                      ha="right")
        ax.set_title(label, fontsize=9)
    fig.suptitle("per seed (dots; triangles: outside the axis, value beside) and mean with 95% t interval (black); "
                 "diverged and flagged runs excluded", fontsize=10)
    fig.tight_layout()
    write_csv(out / "figures" / "comparison.csv", csv_rows, ["metric", "model", "seed", "value"])
    _save(fig, path, inputs)
    return path


def _read_truth_if_any(out: Path) -> dict:
    """truth.json of a paper study (the true log-likelihood's line), or {} elsewhere."""
    from .paper import read_truth
    return read_truth(out) if (out / "truth.json").exists() else {}


def _color(name: str, i: int) -> str:
    """A model's color: the presets' own, else the i-th of tab10 (neighbours differ in hue)."""
    return COLORS.get(name, plt.get_cmap("tab10")(i % 10))


def training_figure(out: Path, runs: dict[str, Path]) -> None:
    """Validation ELBO per epoch of each run (history.jsonl): mean over seeds, band min..max;
    the true validation log-likelihood where it is known (truth.json)."""
    from ..runs.run import read_history
    truth = _read_truth_if_any(out)
    inputs = inputs_digest("training", repr(truth), *(part for m, run in runs.items()
                                                       for part in (m, read_bytes(run / "history.jsonl"))))
    if already_drawn(out / "figures" / "training.png", inputs):
        return
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    csv_rows = []
    for i, (m, run) in enumerate(runs.items()):
        hist = read_history(run / "history.jsonl")
        epochs = [h["epoch"] for h in hist]
        v = np.array([[np.nan if x is None else x for x in h["val_elbo"]] for h in hist], dtype=float)  # [E, R]
        mean = np.nanmean(v, 1)
        for a in ax:
            a.plot(epochs, mean, color=_color(m, i), label=m)
            a.fill_between(epochs, np.nanmin(v, 1), np.nanmax(v, 1), color=_color(m, i), alpha=0.2)
        csv_rows += [{"model": m, "epoch": e, "mean_val_elbo": mu, "min": lo, "max": hi}
                     for e, mu, lo, hi in zip(epochs, mean, np.nanmin(v, 1), np.nanmax(v, 1))]
    for a in ax:
        if "val_log_likelihood" in truth:
            a.axhline(truth["val_log_likelihood"], color="k", ls="--", lw=1, label="true log p*(y), val")
        a.set(xlabel="epoch", ylabel="validation ELBO (nats / point)")
    ax[0].set_title("validation ELBO: mean over seeds, band = min..max")
    ax[0].legend(fontsize=8 if len(runs) <= 8 else 6, ncol=1 if len(runs) <= 8 else 2)
    last = len(epochs) // 2
    if epochs[-1] > epochs[last]:  # a one- or two-epoch run has no second half to zoom into
        ax[1].set_xlim(epochs[last], epochs[-1])
    # the whole band (min..max over seeds) stays in view, not only the mean
    late = [r for r in csv_rows if r["epoch"] >= epochs[last]]
    low = min(r["min"] for r in late if np.isfinite(r["min"]))
    high = max([truth.get("val_log_likelihood", -np.inf), *(r["max"] for r in late if np.isfinite(r["max"]))])
    ax[1].set_ylim(low - 0.01, high + 0.01)
    ax[1].set_title("second half of training (plateau check)")
    fig.tight_layout()
    write_csv(out / "figures" / "training.csv", csv_rows, ["model", "epoch", "mean_val_elbo", "min", "max"])
    _save(fig, out / "figures" / "training.png", inputs)


def sample_figure(out: Path, model: str, run: Path) -> Path:
    """Data with D > 1: generated points (seed 0) against the test points, per coordinate (the
    first six: histograms, each of unit area on its bins) and per pair of the first four (scatter).
    Axes span the test points' 0.5-99.5% range, padded, so no outlier sets them."""
    path = out / "figures" / f"{model}-samples.png"
    inputs = inputs_digest("samples", model, read_bytes(run / "curves.npz"))
    if already_drawn(path, inputs):
        return path
    c = read_npz(run / "curves.npz")
    gen, test = c["generated"][0].astype(float), c["test_points"].astype(float)
    D = test.shape[1]
    pairs = [(i, j) for i in range(min(D, 4)) for j in range(i + 1, min(D, 4))]
    cols = max(D, len(pairs), 2)
    fig, ax = plt.subplots(2, cols, figsize=(3.1 * cols, 6.2), squeeze=False)
    color = COLORS.get(model, "tab:blue")
    lo, hi = np.percentile(test, [0.5, 99.5], axis=0)
    lo, hi = lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo)
    rows = []
    for k in range(D):
        edges = np.linspace(lo[k], hi[k], 41)
        ax[0, k].hist(test[:, k], edges, density=True, histtype="step", color="k", label="test data")
        ax[0, k].hist(gen[:, k], edges, density=True, color=color, alpha=0.45, label="generated")
        ax[0, k].set(xlabel=f"y{k + 1}", ylabel="density" if k == 0 else None, title=f"coordinate y{k + 1}")
    ax[0, 0].legend(fontsize=7)
    for p, (i, j) in enumerate(pairs):
        ax[1, p].scatter(test[:, i], test[:, j], s=2, color="k", alpha=0.25, label="test data")
        ax[1, p].scatter(gen[:, i], gen[:, j], s=2, color=color, alpha=0.25, label="generated")
        ax[1, p].set(xlim=(lo[i], hi[i]), ylim=(lo[j], hi[j]), xlabel=f"y{i + 1}", ylabel=f"y{j + 1}")
    for a in [*ax[0, D:], *ax[1, len(pairs):]]:
        a.set_visible(False)
    ax[1, 0].legend(fontsize=7, markerscale=4)
    fig.suptitle(f"{model}: {len(gen):,} generated points (seed 0) against {len(test):,} test points"
                 + (f", first {D} of {int(c['data_dim'])} coordinates" if D < int(c["data_dim"]) else ""), fontsize=10)
    fig.tight_layout()
    for which, points in (("generated", gen), ("test", test)):
        rows += [{"points": which, "index": n, **{f"y{k + 1}": v for k, v in enumerate(point)}}
                 for n, point in enumerate(points)]
    write_csv(path.with_suffix(".csv"), rows, ["points", "index", *(f"y{k + 1}" for k in range(D))])
    _save(fig, path, inputs)
    return path


def has_sample_points(run: Path) -> bool:
    """The sample figure draws data with D > 1 (estimators.evaluate._sample_curves)."""
    return (run / "curves.npz").exists() and "generated" in read_npz(run / "curves.npz")


def has_latent_curves(run: Path) -> bool:
    """The model figure draws z: it exists for 1-D latents (see estimators.evaluate._latent_curves)."""
    if not (run / "curves.npz").exists():
        return False
    return "decoder" in read_npz(run / "curves.npz")


def run_figures(out: Path, name: str, run: Path) -> tuple[Path | None, Path | None]:
    """One run's own figures in out/figures/, `name` naming it: its model figure (1-D latents) and, for
    data with D > 1, its generated points against the test points (None where the run has none). Each
    is drawn once: a sweep's workers draw them as each run finishes (report.sweep.figure_drawers), and
    the report keeps those."""
    return (model_figure(out, name, run) if has_latent_curves(run) else None,
            sample_figure(out, name, run) if has_sample_points(run) else None)


def sweep_figures(out: Path, runs: dict[str, Path]) -> list[Path]:
    """A sweep's figures: training curves of every run, then each run's own (run_figures): model
    figures first, then sample figures."""
    training_figure(out, runs)
    own = [run_figures(out, name, run) for name, run in runs.items()]
    return [out / "figures" / "training.png", *(m for m, _ in own if m), *(s for _, s in own if s)]
