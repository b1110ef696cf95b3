"""The data source registry: `load_source(config.data)` gives the splits, the observed
dimension and the truth, whichever source `data.name` selects.

    paper     the paper's 1-D process (paper.py)                          exact truth
    folded    that process lifted to D observed, 1-2 latent dimensions   exact truth (folded.py)
    file      your own values, one point per row (files.py)               no truth
    tabular   scikit-learn's breast cancer, diabetes, digits (tabular.py) no truth

A truth answers log_prob(y) and posterior(y, z_grid); without one (base.UnknownTruth) both are
NaN, and so is every metric measured against it. A 1-D source gives splits of shape [n]
(every 1-D figure and metric applies); a D-dimensional one [n, D]. Adding a source: a module
here with its section and loader (see base.DataSource), and its entry below.
"""
from __future__ import annotations

from . import files, folded, paper, tabular
from .base import DataSource, Source

SOURCES: dict[str, DataSource] = {s.name: s for s in (paper.SOURCE, files.SOURCE, folded.SOURCE, tabular.SOURCE)}


def load_source(d) -> Source:
    """The splits and truth the data section `d` describes. A file that cannot be used raises files.DataError."""
    return SOURCES[d.name].load(d)
