"""The notebook API (runs/results.py): mogvae.train, mogvae.load, Run and Sweep, each checked
against an independent reference: the files read with the csv module, numerical integration
over y, the estimators' bounds, and the folder's bytes."""
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.integrate import trapezoid

import mogvae
from mogvae.runs.results import LoadError, UnknownRun
from mogvae.runs.run import RunError

TOY = {"preset": "mog-prior", "seeds": 2,
       "model": {"hidden": [8], "n_components": 3},
       "data": {"n_train": 200, "n_val": 50, "n_test": 60},
       "train": {"epochs": 3},
       "eval": {"grid_size": 401, "n_generated": 200, "gap_points": 0}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One toy run trained through mogvae.train (a dict configuration with a --set override)."""
    out = tmp_path_factory.mktemp("api") / "run"
    lines = []
    run = mogvae.train(TOY, out, overrides=["train.epochs=4"], log=lines.append)
    return run, out, lines


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def same(text: str, value) -> bool:
    """A csv cell against a DataFrame value: NaN for "" and "nan", booleans, numbers, text."""
    if text in ("", "nan"):
        return isinstance(value, float) and math.isnan(value)
    if text in ("True", "False"):
        return bool(value) == (text == "True")
    try:
        return float(text) == float(value)
    except ValueError:
        return text == str(value)


def snapshot(folder: Path) -> dict:
    """Every entry below folder with its bytes and modification time."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def test_train_returns_the_run_and_its_metrics_are_metrics_csv(trained):
    run, out, lines = trained
    assert isinstance(run, mogvae.Run) and run.path == out
    assert run.config.train.epochs == 4 and run.config.preset == "mog-prior"   # the override applied
    assert run.replicas == 2 and run.complete
    rows = csv_rows(out / "metrics.csv")
    frame = run.metrics
    columns = list(rows[0])           # metrics.csv's, with the derived seed beside the replica index
    assert list(frame.columns) == [*columns[:columns.index("seed") + 1], "replica_seed",
                                   *columns[columns.index("seed") + 1:]] and len(frame) == len(rows) == 2
    from mogvae.model.layers import replica_seed
    assert list(frame["replica_seed"]) == [replica_seed(run.config.base_seed, i) for i in (0, 1)]
    for i, row in enumerate(rows):
        for column, text in row.items():
            assert same(text, frame[column].iloc[i]), (column, text, frame[column].iloc[i])
    assert any("done" in line for line in lines)


def test_log_prob_of_the_test_split_is_the_evaluated_test_log_likelihood(trained):
    run, out, _ = trained
    y = run.data("test")
    assert np.array_equal(y, np.load(out / "data" / "test.npy"))
    for r, row in enumerate(csv_rows(out / "metrics.csv")):
        log_p, elbo = run.log_prob(y, replica=r), run.elbo(y, replica=r)
        assert log_p.shape == elbo.shape == (len(y),)
        assert abs(log_p.mean() - float(row["test_log_likelihood"])) < 1e-9
        assert abs(elbo.mean() - float(row["test_elbo"])) < 1e-6        # the ELBO's stride follows the replicas
        # the ELBO bounds log p at every point, up to the two rules' reported error bounds
        slack = float(row["quadrature_error"]) + float(row["elbo_quadrature_error"])
        assert np.all(elbo <= log_p + slack)
    # the same points as a torch tensor, or as [N, 1], give the same numbers
    assert np.array_equal(run.log_prob(torch.as_tensor(y), 1), run.log_prob(y[:, None], 1))


def test_the_density_integrates_to_one_and_the_sampler_draws_from_it(trained):
    run, _, _ = trained
    draws = run.sample(20_000, replica=1, seed=3)                         # [n, 1]
    assert draws.shape == (20_000, 1)
    assert np.array_equal(draws, run.sample(20_000, replica=1, seed=3))
    assert not np.array_equal(draws, run.sample(20_000, replica=1, seed=4))
    grid = np.linspace(draws.min() - 1.0, draws.max() + 1.0, 4001)      # [G]: the mass and its tails
    density = np.exp(run.log_prob(grid, replica=1))
    assert abs(trapezoid(density, grid) - 1.0) < 1e-3
    mean, sd = trapezoid(grid * density, grid), draws.std()
    assert abs(draws.mean() - mean) < 4 * sd / math.sqrt(len(draws))
    # Kolmogorov-Smirnov: the draws' empirical CDF against the density's (1% level: 1.63 / sqrt(n))
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    x = np.sort(draws[:, 0])
    empirical = np.arange(1, len(x) + 1) / len(x)
    assert np.max(np.abs(np.interp(x, grid, cdf) - empirical)) < 1.63 / math.sqrt(len(x))


def test_a_replica_model_is_that_replica_of_the_checkpoint(trained):
    from mogvae.runs.run import trained_model
    run, out, _ = trained
    full, _, _ = trained_model(out)
    z = torch.linspace(-3, 3, 7, dtype=torch.float64)[None, :, None, None]   # [1, S, B, D]
    for r in range(run.replicas):
        one = run.model(replica=r)
        assert not one.training and one.decoder.shape[0] == 1
        assert torch.equal(one.decoder.mean(z)[0], full.decoder.mean(z.expand(2, -1, -1, -1))[r])


def test_training_a_finished_run_again_changes_nothing(trained):
    run, out, _ = trained
    before, lines = snapshot(out), []
    again = mogvae.train(TOY, out, overrides=["train.epochs=4"], log=lines.append)
    assert snapshot(out) == before
    assert lines == [f"{out}: run complete (4 epochs); results in {out / 'metrics.csv'}"]
    assert again.metrics.equals(run.metrics)
    with pytest.raises(RunError, match="different configuration.*train.epochs") as refused:
        mogvae.train(TOY, out, log=lines.append)                           # 3 epochs: another run
    # the refused session let go of the folder's lock, even while its error is kept (as a notebook
    # keeps its last traceback): this process may open the folder again
    assert mogvae.train(TOY, out, overrides=["train.epochs=4"], log=lines.append).complete
    assert refused.value.__traceback__ is not None
    assert snapshot(out) == before


def test_loading_reads_only_and_bad_arguments_are_one_line_errors(trained, tmp_path):
    run, out, _ = trained
    before = snapshot(out)
    loaded = mogvae.load(out)
    assert isinstance(loaded, mogvae.Run) and loaded.metrics.equals(run.metrics)
    loaded.log_prob(loaded.data("val"), replica=1)
    loaded.sample(10)
    assert snapshot(out) == before
    with pytest.raises(IndexError, match="2 replicas"):
        loaded.model(replica=2)
    with pytest.raises(IndexError, match="2 replicas"):
        loaded.log_prob([0.5], replica=-1)
    with pytest.raises(ValueError, match="train, val, test"):
        loaded.data("tst")
    with pytest.raises(ValueError, match="D = 1"):
        loaded.log_prob(np.zeros((3, 2)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a folder of a user's")
    (tmp_path / "file").write_text("")
    for path, what in [("empty", "neither a run folder"), ("mine", "neither a run folder"),
                       ("missing", "no such folder"), ("file", "not a folder")]:
        with pytest.raises(LoadError, match=what) as e:
            mogvae.load(tmp_path / path)
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_an_unfinished_run_says_how_to_finish_and_train_finishes_it(tmp_path):
    class Stop(Exception):
        pass

    def stop_at_epoch_2(line: str):
        if line.startswith("epoch 2 of"):
            raise Stop
    out = tmp_path / "run"
    config = {**TOY, "seeds": 1, "train": {"epochs": 4}}
    with pytest.raises(Stop):
        mogvae.train(config, out, log=stop_at_epoch_2)       # stopped after epoch 2's checkpoint
    run = mogvae.load(out)
    assert not run.complete and run.replicas == 1
    with pytest.raises(LoadError, match=r"unfinished \(trained 2 of 4 epochs.*mogvae train") as e:
        _ = run.metrics
    assert "\n" not in str(e.value)
    finished = mogvae.train(run.config, out, log=lambda line: None)   # the same process: its lock was released
    assert finished.complete and len(finished.metrics) == 1


SPEC = """
seeds = 2
[model]
hidden = [8]
n_components = 3
[data]
n_train = 200
n_val = 50
n_test = 60
[train]
epochs = 2
[eval]
grid_size = 401
n_generated = 200
gap_points = 0
[grid]
preset = ["mfg", "mog-prior"]
"""


def make_sweep(spec: Path, out: Path) -> None:
    """What `mogvae sweep SPEC --out OUT --workers 1` does up to its metrics.csv (the report,
    figures only, is left out): expand, bind, train every cell in this process, gather."""
    from mogvae.runs.sweep import SweepDir, execute, load_spec, versions
    base, grid, cells = load_spec(spec, [])
    folder = SweepDir(out)
    folder.bind({**base, "grid": grid}, cells, versions(), title=f"mogvae sweep: {spec.name}")
    execute(folder, cells, workers=1)
    folder._lock.close()


def test_a_sweep_folder_loads_as_runs_that_agree_with_its_metrics(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC)
    out = tmp_path / "sweep"
    make_sweep(tmp_path / "spec.toml", out)
    before = snapshot(out)
    sweep = mogvae.load(out)
    assert isinstance(sweep, mogvae.Sweep) and sweep.path == out
    rows = csv_rows(out / "metrics.csv")
    frame = sweep.metrics
    assert list(frame.drop(columns="replica_seed").columns) == list(rows[0]) and len(frame) == len(rows) == 4
    assert list(sweep.runs) == ["preset=mfg", "preset=mog-prior"]
    for name, run in sweep.runs.items():
        assert run.path == out / "runs" / name
        own = run.metrics
        mine = [row for row in rows if row["run"] == name]
        assert len(mine) == len(own) == 2
        assert list(own["replica_seed"]) == list(frame[frame["run"] == name]["replica_seed"])
        for i, row in enumerate(mine):
            for column in own.columns.drop("replica_seed"):
                assert same(row[column], own[column].iloc[i]), (name, column)
    # a preset's name finds its cell; an unknown name lists the runs
    assert sweep.run("mog-prior").path == sweep.run("preset=mog-prior").path
    with pytest.raises(UnknownRun, match="preset=mfg, preset=mog-prior"):
        sweep.run("mog-both")
    y = sweep.run("mfg").data("test")
    assert abs(sweep.run("mfg").log_prob(y, replica=1).mean()
               - float(next(r for r in rows if r["run"] == "preset=mfg" and r["seed"] == "1")["test_log_likelihood"])) < 1e-9
    assert snapshot(out) == before
    # one damaged run does not make its neighbours unreadable by name
    (out / "runs" / "preset=mog-prior" / "config.json").write_text('{"seeds": "many"}')
    assert sweep.run("mfg").metrics.shape[0] == 2
