"""The `mogvae` command end to end, and its refusals."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from mogvae.cli import main
from mogvae.data import PaperProcess

COLUMNS = ["model", "seed", "test_log_likelihood", "true_log_likelihood", "test_elbo", "inference_gap",
           "kl_to_truth", "w1_samples", "std_ratio", "diverged", "train_seconds"]
MODELS = ["mfg", "mog-prior", "mog-posterior", "mog-both"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    proc = subprocess.run([sys.executable, "-m", "mogvae.cli", "reproduce", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_quick_reproduce_writes_the_output_contract(quick_run):
    out, proc = quick_run
    config = json.loads((out / "config.json").read_text())
    assert config["study"]["seeds"] == 2 and "torch" in config["versions"]
    for split in ("train", "val", "test"):
        a = np.load(out / "data" / f"{split}.npy", allow_pickle=False)
        assert a.dtype == np.float64 and a.ndim == 1 and np.isfinite(a).all()
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert set(COLUMNS) <= set(rows[0])
    assert sorted((r["model"], r["seed"]) for r in rows) == sorted((m, s) for m in MODELS for s in "01")
    for name in ["truth", "comparison", "training", *MODELS]:
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / "figures" / f"{name}.csv").stat().st_size > 100
    report = (out / "report.md").read_text()
    assert "## What the numbers say" in report and "figures/comparison.png" in report
    assert "test LL" in proc.stdout  # the table is printed


def test_metrics_are_consistent_with_an_independent_recomputation(quick_run):
    out, _ = quick_run
    test = np.load(out / "data" / "test.npy")
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    truth = PaperProcess(0.1).log_prob(test).mean()
    for r in rows:
        assert float(r["true_log_likelihood"]) == pytest.approx(truth, abs=1e-12)
        assert float(r["kl_to_truth"]) == pytest.approx(truth - float(r["test_log_likelihood"]), abs=1e-12)
        assert float(r["inference_gap"]) >= -1e-6
        assert float(r["inference_gap"]) == pytest.approx(
            float(r["test_log_likelihood"]) - float(r["test_elbo"]), abs=1e-9)
        assert r["diverged"] == "False"


def test_report_numbers_come_from_metrics_csv(quick_run):
    out, _ = quick_run
    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["model"] == "mfg"]
    mean = np.mean([float(r["test_log_likelihood"]) for r in rows])
    assert f"{mean:.4f}" in (out / "report.md").read_text()


def one_line_error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("mogvae: error:") and "Traceback" not in err
    return err


@pytest.mark.parametrize("args,needle", [
    (["reproduce", "--seeds", "0"], "seeds"),
    (["reproduce", "--seeds", "many"], "seeds"),
    (["reproduce", "--epochs", "-3"], "epochs"),
    (["reproduce", "--models", "vamp"], "models"),
    (["reproduce", "--device", "cuda:0"], "cuda"),
    (["reproduce", "--device", "tpu"], "device"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys, tmp_path):
    err = one_line_error([*args, "--out", str(tmp_path / "o")] if args[0] == "reproduce" else args, capsys)
    assert needle in err
