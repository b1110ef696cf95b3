"""Data sources behind `data.name`: each trains end to end with its own keys, the numbers of a
D-dimensional run are recomputed independently from saved weights, old folders still resume,
and bad input for every source is one line, exit 2, nothing written."""
import csv
import hashlib
import json

import numpy as np
import pytest
import torch
from scipy.stats import norm, wasserstein_distance

from mogvae.cli import main
from mogvae.estimators.evaluate import _marginal_w1
from mogvae.data.folded import FoldedProcess
from mogvae.estimators.quadrature import _log_terms
from mogvae.runs.run import RunConfig, RunDir, upgraded
from mogvae.data.sources import load_source

SMALL = """
preset = "{preset}"
seeds = 2
[model]
hidden = [8]
{model}
[data]
{data}
[train]
epochs = 2
[eval]
grid_size = {grid}
n_generated = 300
gap_points = 5
n_importance = 200
"""


def train(tmp_path, capsys, data: str, preset="mfg", model="", grid=401, out="out"):
    cfg = tmp_path / "c.toml"
    cfg.write_text(SMALL.format(preset=preset, data=data, model=model, grid=grid))
    code = main(["train", str(cfg), "--out", str(tmp_path / out)])
    return code, capsys.readouterr().err.strip().splitlines()


def rows(path):
    return list(csv.DictReader(open(path)))


def test_a_folded_run_is_recomputed_from_its_saved_weights(tmp_path, capsys):
    """D = 4, one latent: log p(y) of each replica by a NumPy decoder and scipy's normal pdf on a
    dense Simpson grid, and the truth by the process's own quadrature, both against metrics.csv."""
    from safetensors.numpy import load_file
    from scipy.integrate import simpson
    data = 'name = "folded"\ndata_dim = 4\nbreaking = 1\nn_train = 300\nn_val = 50\nn_test = 40'
    code, err = train(tmp_path, capsys, data)
    assert code == 0, err
    out = tmp_path / "out"
    y = np.load(out / "data" / "test.npy")
    assert y.shape == (40, 4)
    weights = {k[6:]: v.astype(np.float64) for k, v in
               load_file(sorted((out / "checkpoints").glob("*.safetensors"))[-1]).items() if k.startswith("model.")}
    z = np.linspace(-14, 14, 40_001)
    h = z[:, None]
    layers = sorted({k.rsplit(".", 1)[0] for k in weights if k.startswith("decoder.net.net.")},
                    key=lambda k: int(k.rsplit(".", 1)[1]))
    for i, layer in enumerate(layers):
        h = h @ weights[f"{layer}.weight"][0] + weights[f"{layer}.bias"][0, 0]
        h = h / (1 + np.exp(-h)) if i < len(layers) - 1 else h        # SiLU between the layers
    log_joint = norm.logpdf(y[:, None, :], h[None], 0.1).sum(-1) + norm.logpdf(z)[None]
    peak = log_joint.max(1, keepdims=True)
    mine = np.log(simpson(np.exp(log_joint - peak), x=z, axis=1)) + peak[:, 0]
    first = rows(out / "metrics.csv")[0]
    assert float(first["test_log_likelihood"]) == pytest.approx(mine.mean(), abs=1e-7)
    truth = FoldedProcess(4, 1, 1, 0.1).log_prob(y).mean()
    assert float(first["true_log_likelihood"]) == pytest.approx(truth, abs=1e-12)
    assert float(first["kl_to_truth"]) == pytest.approx(truth - float(first["test_log_likelihood"]), abs=1e-12)
    assert np.isnan(float(first["w1_to_truth"])) and np.isfinite(float(first["w1_decoder"]))
    assert not (out / "curves.npz").exists() or "y_grid" not in np.load(out / "curves.npz").files


