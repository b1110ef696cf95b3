"""The richer families (VampPrior), the sweep's [[grid.also]] cells, and the
families study end to end at toy size."""
import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.integrate import trapezoid

from mogvae.cli import main
from mogvae.config.schema import ModelConfig
from mogvae.model.vae import build_model
from mogvae.model.layers import initialize
from mogvae.runs.sweep import SpecError, expand


@pytest.mark.parametrize("posterior", ["gaussian", "mog"])
def test_the_vamp_prior_is_the_encoder_at_its_pseudo_inputs_and_integrates_to_one(posterior):
    config = ModelConfig(prior="vamp", posterior=posterior, n_components=4, hidden=(8,))
    model = build_model(config, replicas=2).double()
    initialize(model, [1, 2])
    z = torch.linspace(-12, 12, 40001, dtype=torch.float64)
    density = torch.exp(model.prior().log_prob(z.reshape(1, -1, 1, 1).expand(2, -1, -1, -1)))[:, :, 0]
    q = model.posterior(model.prior.pseudo_inputs)                     # each replica's encoder at its own u: [2, 1, M]
    for r in range(2):
        w = torch.softmax(q.logits[r, 0], -1).detach().numpy()                           # [M, K]
        loc, scale = q.loc[r, 0, ..., 0].detach().numpy(), q.scale[r, 0, ..., 0].detach().numpy()
        ref = (w[..., None] * stats.norm.pdf(z.numpy()[None, None], loc[..., None], scale[..., None])).sum((0, 1))
        np.testing.assert_allclose(density[r].detach().numpy(), ref / w.shape[0], rtol=1e-10, atol=1e-300)
        assert trapezoid(density[r].detach().numpy(), z.numpy()) == pytest.approx(1.0, abs=1e-8)


def test_the_vamp_prior_shares_the_encoder_without_a_second_copy():
    model = build_model(ModelConfig(prior="vamp", posterior="gaussian", hidden=(8,)), replicas=1)
    initialize(model, [3])
    names = list(model.state_dict())
    assert "prior.pseudo_inputs" in names and not any(n.startswith("prior._encoder") for n in names)
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))
    loss = model.prior().log_prob(torch.zeros(1, 1, 1, 1)).sum()
    loss.backward()                      # the prior's density reaches the encoder's weights
    assert model.posterior.encoder.net[0].weight.grad.abs().sum() > 0


BASE = {"seeds": 1, "train": {"epochs": 1}}


def test_also_tables_add_cells_beside_the_product():
    grid = {"data.sigma": [0.1, 0.05], "preset": ["mfg", "mog-prior"],
            "also": [{"model.prior": ["normal", "mog"], "train.objective": ["exact"]}]}
    cells = expand(BASE, grid)
    assert len(cells) == 6
    assert [c.name for c in cells[4:]] == ["model.prior=normal__train.objective=exact",
                                           "model.prior=mog__train.objective=exact"]
    assert [c.model for c in cells[4:]] == ["normal+gaussian/exact", "mog+gaussian/exact"]
    assert "also" in grid                                            # the caller's spec is not changed


