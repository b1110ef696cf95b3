"""What a new user meets: version, help, the configuration reference, threads,
file modes, progress in log files, finished runs, and refusals made before any
training (evaluation that could not run, bad paths, duplicates), each one line."""
import csv
import errno
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from mogvae import __version__
from mogvae.cli import main
from mogvae.runs.run import RunConfig
from mogvae.config.tomlcompat import loads

def one_line_error(args, capsys) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mogvae: error:") and "Traceback" not in err[0], err
    return err[0]


def test_version_and_bare_command(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mogvae {__version__}"
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mogvae") and "reproduce" in out and "train" in out


def test_version_answers_without_importing_torch():
    code = "import sys; from mogvae.cli import main; main(['--version']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_config_show_is_valid_toml_that_parses_back_to_the_defaults(capsys):
    assert main(["config", "--show"]) == 0
    text = capsys.readouterr().out
    assert RunConfig(**loads(text)) == RunConfig()


def test_every_configuration_key_is_described():
    sections = [RunConfig, *(f.annotation for f in RunConfig.model_fields.values() if hasattr(f.annotation,
                                                                                             "model_fields"))]
    undocumented = [f"{cls.__name__}.{name}" for cls in sections for name, f in cls.model_fields.items()
                    if not f.description]
    assert undocumented == []


@pytest.mark.parametrize("extra,threads", [([], 1), (["--threads", "2"], 2)])
def test_train_sets_the_thread_count_one_by_default(tiny, tmp_path, monkeypatch, extra, threads):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["train", str(tiny), "--out", str(tmp_path / "out"), *extra]) == 0
    assert calls == [threads]


