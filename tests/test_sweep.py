"""`mogvae sweep`: grids expanded and named, bad specs refused in one line, runs
resumed and skipped, the driver killed at chosen points, a Dask cluster with a
worker killed mid-run: the same numbers every way."""
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mogvae.cli import main
from mogvae.runs.sweep import SpecError, SweepDir, cell_name, expand

SPEC = """
seeds = 2
[model]
hidden = [8]
n_components = 3
[data]
n_train = 300
n_val = 50
n_test = 100
[train]
epochs = 4
[eval]
grid_size = 401
n_generated = 200
gap_points = 5            # the search's work is not what these tests check
gap_steps = 50
[grid]
preset = ["mfg", "mog-both"]
"data.sigma" = [0.1, 0.2]
"""


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC)
    return path


def rows_but_wall_time(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k != "train_seconds"} for row in csv.DictReader(fh)]


def sweep_cmd(spec, out, *extra):
    return [sys.executable, "-m", "mogvae.cli", "sweep", str(spec), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted sweep, local worker processes, driven from this process (its fork server
    serves the in-process resumes below too)."""
    tmp = tmp_path_factory.mktemp("ref")
    (tmp / "spec.toml").write_text(SPEC)
    assert main(["sweep", str(tmp / "spec.toml"), "--out", str(tmp / "out")]) == 0
    return tmp / "out"


def test_the_grid_is_a_cartesian_product_with_stable_readable_names(reference):
    rows = list(csv.DictReader(open(reference / "metrics.csv")))
    assert list(rows[0])[:5] == ["preset", "data.sigma", "run", "model", "seed"]
    runs = sorted({r["run"] for r in rows})
    assert runs == sorted(f"preset={p}__data.sigma={s}" for p in ("mfg", "mog-both") for s in ("0.1", "0.2"))
    assert len(rows) == 4 * 2                                            # seeds per cell
    for r in rows:                                                        # each cell trained its own sigma
        assert Path(reference / "runs" / r["run"] / "config.json").read_text().count(f'"sigma": {r["data.sigma"]}')
    assert cell_name({"preset": "mfg", "model.hidden": [64, 64]}) == "preset=mfg__model.hidden=64-64"
    assert (reference / "report.html").read_text().count("data:image/png;base64,") >= 5


def test_a_rerun_skips_finished_runs_and_touches_nothing(reference, spec, capsys, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (reference / "runs").rglob("*") if p.is_file()}
    assert main(["sweep", str(spec), "--out", str(reference), "--workers", "1"]) == 0
    assert "4 runs (4 finished)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (reference / "runs").rglob("*") if p.is_file()} == before


def test_a_changed_spec_is_refused_naming_what_differs(reference, spec, capsys):
    assert main(["sweep", str(spec), "--out", str(reference), "--set", "train.lr=0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr" in err[0] and "changed" in err[0]
    spec.write_text(SPEC.replace('[0.1, 0.2]', '[0.1, 0.2, 0.3]'))
    assert main(["sweep", str(spec), "--out", str(reference)]) == 2
    assert "cells added" in capsys.readouterr().err


def test_extend_adds_cells_and_keeps_finished_runs_untouched(reference, spec, capsys, tmp_path):
    grown = tmp_path / "grown"
    shutil.copytree(reference, grown)
    before = {p: p.stat().st_mtime_ns for p in (grown / "runs").rglob("*") if p.is_file()}
    spec.write_text(SPEC.replace('[0.1, 0.2]', '[0.1, 0.2, 0.3]'))
    assert main(["sweep", str(spec), "--out", str(grown), "--workers", "1", "--extend"]) == 0
    assert "6 runs (4 finished" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in before} == before          # the finished runs: not rewritten
    assert len(rows_but_wall_time(grown / "metrics.csv")) == 3 * len(rows_but_wall_time(reference / "metrics.csv")) // 2
    spec.write_text(SPEC.replace('[0.1, 0.2]', '[0.1]'))                 # a removed cell: still refused
    assert main(["sweep", str(spec), "--out", str(grown), "--extend"]) == 2
    assert "removed" in capsys.readouterr().err


def test_a_folder_written_before_a_field_existed_is_the_same_configuration(reference, spec, capsys):
    import json
    record = reference / "sweep.json"
    saved = record.read_text()
    data = json.loads(saved)
    for cell in data["cells"]:
        del cell["config"]["model"]["flow_bins"]                          # as written before flow_bins existed
    try:
        record.write_text(json.dumps(data))
        assert main(["sweep", str(spec), "--out", str(reference), "--workers", "1"]) == 0
        assert "4 runs (4 finished)" in capsys.readouterr().err
    finally:
        record.write_text(saved)


def test_a_second_sweep_on_the_same_folder_is_refused(spec, tmp_path, capsys):
    holder = SweepDir(tmp_path / "out")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert "in use by another mogvae sweep" in capsys.readouterr().err
    del holder


def test_a_folder_of_unrelated_files_is_refused_and_kept(spec, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / ".hidden").write_text("mine")
    assert main(["sweep", str(spec), "--out", str(out)]) == 2
    assert "not a mogvae sweep folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".hidden", "notes.txt"]


BAD_GRIDS = [
    ('"train.bogus" = [1, 2]', "grid.train.bogus"),
    ('"nope" = [1]', "grid.nope"),
    ('"train.lr" = []', "grid.train.lr"),
    ('"train.lr" = 0.1', "grid.train.lr"),
    ('"train.lr" = ["fast", 0.1]', "train.lr"),
    ('"train.epochs" = [-1]', "train.epochs"),
    ('preset = ["mfg", "mfg"]', "same configuration"),
    ('preset = ["vamp"]', "preset"),
    ('"data.sigma" = [0.1, 1e-9]', "data.sigma"),
    ('"model.latent_dim" = [3]\n"train.objective" = ["exact"]', "latent_dim"),
]


@pytest.mark.parametrize("grid,needle", BAD_GRIDS)
def test_bad_specs_are_one_line_naming_the_key_and_write_nothing(tmp_path, capsys, grid, needle):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.split("[grid]")[0] + "[grid]\n" + grid + "\n")
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mogvae: error:") and needle in err[0], err
    assert not (tmp_path / "out").exists()


KEYS = st.sampled_from(["seeds", "train.lr", "train.epochs", "data.sigma", "model.hidden", "preset", "eval.grid_size",
                        "train.bogus", "nonsense", "model", "data.name"])
VALUES = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                   st.booleans(), st.lists(st.integers(-2, 3), max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grid=st.dictionaries(KEYS, st.one_of(st.lists(VALUES, max_size=3), VALUES), min_size=1, max_size=3))
def test_fuzzed_grids_expand_or_fail_with_one_error_naming_a_key(grid):
    base = {"seeds": 1, "train": {"epochs": 1}}
    try:
        cells = expand(base, grid)
    except SpecError as e:
        message = str(e)
        assert "\n" not in message and message.startswith("grid")
        return
    assert len(cells) == len({c.name for c in cells}) >= 1


# The driver killed (kill -9) at chosen points: during the first runs, between
# runs, during the last, and after every run finished but before metrics.csv.
# Of the 16 progress messages (4 runs x 4 epochs, two workers), 1-8 come from the first two runs and 9
# from a third that starts as one of them ends. (progress:5, a second point inside the first runs, was
# dropped to keep the suite within 5 minutes.)
KILLS = ["progress:1:KILL", "progress:9:KILL", "progress:14:KILL", "gather:1:KILL"]


@pytest.mark.parametrize("fault", KILLS)
def test_a_killed_driver_resumes_to_the_same_numbers(reference, spec, tmp_path, fault, capsys):
    out = tmp_path / "out"
    # only the gather kill is about figures; elsewhere the workers draw none (--no-report), which is not the point
    drawing = [] if fault.startswith("gather") else ["--no-report"]
    killed = subprocess.run(sweep_cmd(spec, out, *drawing), capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MOGVAE_FAULT": fault}, start_new_session=True)
    assert killed.returncode == -9, killed.stderr
    assert not (out / "metrics.csv").exists()
    # every run finished: each one's figure was drawn by its worker, and the report keeps it
    drawn = {p: p.stat().st_mtime_ns for p in (out / "figures").glob("preset=*.png")} if fault.startswith("gather") else {}
    assert len(drawn) == (4 if fault.startswith("gather") else 0)
    no_report = [] if drawn else ["--no-report"]      # only metrics.csv is compared, but where the figures are
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1", *no_report]) == 0   # in this process
    assert rows_but_wall_time(out / "metrics.csv") == rows_but_wall_time(reference / "metrics.csv")
    assert {p: p.stat().st_mtime_ns for p in drawn} == drawn
    assert all(f"figures/{p.name}" in (out / "report.md").read_text() for p in drawn)


def test_a_dask_cluster_with_a_worker_killed_mid_run_gives_the_same_numbers(reference, spec, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    once = tmp_path / "killed-once"
    # every worker inherits this: the first to reach its 3rd epoch kills itself (kill -9), the rest go on
    monkeypatch.setenv("MOGVAE_FAULT", f"epoch:3:KILL:{once}")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        proc = subprocess.run(sweep_cmd(spec, tmp_path / "out", "--scheduler", cluster.scheduler_address,
                                        "--no-report"),          # the numbers are the point (figures: cluster.md)
                              capture_output=True, text=True, timeout=300,
                              env={k: v for k, v in os.environ.items() if k != "MOGVAE_FAULT"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert once.exists()                                         # a worker really died mid-run
    assert rows_but_wall_time(tmp_path / "out" / "metrics.csv") == rows_but_wall_time(reference / "metrics.csv")


def test_no_report_writes_metrics_only_and_removes_the_report_that_no_longer_matches(reference, spec, tmp_path,
                                                                                      capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "figures")
    args = ["sweep", str(spec), "--out", str(out), "--workers", "1", "--no-report"]
    assert main(args) == 0                                   # nothing to train: the report still matches
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no report (--no-report)" in last and (out / "report.md").exists()
    shutil.rmtree(out / "runs" / sorted(p.name for p in (out / "runs").iterdir())[0])   # one run to train again
    assert main(args) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no report (--no-report, the one from before removed)" in last and f"mogvae report {out}" in last
    assert not (out / "report.md").exists() and not (out / "report.html").exists() and not (out / "figures").exists()
    assert rows_but_wall_time(out / "metrics.csv") == rows_but_wall_time(reference / "metrics.csv")
    assert main(["report", str(out)]) == 0               # the same report but the retrained run's seconds
    figures = [re.findall(r"\(figures/[^)]+\)", (d / "report.md").read_text()) for d in (out, reference)]
    assert figures[0] == figures[1] and all((out / f[1:-1]).is_file() for f in figures[0])


def test_the_workers_draw_into_the_sweep_folder_wherever_they_start(spec, tmp_path, monkeypatch):
    """The figure drawers travel to workers (a Dask worker's working folder is not the driver's): they
    name the sweep folder absolutely, and each figure as the report names it."""
    from mogvae.report.sweep import figure_drawers
    from mogvae.runs.sweep import load_spec
    monkeypatch.chdir(tmp_path)
    _, _, cells = load_spec(spec, [])
    drawers = figure_drawers(Path("relative-out"), cells)
    assert sorted(drawers) == sorted(c.name for c in cells)
    for cell in cells:
        folder, name, also = drawers[cell.name].args
        assert folder == str(tmp_path / "relative-out") and name == cell.name and also is None


def test_report_regenerates_the_same_report_from_saved_files(reference, capsys, tmp_path):
    before = (reference / "report.md").read_text()
    (reference / "report.md").unlink()
    assert main(["report", str(reference)]) == 0
    assert (reference / "report.md").read_text() == before
    (tmp_path / "x.txt").write_text("not mogvae's")
    assert main(["report", str(tmp_path)]) == 2
    assert "not a folder written by mogvae" in capsys.readouterr().err


def test_tensorboard_curves_go_into_every_run_folder_and_stay_ours(spec, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sweep", str(spec), "--out", str(out), "--workers", "2", "--tensorboard", "--set", "train.epochs=2",
            "--set", "seeds=1"]
    assert main(args) == 0, capsys.readouterr().err
    for run in (out / "runs").iterdir():
        assert list((run / "tensorboard").glob("events.out.tfevents.*")), run
    assert main(args) == 0                        # the folders, tensorboard files and all, are still mogvae's
    assert "4 runs (4 finished)" in capsys.readouterr().err
