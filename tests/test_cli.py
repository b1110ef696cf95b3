"""The `mogvae` command end to end, and its refusals."""
import csv
import json

import numpy as np
import pytest

from mogvae.cli import main
from mogvae.data.paper import PaperProcess

COLUMNS = ["model", "seed", "test_log_likelihood", "true_log_likelihood", "test_elbo", "inference_gap",
           "kl_to_truth", "w1_samples", "std_ratio", "diverged", "train_seconds"]
MODELS = ["mfg", "mog-prior", "mog-posterior", "mog-both"]


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


def test_metrics_identities_hold(quick_run):
    out, _ = quick_run
    test = np.load(out / "data" / "test.npy")
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    truth = PaperProcess(0.1).log_prob(test).mean()
    for r in rows:
        assert float(r["true_log_likelihood"]) == pytest.approx(truth, abs=1e-12)
        assert float(r["kl_to_truth"]) == pytest.approx(truth - float(r["test_log_likelihood"]), abs=1e-12)
        assert float(r["inference_gap"]) >= -1e-6
        assert r["diverged"] == "False"


def _numpy_log_marginal(weights: dict, r: int, y: np.ndarray, sigma: float, prior: str) -> np.ndarray:
    """log p(y) of replica r recomputed from the saved weights alone, without mogvae:
    the decoder MLP by hand in NumPy (SiLU), the prior from its formula, and
    scipy's Simpson rule on a dense grid of 40,001 nodes over [-14, 14]."""
    from scipy.integrate import simpson
    from scipy.special import logsumexp, softplus
    z = np.linspace(-14, 14, 40_001)
    h = z[:, None]
    layers = sorted({k.rsplit(".", 1)[0] for k in weights if k.startswith("decoder.net.net.")},
                    key=lambda k: int(k.rsplit(".", 1)[1]))
    for i, name in enumerate(layers):
        h = h @ weights[f"{name}.weight"][r].astype(np.float64) + weights[f"{name}.bias"][r, 0].astype(np.float64)
        if i < len(layers) - 1:
            h = h / (1 + np.exp(-h))                                 # SiLU
    mean = h[:, 0]
    if prior == "normal":
        log_prior = -0.5 * z**2 - 0.5 * np.log(2 * np.pi)
    else:
        loc = weights["prior.loc"][r, :, 0].astype(np.float64)
        scale = softplus(weights["prior.raw_scale"][r, :, 0].astype(np.float64)) + 1e-4
        comp = -0.5 * ((z[:, None] - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)
        log_prior = logsumexp(comp, axis=1) - np.log(len(loc))
    out = []
    for chunk in np.array_split(y, max(1, len(y) // 100)):
        log_lik = -0.5 * ((chunk[:, None] - mean) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)
        joint = log_lik + log_prior
        peak = joint.max(1, keepdims=True)
        out.append(np.log(simpson(np.exp(joint - peak), x=z, axis=1)) + peak[:, 0])
    return np.concatenate(out)


@pytest.mark.parametrize("model,prior", [("mfg", "normal"), ("mog-prior", "mog")])
def test_test_log_likelihood_matches_an_independent_recomputation_from_saved_weights(quick_run, model, prior):
    from safetensors.numpy import load_file
    out, _ = quick_run
    test = np.load(out / "data" / "test.npy")
    final = sorted((out / "runs" / f"preset={model}" / "checkpoints").glob("epoch-*.safetensors"))[-1]
    weights = {k[len("model."):]: v for k, v in load_file(final).items() if k.startswith("model.")}
    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["model"] == model]
    for r in rows:
        mine = _numpy_log_marginal(weights, int(r["seed"]), test, 0.1, prior).mean()
        # measured: 1e-10 to 6e-9 nats apart (float32 networks evaluated in float64 both times)
        assert float(r["test_log_likelihood"]) == pytest.approx(mine, abs=1e-7)


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