def test_bad_thread_counts_are_refused(tiny, tmp_path, capsys):
    assert "--threads" in one_line_error(["train", tiny, "--out", tmp_path / "o", "--threads", "0"], capsys)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_output_files_follow_the_umask(tiny, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert main(["train", str(tiny), "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != ".lock"]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {mode}


def test_progress_is_printed_as_lines_when_not_on_a_terminal(tiny, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mogvae.cli", "train", str(tiny), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "training: epoch 1/3" in proc.stderr and "training: epoch 3/3" in proc.stderr
    assert "\x1b[" not in proc.stderr                     # no terminal control codes in a log file


def test_rerunning_a_finished_run_says_so_and_rewrites_nothing(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["train", str(tiny), "--out", str(out)]) == 0
    capsys.readouterr()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}

    def no_evaluation(*a, **k):
        raise AssertionError("a finished run was evaluated again")
    monkeypatch.setattr("mogvae.runs.run.evaluate", no_evaluation)
    assert main(["train", str(tiny), "--out", str(out)]) == 0
    assert "run complete" in capsys.readouterr().err
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("override,needle", [
    ("model.latent_dim=3\0train.objective=exact", "model.latent_dim <= 2"),   # the oracle needs quadrature
    ("model.latent_dim=2\0train.objective=exact\0train.exact_grid=1001\0eval.grid_size=101", "train.exact_grid"),
    ("model.latent_dim=2", "eval.grid_size"),             # 2001^2 nodes would not fit in memory
    ("data.sigma=1e-4", "data.sigma"),
    ("data.sigma=1e-320", "data.sigma"),
])
def test_evaluation_that_could_not_run_is_refused_before_training(tiny, tmp_path, capsys, override, needle):
    sets = [x for o in ["eval.grid_size=2001", *override.split("\0")] for x in ("--set", o)]
    err = one_line_error(["train", tiny, "--out", tmp_path / "out", *sets], capsys)
    assert needle in err
    assert not (tmp_path / "out").exists()


def test_a_two_dimensional_latent_trains_and_evaluates_at_a_grid_that_fits(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", str(tiny), "--out", str(out), "--set", "model.latent_dim=2",
                 "--set", "eval.grid_size=101"]) == 0, capsys.readouterr().err
    assert "test_log_likelihood" in (out / "metrics.csv").read_text()


def test_a_three_dimensional_latent_is_evaluated_by_importance_sampling(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", str(tiny), "--out", str(out), "--set", "model.latent_dim=3",
                 "--set", "eval.n_importance=200"]) == 0, capsys.readouterr().err
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    for row in rows:
        assert math.isfinite(float(row["test_log_likelihood"])) and math.isfinite(float(row["test_elbo"]))
        assert 0 < float(row["test_log_likelihood_stderr"]) < 0.1
        assert 0 < float(row["test_elbo_stderr"]) < 0.1                # the Monte Carlo ELBO's, beside it
        assert math.isnan(float(row["quadrature_error"]))       # no grid: the error is the standard error
    # the means' sampling bound, recomputed from the saved per-point standard errors: 2 SE + the bias of log p
    saved = np.load(out / "pointwise.npz")
    se, elbo_se = saved["log_p_error"], saved["elbo_error"]
    assert str(saved["log_p_error_is"]) == "stderr"
    n = se.shape[1]
    expected = np.maximum(2 * np.sqrt((se ** 2).sum(1)) / n + (se ** 2).mean(1) / 2, 2 * np.sqrt((elbo_se ** 2).sum(1)) / n)
    for row, bound in zip(rows, expected):
        assert float(row["sampling_error_bound"]) == pytest.approx(bound, rel=1e-9)
        assert float(row["error_bound"]) == float(row["sampling_error_bound"])
        assert row["flagged"] == str(bound > float(row["tolerance"]))
    # evaluation's phases are timed in status.json (benchmarks/studies.py sums them over a study's runs)
    import json
    seconds = json.loads((out / "status.json").read_text())["evaluation_seconds"]
    assert {"the truth", "likelihoods", "samples"} <= set(seconds)
    assert sum(v for k, v in seconds.items() if k != "total") <= seconds["total"]
    # the Python API draws each test point's samples as evaluation did (its own stream, drawing again alike)
    import mogvae
    run = mogvae.load(out)
    y = run.data("test")
    for r, row in enumerate(rows):
        assert abs(run.log_prob(y, replica=r).mean() - float(row["test_log_likelihood"])) < 1e-6
        assert abs(run.elbo(y, replica=r).mean() - float(row["test_elbo"])) < 1e-6


@pytest.mark.parametrize("out,needle", [("x" * 300, "too long"), ("/dev/null", "not a folder"),
                                        ("/dev/null/sub", "not a folder")])
def test_unusable_output_paths_are_one_line(tiny, capsys, out, needle, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert needle in one_line_error(["train", tiny, "--out", out], capsys).lower()


def test_empty_out_is_refused_not_the_current_directory(tiny, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "empty path" in one_line_error(["train", tiny, "--out", ""], capsys)
    assert "empty path" in one_line_error(["reproduce", "--quick", "--out", ""], capsys)
    assert sorted(os.listdir(tmp_path)) == ["run.toml"]


def test_a_configuration_that_is_not_utf8_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"seeds = 1\n\xff\xfe = 2\n")
    assert "not UTF-8" in one_line_error(["train", bad, "--out", tmp_path / "o"], capsys)


def test_duplicate_models_are_refused(capsys, tmp_path):
    assert "more than once" in one_line_error(["reproduce", "--models", "mfg", "mfg", "--out", tmp_path / "o"],
                                              capsys)


def test_a_bug_is_one_line_with_the_way_to_see_more(tiny, tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("something inside went wrong\nsecond line")
    monkeypatch.setattr("mogvae.runs.run.evaluate", broken)
    assert main(["train", str(tiny), "--out", str(tmp_path / "out")]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("training:")]
    assert len(err) == 1 and "internal error: RuntimeError: something inside went wrong" in err[0]
    assert "MOGVAE_TRACEBACK=1" in err[0]


@pytest.mark.parametrize("code,exit_status,words", [(errno.EROFS, 2, "Read-only file system"),
                                                    (errno.EACCES, 2, "Permission denied"),
                                                    (errno.EIO, 1, "Input/output error")])
def test_a_folder_that_cannot_be_written_is_one_line(tiny, tmp_path, capsys, monkeypatch, code, exit_status, words):
    """A read-only filesystem, a folder without permission (root ignores modes, so the
    failure is injected where mogvae creates its files), an I/O error."""
    import tempfile

    def refuse(*args, dir=None, **kwargs):
        raise OSError(code, os.strerror(code), str(dir))
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert main(["train", str(tiny), "--out", str(tmp_path / "out")]) == exit_status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and str(tmp_path / "out") in err[0], err


def test_tensorboard_curves_are_the_history_per_replica(tiny, tmp_path, capsys):
    """--tensorboard: every replica's curves, read back with TensorBoard's own reader,
    equal history.jsonl (TensorBoard stores float32)."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "out"
    assert main(["train", str(tiny), "--out", str(out), "--tensorboard", "--set", "seeds=2",
                 "--set", 'preset="mog-prior"', "--set", "model.n_components=3"]) == 0, capsys.readouterr().err
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    for r in range(2):
        for key in ("val_elbo", "train_loss"):
            scalars = events.Scalars(f"{key}/replica_{r}")
            assert [s.step for s in scalars] == [h["epoch"] for h in history]
            assert [s.value for s in scalars] == pytest.approx([h[key][r] for h in history], rel=1e-6)



def test_train_ends_with_its_results_table_from_metrics_csv(tiny, tmp_path, capsys):
    """Results where the user looks (issue 22): the table mogvae train prints is metrics.csv's mean ± sd."""
    import csv

    import numpy as np
    out = tmp_path / "out"
    assert main(["train", str(tiny), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    ll = np.array([float(r["test_log_likelihood"]) for r in rows if r["diverged"] == "False"])
    expected = f"{ll.mean():.4f} ± {ll.std(ddof=1) if len(ll) > 1 else 0:.4f}"
    assert "mean ± sd over seeds" in printed.out and expected in printed.out, printed.out   # results: stdout
    # progress on stderr, ending with where the report is, written by the command
    assert printed.err.rstrip().splitlines()[-1].startswith(f"done: {out / 'report.html'}") and \
        (out / "report.html").exists() and "**Result:** test log-likelihood" in (out / "report.md").read_text()


def test_report_takes_a_run_folder_and_the_run_stays_resumable(tiny, tmp_path, capsys):
    """mogvae report RUN (issue 22): the one report for a run, its numbers from metrics.csv, its files
    named by the run's layout, so that the run is still its own (a re-run says it is complete)."""
    import csv

    import numpy as np
    out = tmp_path / "out"
    assert main(["train", str(tiny), "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    ll = np.array([float(r["test_log_likelihood"]) for r in rows if r["diverged"] == "False"])
    expected = f"{ll.mean():.4f} ± {ll.std(ddof=1) if len(ll) > 1 else 0:.4f}"
    assert expected in report and "![training](figures/training.png)" in report
    assert (out / "report.html").is_file() and (out / "figures" / "training.png").is_file()
    capsys.readouterr()
    assert main(["train", str(tiny), "--out", str(out)]) == 0
    assert "run complete" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    assert main(["train", str(tiny), "--out", str(unfinished), "--set", "train.epochs=1"]) == 0
    (unfinished / "metrics.csv").unlink()
    capsys.readouterr()
    assert one_line_error(["report", unfinished], capsys).endswith("re-run its mogvae train command to finish it")


def test_progress_says_when_runs_are_evaluating():
    """Minutes of evaluation never look like a stalled run: once a run's last epoch is in, the
    displays say it is evaluating, until it finishes (issue 20: evaluation shows progress)."""
    import io

    from rich.console import Console

    from mogvae.runs.progress import EpochProgress, SweepProgress
    log = io.StringIO()
    with SweepProgress(Console(file=log, force_terminal=False, width=200), {"a": 3, "b": 3}, 0, every=1e9) as p:
        p.epoch("a", 2)
        p.epoch("a", 3)
        p.epoch("b", 1)
        p.finished("a")
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("sweep: 0/2 runs done, 2/6 epochs")               # the first line, at once
    assert lines[1].startswith("sweep: 0/2 runs done, 1 evaluating, 3/6 epochs")  # at once, though `every` is long
    assert lines[2].startswith("sweep: 1/2 runs done, 4/6 epochs") and len(lines) == 3
    log = io.StringIO()
    with EpochProgress(Console(file=log, force_terminal=False), {"training": 2}) as p:
        p.update("training", 1)
        p.update("training", 2)
        p.update("training", "evaluating: the gap search, 250/500 points, ETA 40 s")   # evaluation's lines
    assert log.getvalue().splitlines()[-2:] == ["training: epoch 2/2 (0 s)",
                                                "training: evaluating: the gap search, 250/500 points, ETA 40 s"]
    log = io.StringIO()
    with SweepProgress(Console(file=log, force_terminal=False, width=200), {"a": 3}, 0, every=1e9) as p:
        p.epoch("a", "evaluated in 1.5 s")
    assert log.getvalue().splitlines() == ["a: evaluated in 1.5 s"]
