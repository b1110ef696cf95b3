"""The paper's data source, with a known truth.

The paper's process (§3.1): z ~ U(0, 1), y | z ~ N(f(z), sigma^2) with
f(z) = 1[z<0.5] (2z-0.5)^2 + 1[z>=0.5] (2z-1.5)^2.
The paper writes N(f(z), 0.01); we read 0.01 as the variance, so sigma = 0.1.

Everything here is float64 NumPy: the truth is the reference the models are
measured against, so it is computed more precisely than the models are.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.polynomial.legendre import leggauss
from scipy.special import logsumexp
from typing import Literal

from pydantic import Field

from .base import DataSource, Source, SplitsSection

KINK = 0.5  # f is continuous but not differentiable here: always a quadrature node


def _check_positive_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def kinked_rule(half_panels: int, nodes_per_panel: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre on [0, 1]: `half_panels` equal panels on each side of KINK (so
    KINK is an edge, and the rule sees only smooth pieces), `nodes_per_panel` nodes each.
    Returns (nodes, weights), float64."""
    x, w = leggauss(nodes_per_panel)
    edges = np.linspace(0.0, 1.0, 2 * half_panels + 1)
    a, b = edges[:-1, None], edges[1:, None]
    return ((b - a) / 2 * x + (a + b) / 2).ravel(), ((b - a) / 2 * w).ravel()


def rule_difference(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """|fine - coarse| per point, two rules' log p: 0 where both are -inf (no node reaches the point)."""
    with np.errstate(invalid="ignore"):
        return np.where(fine == coarse, 0.0, np.abs(fine - coarse))


class PaperProcess:
    """The 1-D process of the paper with its exact marginal and posterior."""

    name = "paper"

    def __init__(self, sigma: float = 0.1, nodes_per_panel: int = 16):
        self.sigma = _check_positive_finite("sigma", sigma)
        # Composite Gauss-Legendre on each smooth piece [0, .5] and [.5, 1].
        # p(y|z) as a function of z varies on the scale sigma / |f'(z)| >= sigma / 2,
        # so panels a quarter of that wide make the rule exact to float64 precision.
        panels = max(32, math.ceil(KINK / (self.sigma / 8)))
        self._z_nodes, weights = kinked_rule(panels, nodes_per_panel)
        self._log_w = np.log(weights)
        # The rule with half as many panels: log_prob_and_error's estimate
        self._coarse_nodes, coarse_weights = kinked_rule(math.ceil(panels / 2), nodes_per_panel)
        self._coarse_log_w = np.log(coarse_weights)

    @staticmethod
    def f(z):
        """The true decoder, for NumPy arrays or scalars."""
        z = np.asarray(z, dtype=np.float64)
        return np.where(z < KINK, (2 * z - 0.5) ** 2, (2 * z - 1.5) ** 2)

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw n pairs (z, y), float64, reproducibly from `seed`."""
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        rng = np.random.default_rng(seed)
        z = rng.uniform(0.0, 1.0, size=int(n))
        y = self.f(z) + self.sigma * rng.standard_normal(int(n))
        return z, y

    def log_likelihood(self, y, z) -> np.ndarray:
        """log N(y; f(z), sigma^2), broadcasting y against z."""
        y, z = np.asarray(y, np.float64), np.asarray(z, np.float64)
        r = (y - self.f(z)) / self.sigma
        return -0.5 * r**2 - math.log(self.sigma) - 0.5 * math.log(2 * math.pi)

    def log_prob(self, y, budget: int = 4_000_000) -> np.ndarray:
        """Exact log p*(y) = log int_0^1 N(y; f(z), sigma^2) dz, per point, in chunks
        whose [points, nodes] terms stay within `budget` elements."""
        return self._log_sum(y, self._z_nodes, self._log_w, budget)

    def log_prob_and_error(self, y, budget: int = 4_000_000) -> tuple[np.ndarray, np.ndarray]:
        """(log p*(y), each point's error estimate): its difference to the rule with half as many
        panels, which estimates that coarser rule's error (the kept one's is far smaller: Gauss-Legendre
        of n nodes a panel converges about 2^(2n) times faster per halving)."""
        value = self.log_prob(y, budget)
        return value, rule_difference(value, self._log_sum(y, self._coarse_nodes, self._coarse_log_w, budget))

    def _log_sum(self, y, nodes: np.ndarray, log_w: np.ndarray, budget: int) -> np.ndarray:
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        out = np.empty_like(y)
        chunk = max(1, budget // len(nodes))
        for start in range(0, y.size, chunk):
            yc = y[start:start + chunk, None]
            out[start:start + chunk] = logsumexp(self.log_likelihood(yc, nodes[None]) + log_w, axis=1)
        return out

    def posterior(self, y, z_grid) -> np.ndarray:
        """Exact density p*(z|y) at z_grid (in [0, 1]); rows are values of y."""
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        z = np.asarray(z_grid, dtype=np.float64)
        inside = (z >= 0) & (z <= 1)
        log_joint = self.log_likelihood(y[:, None], z[None])
        log_post = log_joint - self.log_prob(y)[:, None]
        return np.where(inside[None], np.exp(log_post), 0.0)

    def joint_density(self, y, z) -> np.ndarray:
        """p*(y, z) = N(y; f(z), sigma^2) on z in [0, 1] (the prior is uniform)."""
        z = np.asarray(z, np.float64)
        return np.where((z >= 0) & (z <= 1), np.exp(self.log_likelihood(y, z)), 0.0)



def make_splits(process: PaperProcess, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Independent train/val/test draws of y. Each split's stream is derived from
    (seed, split name) so that changing one split's size leaves the others alone."""
    out = {}
    for name, n in sizes.items():
        key = int.from_bytes(name.encode(), "little") % (2**31)
        ss = np.random.SeedSequence(entropy=seed, spawn_key=(key,))
        _, y = process.sample(n, ss.generate_state(1)[0])
        out[name] = y
    return out


class PaperSource(SplitsSection):
    """The paper's 1-D process (exact truth)."""
    name: Literal["paper"] = Field("paper", description="the data source; each has its own keys (the other "
                                   "sources follow, commented out)")


def load_paper(d: PaperSource) -> Source:
    process = PaperProcess(d.sigma)
    return Source(make_splits(process, d.sizes(), d.seed), process, 1)


SOURCE = DataSource(PaperSource, load_paper, data_dim=lambda d: 1, known_noise=True)