def test_the_wide_log_terms_equal_the_normal_density_summed_over_dimensions():
    gen = torch.Generator().manual_seed(0)
    R, G, n, Y = 2, 300, 5, 30
    mean = torch.randn(R, G, Y, generator=gen, dtype=torch.float64)
    y = 3 * torch.randn(R, n, Y, generator=gen, dtype=torch.float64)
    log_sigma = torch.randn(R, 1, Y, generator=gen, dtype=torch.float64) - 1
    offset = torch.randn(R, G, dtype=torch.float64)
    terms = _log_terms(y, mean, torch.exp(-log_sigma), offset)
    reference = norm.logpdf(y[:, None].numpy(), mean[:, :, None].numpy(), np.exp(log_sigma[:, :, None].numpy()))
    reference = reference.sum(-1) + np.log(np.exp(log_sigma.numpy())).sum(-1)[:, :, None] \
        + 0.5 * Y * np.log(2 * np.pi) + offset[:, :, None].numpy()
    np.testing.assert_allclose(terms.numpy(), reference, rtol=1e-13, atol=1e-9)


def test_marginal_w1_is_the_mean_of_scipys_per_coordinate_distances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 3)), rng.laplace(size=(400, 3))
    expected = np.mean([wasserstein_distance(a[:, k], b[:, k]) for k in range(3)])
    assert _marginal_w1(a, b) == pytest.approx(expected, rel=1e-14)
    if hasattr(np, "vecdot"):               # NumPy 2: summed as SciPy sums, so bitwise SciPy's, value by value
        assert all(_marginal_w1(a[:, [k]], b[:, [k]]) == wasserstein_distance(a[:, k], b[:, k]) for k in range(3))
    # ties within and across the samples, float32, and a closed form: W1 of two point masses is their distance
    c, d = np.round(a[:300], 1).astype(np.float32), np.round(b, 1).astype(np.float32)
    assert _marginal_w1(c, d) == pytest.approx(np.mean([wasserstein_distance(c[:, k], d[:, k]) for k in range(3)]),
                                               rel=1e-14)
    assert _marginal_w1(np.zeros((7, 1)), np.full((3, 1), 2.5)) == 2.5