@pytest.mark.parametrize("also,needle", [
    ([{"model.prior": "mog"}], "grid.also[1].model.prior"),
    ([{"nope": [1]}], "grid.also[1].nope"),
    ("x", "grid.also"),
    ([{"preset": ["mfg"]}], "same configuration"),
])
def test_bad_also_tables_are_one_line(also, needle):
    with pytest.raises(SpecError, match=None) as e:
        expand(BASE, {"preset": ["mfg"], "also": also})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_families_study_runs_at_toy_size_and_decomposes_exactly(tmp_path, capsys):
    out = tmp_path / "families"
    assert main(["study", "families", "--quick", "--seeds", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "## Where each family's shortfall comes from" in report and "![families](figures/families.png)" in report
    assert "## Importance sampling against quadrature" in report and "![importance](figures/importance.png)" in report
    sampled = list(csv.DictReader((out / "figures" / "importance.csv").open()))
    assert len(sampled) == 9 * 4 and all(math.isfinite(float(r["bias"])) for r in sampled)
    rows = list(csv.DictReader((out / "figures" / "decomposition.csv").open()))
    assert len(rows) == 3 * 3 * 2                      # prior x posterior x seed (--quick: sigma = 0.03 alone)
    metrics = {(r["run"], r["seed"]): r for r in csv.DictReader((out / "metrics.csv").open())}
    for r in rows:
        terms = [float(r[k]) for k in ("misspecification", "over_regularization", "approximation_gap",
                                       "amortization_gap")]
        assert sum(terms) == pytest.approx(float(r["total"]), abs=1e-12)
        run = f"data.sigma={float(r['sigma']):g}__model.prior={r['prior']}__model.posterior={r['posterior']}"
        vae = metrics[(run, r["seed"])]
        assert float(r["total"]) == float(vae["gap_true_log_likelihood"]) - float(vae["gap_elbo"])
        assert float(r["amortization_gap"]) >= 0 and math.isfinite(float(r["misspecification"]))


def test_a_vampprior_with_more_pseudo_inputs_than_training_points_is_refused(tmp_path, capsys):
    from mogvae.cli import main
    config = tmp_path / "vamp.toml"
    config.write_text('seeds = 1\n[model]\nprior = "vamp"\nn_components = 20\n[data]\nn_train = 10\n')
    assert main(["train", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.n_components = 20" in err[0] and "data.n_train = 10" in err[0]
    assert not (tmp_path / "out").exists()


SMALL_SWEEP = """
seeds = 2
[model]
hidden = [8]
[data]
n_train = 200
n_val = 50
n_test = 100
[train]
epochs = 2
[eval]
grid_size = 201
n_generated = 200
gap_points = 0
[grid]
"model.posterior" = ["gaussian", "mog"]
"""


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """(spec, folder) of SMALL_SWEEP swept once; each test works on a copy."""
    tmp = tmp_path_factory.mktemp("small")
    (tmp / "spec.toml").write_text(SMALL_SWEEP)
    assert main(["sweep", str(tmp / "spec.toml"), "--out", str(tmp / "sweep"), "--workers", "1"]) == 0
    return tmp / "spec.toml", tmp / "sweep"


def test_the_importance_check_is_computed_once_per_run_and_recomputed_only_when_its_source_changes(small_sweep,
                                                                                                   tmp_path,
                                                                                                   monkeypatch):
    """figures/importance/<run>.json saves a run's rows with what they came from: a second report reads them;
    other K, a retrained run (its metrics.csv changes) or a damaged file make that run's compute again, the
    same numbers, and no other run's."""
    from mogvae.estimators import likelihood
    from mogvae.studies import importance
    out = tmp_path / "sweep"
    shutil.copytree(small_sweep[1], out)
    assert not (out / "figures" / importance.SAVED).exists()          # a plain sweep's workers compute none
    calls = []
    real = likelihood.log_likelihood
    monkeypatch.setattr(likelihood, "log_likelihood", lambda *a, **k: calls.append(1) or real(*a, **k))
    said, taken = [], []
    real_draws = likelihood._draws
    with monkeypatch.context() as m:                                    # the draws the sampler really takes
        m.setattr(likelihood, "_draws", lambda model, y, n, K, *a: taken.append(n * K) or real_draws(model, y, n, K, *a))
        first = importance.importance_rows(out, (1, 10), 20, log=said.append)
    assert len(first) == 2 * 2 and len(calls) == 2 * (1 + 2)            # per run: quadrature, then each K
    assert [r["draws"] for r in first] == taken and taken[0] > 1        # K = 1 takes two per stratum
    assert len(said) == 2 and said[1].endswith("model.posterior=mog (K up to 10, 20 test points), run 2 of 2")
    runs = importance._sampled_runs(out)
    direct = [row for name, run in runs.items() for row in importance._compute(name, run, (1, 10), 20)]
    assert first == json.loads(json.dumps(direct))                      # what was saved is what is computed
    calls.clear()
    assert importance.importance_rows(out, (1, 10), 20, log=said.append) == first and calls == []   # read, not
    assert len(said) == 2                                                                           # sampled
    assert len(importance.importance_rows(out, (1, 10, 100), 20)) == 2 * 3 and calls  # other K: computed
    calls.clear()
    assert importance.importance_rows(out, (1, 10), 20) == first and calls           # computed again, same rows
    saved_path = out / "figures" / importance.SAVED / "model.posterior=mog.json"
    saved = json.loads(saved_path.read_text())
    mine = [r for r in first if r["run"] == "model.posterior=mog"]
    for text in ('{"ks": [1, 10], "points": 20, "rows": "damaged"', *(json.dumps({**saved, "rows": rows}) for rows in
                 ([{**mine[0], "run": "elsewhere"}, *mine[1:]], [*mine, mine[0]], mine[:1]))):
        saved_path.write_text(text)                                     # damaged, or the source matches and
        calls.clear()                                                   # the rows do not
        assert importance.importance_rows(out, (1, 10), 20) == first and len(calls) == 1 + 2   # that run alone
    calls.clear()
    metrics = out / "runs" / "model.posterior=mog" / "metrics.csv"
    metrics.write_text(metrics.read_text() + "\n")                      # a rewritten run: another digest
    assert importance.importance_rows(out, (1, 10), 20) == first and len(calls) == 1 + 2


def test_the_studys_workers_compute_each_runs_importance_rows_and_its_report_samples_nothing(small_sweep, tmp_path,
                                                                                             monkeypatch):
    """Issue 20, evaluate once: the families study's workers compute each VAE run's importance rows as it
    finishes (Study.after_run, beside the other runs); its report reads them, drawing no sample, and
    they are what the report would compute."""
    from mogvae.cli import _drawers
    from mogvae.runs.sweep import load_spec
    from mogvae.studies import importance
    spec, out = small_sweep[0], tmp_path / "sweep"
    shutil.copytree(small_sweep[1], out)
    cells = load_spec(spec, [])[2]
    args = type("Args", (), {"out": out, "no_report": False, "quick": True})()
    after = _drawers(args, cells, "families")
    for name, run in importance._sampled_runs(out).items():
        after[name](str(run))                                         # what a worker does as the run finishes
    ks, points = importance.sizes(True)
    saved = sorted((out / "figures" / importance.SAVED).glob("*.json"))
    assert [p.stem for p in saved] == ["model.posterior=gaussian", "model.posterior=mog"]
    from mogvae.estimators import likelihood
    with monkeypatch.context() as m:
        m.setattr(likelihood, "log_likelihood", lambda *a, **k: pytest.fail("the report sampled again"))
        rows = importance.importance_rows(out, ks, points)
    assert len(rows) == 2 * len(ks) and {r["k"] for r in rows} == set(ks)
    # computed by the report instead, in a process of more threads: on one, as a worker's (sums over threads
    # round otherwise: 1e-9 nats apart on a quick VampPrior of flows), and the same rows
    saved[0].unlink()
    threads, seen = torch.get_num_threads(), []
    real = importance._compute
    monkeypatch.setattr(importance, "_compute", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    torch.set_num_threads(2)
    try:
        assert importance.importance_rows(out, ks, points) == rows and seen == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    # a link in place of figures/importance (to write there would write elsewhere): refused, nothing written
    from mogvae.storage.folders import OutputError
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(out / "figures" / importance.SAVED)
    (out / "figures" / importance.SAVED).symlink_to(elsewhere)
    with pytest.raises(OutputError, match="figures/importance is a link or a file"):
        importance.importance_rows(out, ks, points)
    assert not any(elsewhere.iterdir())


def test_a_worker_stopped_while_it_draws_a_runs_figures_does_not_go_on_to_the_studys_work(monkeypatch):
    """A Ctrl-C or SIGTERM (KeyboardInterrupt) in a worker's drawing stops it there: the study's per-run work
    (minutes of importance sampling) is left to the report or the re-run; a figure that merely failed is not
    a reason to skip that work."""
    from mogvae.report import figures, sweep
    done = []
    for fault, reached in ((KeyboardInterrupt, False), (ValueError, True)):
        done.clear()
        monkeypatch.setattr(figures, "run_figures", lambda *a: (_ for _ in ()).throw(fault("stop")))
        try:
            sweep._draw_run_figures("/nowhere", "name", lambda run: done.append(run), "/nowhere/runs/name")
        except KeyboardInterrupt:
            pass
        assert done == (["/nowhere/runs/name"] if reached else [])


def test_an_importance_estimate_that_fails_its_own_check_is_marked_where_it_is_read():
    """Issue 22: a bias of 9.6 nats with 57% of points beyond 3 SE was printed as a plain number."""
    from mogvae.studies.importance import fails_check, reading
    good = {"run": "a", "model": "mfg", "sigma": 0.1, "k": 1000, "bias": 1e-4, "bias_stderr": 1e-4,
            "mean_stderr": 1e-3, "beyond_3se": 0.005}
    bad = {**good, "run": "b", "bias": 9.6, "bias_stderr": 0.4, "beyond_3se": 0.57}
    shaky = {**good, "run": "c", "beyond_3se": 0.08}                  # unbiased on average, its SEs too small
    assert [fails_check(r) for r in (good, bad, shaky)] == [False, True, True]
    text = "\n".join(reading([good, bad, shaky]))
    assert "Fails its own check at K = 1000:** 2 of 3" in text and "- b: bias 9.6" in text and "- c:" in text
    assert "Fails" not in "\n".join(reading([good]))
