"""Real data with no truth: data sets shipped inside scikit-learn (no download).

    breast_cancer   569 x 30   Wisconsin diagnostic features (the paper's "medical data")
    diabetes        442 x 10   the raw (unscaled) baseline variables of the diabetes study
    digits         1797 x 64   8x8 images, pixel intensities 0..16

A density model needs a density: where a column's values sit on a lattice with heavy ties (integer
ages, the 0/1 sex column, digits' 17 intensity levels) a Gaussian decoder could put unbounded
density on single values. Such a column is dequantized: U(0, delta) noise is added, delta the
column's smallest gap, from a generator seeded by the data seed. A column constant over the whole
data set carries no information and has no density; it is dropped (digits: 3 of 64 pixels).
Columns are then standardized with the mean and standard deviation of the training split alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from .base import DataSource, FractionSplits, Source, UnknownTruth

TIES = 0.5   # a column with fewer distinct values than this fraction of its rows is a lattice


def _loaders() -> dict:
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
    return {"breast_cancer": load_breast_cancer, "diabetes": lambda: load_diabetes(scaled=False),
            "digits": load_digits}


TABULAR = ("breast_cancer", "diabetes", "digits")


@dataclass(frozen=True)
class TabularData:
    """Standardized splits [n, D] and what was done to get them."""
    splits: dict[str, np.ndarray]
    mean: np.ndarray              # training-split statistics, per kept column, before standardizing
    std: np.ndarray
    kept: np.ndarray              # indices of the original columns kept
    dequantized: np.ndarray       # indices (original) of the columns given U(0, delta) noise

    @property
    def data_dim(self) -> int:
        return len(self.kept)


def load_tabular(name: str) -> np.ndarray:
    """The raw feature matrix of a scikit-learn data set, float64 [n, D]."""
    if name not in TABULAR:
        raise ValueError(f"unknown tabular data set {name!r}; choose from {list(TABULAR)}")
    return np.asarray(_loaders()[name]().data, dtype=np.float64)


def dequantize(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop constant columns; add U(0, smallest gap) noise to lattice columns (module docstring).
    Returns (x', kept column indices, dequantized column indices)."""
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0.0, 1.0, size=x.shape)          # drawn whole: a column's noise does not depend on others
    kept, lattice, out = [], [], []
    for j in range(x.shape[1]):
        values = np.unique(x[:, j])
        if len(values) == 1:
            continue
        kept.append(j)
        column = x[:, j]
        if len(values) < TIES * len(column):
            column = column + noise[:, j] * np.diff(values).min()
            lattice.append(j)
        out.append(column)
    return np.stack(out, 1), np.array(kept), np.array(lattice, dtype=int)


class EmptySplit(ValueError):
    """Fractions that leave a split without rows."""

    def __init__(self, split: str, rows: int):
        super().__init__(f"the {split} split gets no rows of {rows}")
        self.split, self.rows = split, rows


def split_standardized(name: str, fractions: dict[str, float], seed: int) -> TabularData:
    """The data set dequantized, cut by a seeded permutation into splits of the given fractions
    (the last split takes the remainder), and standardized by the training split's statistics."""
    if "train" not in fractions:
        raise ValueError("the splits must include 'train' (its statistics standardize all splits)")
    if any(f <= 0 for f in fractions.values()) or sum(fractions.values()) > 1 + 1e-12:
        raise ValueError(f"split fractions must be positive and sum to at most 1, got {fractions}")
    x, kept, lattice = dequantize(load_tabular(name), seed)
    order = np.random.default_rng(seed).permutation(len(x))
    names, start, raw = list(fractions), 0, {}
    for i, split in enumerate(names):
        stop = len(x) if i == len(names) - 1 and abs(sum(fractions.values()) - 1) < 1e-12 \
            else start + int(round(fractions[split] * len(x)))
        raw[split] = x[order[start:stop]]
        if not len(raw[split]):      # standardizing by, or evaluating on, no rows is no result
            raise EmptySplit(split, len(x))
        start = stop
    mean, std = raw["train"].mean(0), raw["train"].std(0)
    std = np.where(std > 0, std, 1.0)   # constant over the training split alone: centred, not scaled
    return TabularData({k: (v - mean) / std for k, v in raw.items()}, mean, std, kept, lattice)


class TabularSource(FractionSplits):
    """A real data set shipped inside scikit-learn (mogvae.data.tabular): no truth, so those metrics are NaN."""
    name: Literal["tabular"] = "tabular"
    dataset: Literal[TABULAR] = Field("breast_cancer", description="breast_cancer (569 x 30), diabetes "
                                           "(442 x 10) or digits (1797 x 61 after dropping constant pixels)")


def load_tabular_source(d: TabularSource) -> Source:
    from .files import DataError
    fractions = {"train": 1 - d.val_fraction - d.test_fraction, "val": d.val_fraction, "test": d.test_fraction}
    try:
        data = split_standardized(d.dataset, fractions, d.seed)
    except EmptySplit as e:
        raise DataError(f"data.val_fraction = {d.val_fraction:g} and data.test_fraction = {d.test_fraction:g} leave "
                        f"{d.dataset}'s {e.split} split ({fractions[e.split]:.2%} of {e.rows} rows) without a row: "
                        "lower them") from None
    # the splits are already a seeded permutation: n_* caps them by taking their first rows
    splits = {k: v[:n] for (k, v), n in zip(data.splits.items(), d.sizes().values())}
    return Source(splits, UnknownTruth(), data.data_dim)


COLUMNS = {"breast_cancer": 30, "diabetes": 10, "digits": 61}   # after dequantize drops constant columns
SOURCE = DataSource(TabularSource, load_tabular_source, data_dim=lambda d: COLUMNS[d.dataset])