def test_a_file_of_three_columns_trains_with_unknown_truth(tmp_path, capsys):
    values = np.random.default_rng(1).normal(size=(250, 3))
    path = tmp_path / "y.csv"
    path.write_text("# three columns\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in values))
    data = f'name = "file"\npath = "{path}"\nn_train = 150\nn_val = 50\nn_test = 50'
    code, err = train(tmp_path, capsys, data)
    assert code == 0, err
    splits = [np.load(tmp_path / "out" / "data" / f"{s}.npy") for s in ("train", "val", "test")]
    assert all(s.shape[1] == 3 for s in splits)
    np.testing.assert_array_equal(np.sort(np.concatenate(splits), 0), np.sort(values, 0))
    first = rows(tmp_path / "out" / "metrics.csv")[0]
    assert np.isfinite(float(first["test_log_likelihood"])) and np.isnan(float(first["kl_to_truth"]))


def test_a_tabular_run_at_d_z_5_is_importance_sampled_with_a_standard_error(tmp_path, capsys):
    data = 'name = "tabular"\ndataset = "diabetes"\nsigma = 1.0'
    code, err = train(tmp_path, capsys, data, preset="mog-posterior",
                      model="latent_dim = 5\nlearn_decoder_noise = true")
    assert code == 0, err
    first = rows(tmp_path / "out" / "metrics.csv")[0]
    assert np.isfinite(float(first["test_log_likelihood"])) and float(first["test_log_likelihood_stderr"]) > 0
    assert np.isnan(float(first["true_log_likelihood"]))


def test_tabular_splits_follow_the_fractions_and_the_caps():
    source = load_source(RunConfig(data={"name": "tabular", "dataset": "breast_cancer", "val_fraction": 0.1,
                                         "test_fraction": 0.25, "n_train": 300}).data)
    assert source.data_dim == 30 and not source.has_truth
    assert {k: v.shape for k, v in source.splits.items()} == {"train": (300, 30), "val": (57, 30), "test": (142, 30)}


def test_a_folded_source_with_one_dimension_gives_the_papers_1d_splits():
    source = load_source(RunConfig(data={"name": "folded", "data_dim": 1, "n_train": 50, "n_val": 5,
                                         "n_test": 5}).data)
    assert source.splits["train"].shape == (50,) and source.has_truth


@pytest.mark.parametrize("data,model,needle", [
    ('name = "folded"\ndata_dim = 1\nlatent_dim = 2', "", "data.data_dim = 1 is less than data.latent_dim = 2"),
    ('name = "folded"\ndata_dim = 3\nbreaking = 3', "", "data.breaking = 3 must be in [0, data_dim - latent_dim]"),
    ('name = "folded"\ndata_dim = 3\nbreaking = "some"', "", "data.breaking"),
    ('name = "mnist"', "", "data.name must be one of"),
    ("name = []", "", "data.name must be one of"),
    ("name = {a = 1}", "", "data.name must be one of"),
    ('name = "tabular"\ndataset = "iris"', "", "data.dataset"),
    ('name = "tabular"\nval_fraction = 0.6', "", "data.val_fraction"),
    ('name = "paper"\npath = "y.csv"', "", "data.path: Extra inputs are not permitted"),
    ('name = "paper"\ndata_dim = 5', "", "data.data_dim: Extra inputs are not permitted"),
    ('name = "file"', "", "data.path: Field required"),
    ('name = "tabular"\ndataset = "diabetes"\nval_fraction = 0.4\ntest_fraction = 0.4',
     'prior = "vamp"\nposterior = "gaussian"\nn_components = 100', "VampPrior, but the training split has 88"),
])
def test_bad_sources_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, data, model, needle):
    cfg = tmp_path / "c.toml"
    text = SMALL.format(preset="mfg", data=data, model=model, grid=401)
    if model:
        text = text.replace('preset = "mfg"\n', "")
    cfg.write_text(text)
    (tmp_path / "keep.txt").write_text("a user's file")
    code = main(["train", str(cfg), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mogvae: error:") and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_folder_written_before_sources_were_a_union_resumes_with_its_checkpoints_hash(tmp_path):
    """Folders of earlier versions recorded data.path = null for every source; their checkpoints
    carry the hash of that config.json, which a resume must still accept."""
    config = RunConfig(seeds=1)
    old = config.model_dump(mode="json")
    old["data"] = {"name": "paper", "path": None, **{k: v for k, v in old["data"].items() if k != "name"}}
    assert upgraded(old) == config.model_dump(mode="json")
    folder = tmp_path / "run"
    run = RunDir(folder)
    run.lock()                                                              # a run folder, as it was written
    (folder / "config.json").write_text(json.dumps(old, indent=2))
    run.claim(config)
    assert run.config_hash == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    assert json.loads((folder / "config.json").read_text()) == old          # left as it was


def test_config_show_lists_every_source_and_parses_back(capsys):
    from mogvae.config.tomlcompat import loads
    assert main(["config", "--show"]) == 0
    text = capsys.readouterr().out
    for needle in ('name = "file", path = (required)', 'name = "folded", data_dim = 2', 'name = "tabular"'):
        assert needle in text
    assert RunConfig(**loads(text)) == RunConfig()


def test_a_two_latent_folded_run_is_evaluated_by_2d_quadrature_against_its_truth(tmp_path, capsys):
    data = 'name = "folded"\ndata_dim = 3\nlatent_dim = 2\nn_train = 300\nn_val = 50\nn_test = 30'
    code, err = train(tmp_path, capsys, data, model="latent_dim = 2", grid=151)
    assert code == 0, err
    out = tmp_path / "out"
    y = np.load(out / "data" / "test.npy")
    truth = FoldedProcess(3, 2, 0, 0.1).log_prob(y).mean()
    for row in rows(out / "metrics.csv"):
        assert float(row["true_log_likelihood"]) == pytest.approx(truth, abs=1e-12)
        assert np.isfinite(float(row["quadrature_error"])) and np.isnan(float(row["test_log_likelihood_stderr"]))
        assert float(row["kl_to_truth"]) > 0               # a model two epochs old is far from the truth


def test_a_sweep_refuses_before_training_a_cell_its_data_cannot_hold():
    from mogvae.runs.sweep import SpecError, expand, preflight
    base = {"seeds": 1, "model": {"prior": "vamp", "n_components": 300}, "data": {"name": "tabular"}}
    cells = expand(base, {"data.dataset": ["breast_cancer", "diabetes"]})
    with pytest.raises(SpecError, match=r"data.dataset=diabetes: .*VampPrior, but the training split has 287"):
        preflight(cells)
