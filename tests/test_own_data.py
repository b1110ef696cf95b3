"""A researcher's own data, as issue 22's case: a 2-D CSV, mfg against a mixture posterior,
from examples/own-data.toml with nothing else set. Defaults that follow the data (learned
noise, fractions, a 2-D grid that fits), progress through evaluation, a report without empty
columns that leads with its verdict and draws generated points against the data, and a
command that ends by saying where the report is."""
import json
import pydoc
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mogvae.cli import main
from mogvae.runs.run import RunConfig
from mogvae.storage.files import read_csv

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own-data.toml"
TOY = ["seeds=2", "train.epochs=2", "model.hidden=[8]", "eval.gap_points=5", "eval.gap_steps=5",
       "eval.grid_size=401", "eval.n_generated=300"]


def ring(path: Path, n: int = 400) -> Path:
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, n)
    points = np.stack([np.cos(angle), np.sin(angle)], 1) + 0.1 * rng.standard_normal((n, 2))
    np.savetxt(path, (points - points.mean(0)) / points.std(0), delimiter=",")
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The example, copied beside its data, run at toy size through the command line."""
    folder = tmp_path_factory.mktemp("own")
    ring(folder / "ring.csv")
    shutil.copy(EXAMPLE, folder / "own-data.toml")
    import io
    from contextlib import redirect_stderr
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["sweep", str(folder / "own-data.toml"), "--out", str(folder / "out"), "--workers", "1",
                     *(a for s in TOY for a in ("--set", s))])
    return code, folder / "out", err.getvalue()


def test_the_example_runs_with_nothing_set_but_the_path(study):
    code, out, _ = study
    assert code == 0
    for name in ("preset=mfg", "preset=mog-posterior"):
        saved = json.loads((out / "runs" / name / "config.json").read_text())
        assert saved["model"]["learn_decoder_noise"] is True          # a file's noise is unknown: learned
        assert saved["resolved_model"]["posterior"] == ("mog" if "posterior" in name else "gaussian")
        splits = {s: np.load(out / "runs" / name / "data" / f"{s}.npy") for s in ("train", "val", "test")}
        assert {s: len(v) for s, v in splits.items()} == {"train": 260, "val": 60, "test": 80}   # 65/15/20%


def test_evaluation_says_what_it_does_and_the_command_ends_with_the_verdict_and_report(study):
    code, out, err = study
    lines = err.splitlines()
    for phase in ("log p(y) and the ELBO by quadrature, 80 test points x 2 replicas",
                  "the best q of the family for each of 5 test points", "300 generated points x 2 replicas"):
        assert any(phase in line for line in lines), (phase, err[-3000:])
    assert any(re.search(r"evaluated in [0-9.]+ s", line) for line in lines)
    verdict = next(i for i, line in enumerate(lines) if line.startswith("Verdict:"))
    assert "highest mean test log-likelihood" in lines[verdict]
    assert lines[-1].startswith("done in ") and str(out / "report.html") in lines[-1]


def test_the_report_leads_with_the_verdict_and_has_no_empty_column(study):
    _, out, _ = study
    report = (out / "report.md").read_text()
    first_section = report.index("## ")
    assert report.index("**Verdict:**") < report.index("![comparison](figures/comparison.png)") < first_section
    tables = [line for line in report.splitlines() if line.startswith("|")]
    assert tables and not any(re.search(r"\bnan\b", line) for line in tables), tables
    for absent in ("KL to truth", "W1 exact", "W1 decoder"):     # no truth, D = 2
        assert absent not in report
    # the verdict's numbers are metrics.csv's
    rows = read_csv(out / "metrics.csv")
    means = {run: np.mean([float(r["test_log_likelihood"]) for r in rows if r["run"] == run])
             for run in {r["run"] for r in rows}}
    best = max(means, key=means.get)
    assert f"**Verdict:** {best} has the highest mean test log-likelihood ({means[best]:.4f} nats per point)" in report


def test_generated_points_are_drawn_against_the_test_points(study):
    _, out, _ = study
    for name in ("mfg", "mog-posterior"):            # a grid over the preset alone names figures by preset
        png = out / "figures" / f"{name}-samples.png"
        assert png.stat().st_size > 10_000 and f"![{name}-samples](figures/{name}-samples.png)" in \
            (out / "report.md").read_text()
        rows = read_csv(png.with_suffix(".csv"))
        test = np.array([[float(r["y1"]), float(r["y2"])] for r in rows if r["points"] == "test"])
        saved = np.load(out / "runs" / f"preset={name}" / "data" / "test.npy")
        assert np.allclose(test, saved[:len(test)], atol=1e-6) and len(test) == 80
        generated = np.array([[float(r["y1"]), float(r["y2"])] for r in rows if r["points"] == "generated"])
        assert generated.shape == (300, 2) and np.all(np.isfinite(generated))


@pytest.mark.parametrize("source, learned", [({}, False), ({"name": "folded", "data_dim": 2}, False),
                                             ({"name": "tabular", "dataset": "diabetes"}, True)])
def test_the_decoder_noise_is_learned_where_the_data_noise_is_unknown(source, learned):
    assert RunConfig(data=source).model.learn_decoder_noise is learned
    chosen = RunConfig(data=source, model={"learn_decoder_noise": not learned})
    assert chosen.model.learn_decoder_noise is (not learned)
    assert RunConfig(**chosen.model_dump()) == chosen              # config.json reads back as itself


def test_a_two_dimensional_latent_gets_a_grid_that_fits():
    assert RunConfig(model={"latent_dim": 2}).eval.grid_size == 401
    assert RunConfig(model={"latent_dim": 1}).eval.grid_size == 2001
    assert RunConfig(model={"latent_dim": 2}, eval={"grid_size": 301}).eval.grid_size == 301
    from mogvae.estimators.evaluate import check_evaluable
    config = RunConfig(model={"latent_dim": 2})
    check_evaluable(config.model, config.eval)                      # no longer refused


def test_help_of_the_package_fits_on_a_screen():
    import mogvae
    text = pydoc.render_doc(mogvae, renderer=pydoc.plaintext)
    assert len(text.splitlines()) <= 80 and "load(" in text and "train(" in text
    assert mogvae.Run and mogvae.preset and mogvae.build_model           # the rest still at hand


def test_a_long_phase_reports_its_progress_with_an_eta():
    from mogvae.estimators.evaluate import Phases
    lines = []
    phases = Phases(lines.append, every=0.0)
    phases.start("the gap search", "the best q of the family for each of 4 test points")
    phases.step(1, 4, "points")
    phases.step(4, 4, "points")                    # the end of a phase is the next phase's line, not a step
    phases.done()
    assert lines[0] == "evaluating: the best q of the family for each of 4 test points"
    assert re.fullmatch(r"evaluating: the gap search, 1/4 points, ETA [0-9]+ s", lines[1]), lines
    assert len(lines) == 3 and lines[2].startswith("evaluated in ")


def test_a_wide_table_is_split_into_tables_that_fit_each_keeping_its_key_columns():
    from mogvae.report.tables import MAX_CHARS, _cells, fit_tables
    head = ["sigma", "prior + posterior", *(f"measure {i}" for i in range(7))]
    rows = [[f"0.{k}", "vamp + flow", *(f"+{k}.12345 [-{i}.23456, +{i}.34567]" for i in range(7))] for k in range(3)]
    table = ["| " + " | ".join(r) + " |" for r in [head, ["---"] * 9, *rows]]
    table[1] = "|" + "---|" * 9
    out = fit_tables(["text", *table, "after"])
    assert out[0] == "text" and out[-1] == "after"
    tables, current = [], []
    for line in out[1:-1] + [""]:
        if line.startswith("|"):
            current.append(_cells(line))
        elif current:
            tables.append(current)
            current = []
    assert len(tables) > 1
    for t in tables:
        assert t[0][:2] == ["sigma", "prior + posterior"] and [r[:2] for r in t[2:]] == [r[:2] for r in rows]
        widths = [max(len(r[i]) for r in t) + 3 for i in range(len(t[0]))]
        assert sum(widths) <= MAX_CHARS
    assert [c for t in tables for c in t[0][2:]] == head[2:]            # every column once, in order
    assert fit_tables(["| a | b |", "|---|---|", "| 1 | 2 |"]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]


def test_a_command_ends_with_the_reports_verdict_lines_capped(tmp_path):
    """The lines a command prints after its table come from report.md: a plain sweep's verdict, a
    study's opening paragraph and the bullets and bold lines of its reading, at most LEAD_LINES."""
    from mogvae.report.sweep import LEAD_LINES, report_lead
    intro = "2 runs, 2 seed(s) each; every likelihood exact (quadrature), in nats per test point; mean ± sd over seeds."
    study = tmp_path / "study.md"
    study.write_text("\n".join(["# t", "", intro, "", "Data: the paper's process.", "", "## What the numbers say", "",
                                "Differences are paired.", "", *(f"- **claim {i}** decided" for i in range(14)),
                                "| a | b |", "|---|---|", "| 1 | 2 |", "## Per run", "", "- not a verdict"]))
    lines = report_lead(study)
    assert lines[0] == "Data: the paper's process." and lines[1] == "- claim 0 decided"
    assert len(lines) == LEAD_LINES + 1 and lines[-1] == "... and 5 more in study.md"
    plain = tmp_path / "plain.md"
    plain.write_text("\n".join(["# t", "", intro, "", "**Verdict:** b has the highest mean test log-likelihood.", "",
                                "![comparison](figures/comparison.png)", "", "## Per run"]))
    assert report_lead(plain) == ["Verdict: b has the highest mean test log-likelihood."]
