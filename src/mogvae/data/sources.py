"""Data sources behind one protocol: `load_source(config.data)` gives the splits, the
observed dimension and the truth, whichever source `data.name` selects.

    paper     the paper's 1-D process (paper.PaperProcess)                exact truth
    folded    that process lifted to D observed, 1-2 latent dimensions   exact truth (folded.py)
    file      your own values, one point per row                          no truth
    tabular   scikit-learn's breast cancer, diabetes, digits              no truth (tabular.py)

A truth answers log_prob(y) and posterior(y, z_grid); without one (UnknownTruth) both are
NaN, and so is every metric measured against it. A 1-D source gives splits of shape [n]
(every 1-D figure and metric applies); a D-dimensional one [n, D].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config.schema import DataConfig, FileSource, FoldedSource, PaperSource, TabularSource
from .files import DataError, load_data_file, split_file_data
from .paper import PaperProcess, UnknownTruth, make_splits


@dataclass(frozen=True)
class Source:
    splits: dict[str, np.ndarray]   # train, val, test: [n] when data_dim = 1, else [n, D]
    truth: object                   # log_prob(y) -> [n], posterior(y, z_grid); NaN where unknown
    data_dim: int

    @property
    def has_truth(self) -> bool:
        return not isinstance(self.truth, UnknownTruth)


def _sizes(d: DataConfig) -> dict[str, int]:
    return {"train": d.n_train, "val": d.n_val, "test": d.n_test}


def _paper(d: PaperSource) -> Source:
    process = PaperProcess(d.sigma)
    return Source(make_splits(process, _sizes(d), d.seed), process, 1)


def _folded(d: FoldedSource) -> Source:
    from .folded import FoldedProcess
    process = FoldedProcess(d.data_dim, d.latent_dim, d.breaking_count, d.sigma)
    splits = make_splits(process, _sizes(d), d.seed)
    if d.data_dim == 1:      # one column is the 1-D case: the 1-D metrics and figures apply
        splits = {k: v[:, 0] for k, v in splits.items()}
    return Source(splits, process, d.data_dim)


def _file(d: FileSource) -> Source:
    y = load_data_file(d.path)
    flat = y.reshape(len(y), -1)
    constant = np.flatnonzero(flat.min(0) == flat.max(0))
    if len(constant):    # no spread to model: its std ratio and every density in it would be degenerate
        raise DataError(f"{d.path}: column {constant[0] + 1} holds one value ({flat[0, constant[0]]:g}) in every row; "
                        "drop constant columns first")
    return Source(split_file_data(y, _sizes(d), d.seed, d.path), UnknownTruth(), 1 if y.ndim == 1 else y.shape[1])


def _tabular(d: TabularSource) -> Source:
    from .tabular import EmptySplit, split_standardized
    fractions = {"train": 1 - d.val_fraction - d.test_fraction, "val": d.val_fraction, "test": d.test_fraction}
    try:
        data = split_standardized(d.dataset, fractions, d.seed)
    except EmptySplit as e:
        raise DataError(f"data.val_fraction = {d.val_fraction:g} and data.test_fraction = {d.test_fraction:g} leave "
                        f"{d.dataset}'s {e.split} split ({fractions[e.split]:.2%} of {e.rows} rows) without a row: "
                        "lower them") from None
    # the splits are already a seeded permutation: n_* caps them by taking their first rows
    splits = {k: v[:n] for (k, v), n in zip(data.splits.items(), _sizes(d).values())}
    return Source(splits, UnknownTruth(), data.data_dim)


LOADERS = {"paper": _paper, "folded": _folded, "file": _file, "tabular": _tabular}


def load_source(d: DataConfig) -> Source:
    """The splits and truth `d` describes. A file that cannot be used raises files.DataError."""
    return LOADERS[d.name](d)
