"""Real data from scikit-learn: shapes, seeded disjoint splits, dequantization, and standardization
by the training split's statistics alone."""
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits

import mogvae.data.tabular as tabular
from mogvae.data.tabular import dequantize, load_tabular, split_standardized

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


@pytest.mark.parametrize("name, shape, kept", [("breast_cancer", (569, 30), 30), ("diabetes", (442, 10), 10),
                                               ("digits", (1797, 64), 61)])
def test_the_data_sets_and_their_kept_columns(name, shape, kept):
    assert load_tabular(name).shape == shape
    data = split_standardized(name, FRACTIONS, 0)
    assert data.data_dim == kept
    assert sum(len(v) for v in data.splits.values()) == shape[0]


def test_the_raw_matrices_are_scikit_learns():
    np.testing.assert_array_equal(load_tabular("breast_cancer"), load_breast_cancer().data)
    np.testing.assert_array_equal(load_tabular("diabetes"), load_diabetes(scaled=False).data)
    np.testing.assert_array_equal(load_tabular("digits"), load_digits().data)


def test_splits_are_a_seeded_partition_of_the_rows():
    x, _, _ = dequantize(load_tabular("diabetes"), 3)
    a, b = split_standardized("diabetes", FRACTIONS, 3), split_standardized("diabetes", FRACTIONS, 3)
    for k in FRACTIONS:
        np.testing.assert_array_equal(a.splits[k], b.splits[k])
    rows = np.concatenate([a.splits[k] * a.std + a.mean for k in FRACTIONS])   # undo the standardization
    np.testing.assert_allclose(np.sort(rows, 0), np.sort(x, 0), rtol=1e-12)     # every row once, no other
    other = split_standardized("diabetes", FRACTIONS, 4)
    assert not np.allclose(other.splits["test"][:5], a.splits["test"][:5])


def test_statistics_come_from_the_training_split_alone(monkeypatch):
    base = load_tabular("breast_cancer")
    data = split_standardized("breast_cancer", FRACTIONS, 0)
    train_raw = data.splits["train"] * data.std + data.mean
    np.testing.assert_allclose(data.mean, train_raw.mean(0), rtol=1e-12)
    np.testing.assert_allclose(data.std, train_raw.std(0), rtol=1e-12)
    np.testing.assert_allclose(data.splits["train"].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(data.splits["train"].std(0), 1, atol=1e-12)
    # a wild value in a test row changes the test split and nothing else
    test_row = np.flatnonzero(np.isclose(base, data.splits["test"][0] * data.std + data.mean, rtol=1e-9).all(1))
    assert len(test_row) == 1
    poisoned = base.copy()
    poisoned[test_row[0]] *= 1e6
    monkeypatch.setattr(tabular, "load_tabular", lambda name: poisoned)
    again = split_standardized("breast_cancer", FRACTIONS, 0)
    np.testing.assert_array_equal(again.mean, data.mean)
    np.testing.assert_array_equal(again.splits["train"], data.splits["train"])
    assert np.abs(again.splits["test"][0]).max() > 1e3


def test_lattice_columns_are_dequantized_within_one_gap_and_constants_dropped():
    raw = load_tabular("digits")                               # integers 0..16; some pixels always 0
    x, kept, lattice = dequantize(raw, 0)
    constant = [j for j in range(64) if np.ptp(raw[:, j]) == 0]
    assert sorted(set(range(64)) - set(kept)) == constant and len(constant) == 3
    offset = x - raw[:, kept]
    assert (offset >= 0).all() and (offset < 1).all()           # within [v, v + 1): the gap of integer data
    assert all(len(np.unique(x[:, i])) == len(x) for i in range(x.shape[1]))
    cancer, _, lattice_c = dequantize(load_tabular("breast_cancer"), 0)
    assert len(lattice_c) == 0
    np.testing.assert_array_equal(cancer, load_tabular("breast_cancer"))   # continuous columns untouched


@pytest.mark.parametrize("name, fractions, message", [
    ("mnist", FRACTIONS, "unknown tabular data set 'mnist'"),
    ("digits", {"val": 0.5, "test": 0.5}, "must include 'train'"),
    ("digits", {"train": 0.8, "test": 0.4}, "sum to at most 1"),
])
def test_bad_requests_are_refused_naming_the_problem(name, fractions, message):
    with pytest.raises(ValueError, match=message):
        split_standardized(name, fractions, 0)


def test_importance_sampling_agrees_with_quadrature_on_breast_cancer_at_d_z_2():
    """A VAE trained briefly on breast cancer (D = 30) with a 2-D latent: the importance-sampling
    log-likelihood (what d_z > 2 will use) against 2-D quadrature, point by point within its SE."""
    from mogvae.config.schema import TrainConfig, preset
    from mogvae.estimators.likelihood import importance_log_likelihood
    from mogvae.model.vae import build_model
    from mogvae.estimators.quadrature import latent_grid, log_marginal
    from mogvae.model.layers import initialize
    from mogvae.training.trainer import fit

    data = split_standardized("breast_cancer", FRACTIONS, 0).splits
    model = build_model(preset("mfg", hidden=(32, 32), latent_dim=2, learn_decoder_noise=True),
                        replicas=2, data_dim=30, noise=1.0)
    gens = initialize(model, [1, 2])
    fit(model, data["train"], data["val"], TrainConfig(epochs=30, batch_size=64, lr=3e-3), [1, 2], gens)
    y = data["test"][:40]
    exact = log_marginal(model, y, latent_grid(model, 301, 8.0, y=y)).log_p.numpy()       # [R, N]
    estimate, se = (t.numpy() for t in importance_log_likelihood(model, y, 4000, [5, 6]))
    z = (estimate - exact) / se
    assert np.isfinite(exact).all() and (se > 0).all()
    assert np.abs(z).max() < 5 and abs(z.mean()) < 1.0, (z.mean(), np.abs(z).max())
    # typical points agree closely; an outlier's weights are heavy-tailed (one was 1.9 nats off at
    # K = 4,000 with SE 0.9, and 0.014 off at K = 100,000): its SE says so, which z checks above
    assert np.median(np.abs(estimate - exact)) < 0.02
