"""The paper's process lifted to D observed dimensions and 1 or 2 latent ones, with exact truth.

z ~ U(0, 1)^L (L = 1 or 2), y | z ~ N(m(z), sigma^2 I_D). With the fold u_l = 2 z_l mod 1
(z_l and z_l + 1/2 share it), the mean's coordinates k = 0 .. D-1 are

    k < L                    m_k = (u_k - 1/2)^2                              the paper's f, on latent k
    L <= k < D - breaking    m_k = A cos(2 pi (j_k . u) + phi_k)              symmetric: a function of u
    k >= D - breaking        m_k = A cos(pi (j_k . z) + phi_k)                breaks the fold

with A = 1/8 (the paper's f spans [0, 1/4]), integer frequencies j_k[l] = 1 + (k + l) mod 3,
and phases phi_k = 2 pi frac(k (sqrt(5) - 1) / 2). Every coordinate but the breaking ones is a
function of u alone, so p*(z | y) keeps the 2^L mirrored modes of the paper's posterior at every D;
each breaking coordinate tells the mirrored points apart, and the posterior becomes unimodal as
breaking coordinates accumulate evidence. L = 1, D = 1 is the paper's process exactly.

log p*(y) = log of the integral of N(y; m(z), sigma^2 I) over [0, 1]^L, by composite Gauss-Legendre
on panels that have the kink z_l = 1/2 as an edge and are narrower than sigma over the largest slope
of m, float64 throughout (as data.PaperProcess).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.special import logsumexp

from .data import kinked_rule

AMPLITUDE = 1 / 8
GOLDEN = (math.sqrt(5) - 1) / 2
NODES_PER_PANEL = 16


class FoldedProcess:
    """y in R^D from a latent in [0, 1]^L through the fold (module docstring), with its truth."""

    name = "folded"

    def __init__(self, data_dim: int = 1, latent_dim: int = 1, breaking: int = 0, sigma: float = 0.1,
                 panel_fraction: float | None = None):
        if latent_dim not in (1, 2):
            raise ValueError(f"latent_dim must be 1 or 2 (the truth is a quadrature over z), got {latent_dim!r}")
        if not latent_dim <= data_dim <= 1000:
            raise ValueError(f"data_dim must be in [latent_dim, 1000] = [{latent_dim}, 1000], got {data_dim!r}")
        if not 0 <= breaking <= data_dim - latent_dim:
            raise ValueError(f"breaking must be in [0, data_dim - latent_dim] = [0, {data_dim - latent_dim}], "
                             f"got {breaking!r}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
        self.data_dim, self.latent_dim, self.breaking, self.sigma = data_dim, latent_dim, breaking, float(sigma)
        k = np.arange(data_dim)
        self.freq = 1 + (k[:, None] + np.arange(latent_dim)[None]) % 3          # [D, L]
        self.phase = 2 * math.pi * ((k * GOLDEN) % 1.0)                          # [D]
        # Panels 1/8 of p(y|z)'s scale in 1-D (as data.PaperProcess); in 2-D, where nodes square,
        # the full scale, which 16 Gauss-Legendre nodes per panel still resolve to 1e-12 (tested).
        self._nodes, self._log_w = self._rule(panel_fraction or (1 / 8 if latent_dim == 1 else 1.0))

    # -- the process ------------------------------------------------------------------------------
    def mean(self, z) -> np.ndarray:
        """m(z): z [..., L] in [0, 1]^L -> [..., D]."""
        z = np.asarray(z, dtype=np.float64)
        u = (2 * z) % 1.0
        L, D = self.latent_dim, self.data_dim
        out = np.empty(z.shape[:-1] + (D,))
        out[..., :L] = (u - 0.5) ** 2
        symmetric = slice(L, D - self.breaking)
        out[..., symmetric] = AMPLITUDE * np.cos(2 * math.pi * (u @ self.freq[symmetric].T) + self.phase[symmetric])
        breaking = slice(D - self.breaking, D)
        out[..., breaking] = AMPLITUDE * np.cos(math.pi * (z @ self.freq[breaking].T) + self.phase[breaking])
        return out

    def f(self, z) -> np.ndarray:
        """With L = 1, the first coordinate's mean at latents z [...]: the paper's f (1-D figures)."""
        return self.mean(np.asarray(z, np.float64)[..., None])[..., 0]

    def max_slope(self) -> float:
        """An upper bound on |dm_k/dz_l| over k, l: the paper's f has 2; a symmetric cosine 4 pi j A
        (du/dz = 2), a breaking one pi j A."""
        return max(2.0, 4 * math.pi * int(self.freq.max()) * AMPLITUDE) if self.data_dim > self.latent_dim else 2.0

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """n pairs (z [n, L], y [n, D]), float64, reproducibly from `seed`."""
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        rng = np.random.default_rng(seed)
        z = rng.uniform(0.0, 1.0, size=(int(n), self.latent_dim))
        return z, self.mean(z) + self.sigma * rng.standard_normal((int(n), self.data_dim))

    def log_likelihood(self, y, z) -> np.ndarray:
        """log N(y; m(z), sigma^2 I), y [..., D] broadcast against z [..., L] -> [...]."""
        return self._log_normal(np.asarray(y, np.float64), self.mean(z))

    def _log_normal(self, y: np.ndarray, mean: np.ndarray) -> np.ndarray:
        r = (y - mean) / self.sigma
        return -0.5 * (r * r).sum(-1) - self.data_dim * (math.log(self.sigma) + 0.5 * math.log(2 * math.pi))

    # -- the truth --------------------------------------------------------------------------------
    def _rule(self, panel_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Tensor-product composite Gauss-Legendre on [0, 1]^L: nodes [G, L], log weights [G].
        In z, p(y|z) varies on the scale sigma / slope; panels a `panel_fraction` of that wide
        (both halves [0, 1/2] and [1/2, 1] get the same count, so the kink is an edge)."""
        width = panel_fraction * self.sigma / self.max_slope()
        nodes, weights = kinked_rule(max(16, math.ceil(0.5 / width)), NODES_PER_PANEL)
        grid = np.stack(np.meshgrid(*[nodes] * self.latent_dim, indexing="ij"), -1).reshape(-1, self.latent_dim)
        log_w = sum(np.log(g) for g in np.meshgrid(*[weights] * self.latent_dim, indexing="ij")).ravel()
        return grid, log_w

    def log_prob(self, y, budget: int = 4_000_000) -> np.ndarray:
        """Exact log p*(y), y [n, D] (or [n] when D = 1) -> [n], in chunks of `budget` terms."""
        y = self._rows(y)
        out = np.empty(len(y))
        m = self.mean(self._nodes)                                              # [G, D]
        chunk = max(1, budget // (len(self._nodes) * self.data_dim))
        for s in range(0, len(y), chunk):
            log_lik = self._log_normal(y[s:s + chunk, None, :], m[None])            # [c, G]: the mean once
            out[s:s + chunk] = logsumexp(log_lik + self._log_w, axis=1)
        return out

    def posterior(self, y, z_grid) -> np.ndarray:
        """Exact density p*(z | y) at z_grid [G, L] (or [G] when L = 1); rows are points y."""
        y = self._rows(y)
        z = np.asarray(z_grid, np.float64).reshape(-1, self.latent_dim)
        inside = ((z >= 0) & (z <= 1)).all(-1)
        log_post = self.log_likelihood(y[:, None, :], z[None]) - self.log_prob(y)[:, None]
        return np.where(inside[None], np.exp(log_post), 0.0)

    def _rows(self, y) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if y.ndim == 1 and self.data_dim == 1:
            y = y[:, None]
        y = np.atleast_2d(y)
        if y.shape[-1] != self.data_dim:
            raise ValueError(f"y has {y.shape[-1]} columns; this process has data_dim = {self.data_dim}")
        return y

    def describe(self) -> dict:
        return {"name": self.name, "data_dim": self.data_dim, "latent_dim": self.latent_dim,
                "breaking": self.breaking, "sigma": self.sigma}


def mirror_images(z: np.ndarray) -> np.ndarray:
    """The 2^L points that share z's fold, u(z): z [..., L] -> [2^L, ..., L]."""
    z = np.asarray(z, np.float64)
    shifts = np.array(list(itertools.product((0.0, 0.5), repeat=z.shape[-1])))
    return (z[None] + shifts.reshape((-1,) + (1,) * (z.ndim - 1) + (z.shape[-1],))) % 1.0
