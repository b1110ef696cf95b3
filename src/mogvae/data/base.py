"""What every data source is: a validated config section (a subclass of SplitsSection with
its own `name`) and a loader that turns it into a Source (splits and their truth). A
source is one module of this package that defines both, registered in sources.SOURCES."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from pydantic import Field, model_validator

from ..storage.strict import Strict

MAX_POINTS = 10_000_000      # per split: the data are held in memory, with every split's copy in the run folder
MAX_DATA_VALUES = 250_000_000  # points x dimensions over the three splits: 2 GB of float64 drawn before training


class SplitsSection(Strict):
    """What every data source shares: split sizes, the seed of its draws and the noise."""
    sigma: float = Field(0.1, ge=1e-3, le=1e3, description="noise std of y|z (the paper's 0.01 read as a "
                         "variance); also the decoder's known noise (its initial value where learned). At least "
                         "1e-3: below it the truth's quadrature needs millions of nodes and the model's posterior is "
                         "narrower than the evaluation grid")
    n_train: int = Field(10_000, ge=1, le=MAX_POINTS, description="training points (tabular: at most this many; "
                         "file: unset, the rows the two fractions leave)")
    n_val: int = Field(2_000, ge=1, le=MAX_POINTS, description="validation points, the ELBO curve in history (tabular: "
                       "at most; file: unset, val_fraction of the rows)")
    n_test: int = Field(10_000, ge=1, le=MAX_POINTS, description="held-out points for the exact evaluation (tabular: "
                        "at most; file: unset, test_fraction of the rows)")
    seed: int = Field(0, ge=0, description="seed of the data draws (or of the shuffle of a file or data set)")

    @model_validator(mode="before")
    @classmethod
    def _no_null_path(cls, data):
        """Folders written before the sources were a union recorded `path = null` for every source."""
        if isinstance(data, dict) and "path" in data and data["path"] is None and "path" not in cls.model_fields:
            data = {k: v for k, v in data.items() if k != "path"}
        return data

    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}


class FractionSplits(SplitsSection):
    """A source that splits given rows (a file, a data set) by shares rather than draws points."""
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="the share of rows in the validation split")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="the share of rows in the test split")


class UnknownTruth:
    """Stands in for a process when the data come from a file: every true
    quantity is NaN, so metrics against the truth are reported as unknown."""

    name = "file"

    @staticmethod
    def f(z):
        return np.full(np.shape(z), np.nan)

    def log_prob(self, y):
        return np.full(len(np.atleast_1d(y)), np.nan)

    def posterior(self, y, z_grid):
        return np.full((len(np.atleast_1d(y)), len(z_grid)), np.nan)


@dataclass(frozen=True)
class Source:
    """A loaded source: its splits, their truth and the observed dimension."""
    splits: dict[str, np.ndarray]   # train, val, test: [n] when data_dim = 1, else [n, D]
    truth: object                   # log_prob(y) -> [n], posterior(y, z_grid); NaN where unknown
    data_dim: int

    @property
    def has_truth(self) -> bool:
        return not isinstance(self.truth, UnknownTruth)


@dataclass(frozen=True)
class DataSource:
    """A data source plug-in: its config section (whose `name` field's default names it)
    and its loader (the section -> a Source; an unusable file raises files.DataError), with what
    can be known before loading: the observed dimension, for evaluation's memory check, and
    a check of what its truth can compute in reasonable time, and whether the data's noise is
    known (model.learn_decoder_noise's default is its opposite)."""
    section: type[SplitsSection]
    load: Callable[[SplitsSection], Source]
    data_dim: Callable[[SplitsSection], int | None] = lambda d: None   # D before loading (None: known once read)
    check: Callable[[SplitsSection], None] = lambda d: None   # refuse (ValueError) what the truth cannot compute
    known_noise: bool = False   # y's noise is data.sigma by construction (a simulator); else it is learned by default

    @property
    def name(self) -> str:
        return self.section.model_fields["name"].default
