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
on panels that have the kink z_l = 1/2 as an edge, float64 throughout (as paper.PaperProcess), adaptively
per point: each point is summed on a rule and on the rule with its panels halved, and refined (panels
halved again, that point alone) until the two differ by at most TRUTH_TOLERANCE. The difference is the
point's error estimate (log_prob_and_error); it estimates the coarser rule's error, and the finer rule,
whose value is kept, converges 2^(2 n) times faster per halving (n nodes a panel). Its memory is bounded
at any D and sigma: nodes and points go in chunks, and m enters through a few features of z (see
FoldedProcess._basis), so a point costs its rules' nodes whatever D is.
"""
from __future__ import annotations

import itertools
import math
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from .base import MAX_DATA_VALUES, DataSource, Source, SplitsSection
from .paper import kinked_rule, make_splits, rule_difference

MAX_TRUTH_TERMS = 5e10       # the truth: test points x quadrature nodes, ~4-20 ns each on 2 cores

AMPLITUDE = 1 / 8
GOLDEN = (math.sqrt(5) - 1) / 2
NODES_PER_PANEL = 8          # Gauss-Legendre nodes per panel and axis (measured choice: FoldedProcess._rule)
TRUTH_TOLERANCE = 1e-4       # nats per point, eval.tolerance's default, on the coarser rule: the kept one is far closer
MAX_REFINEMENTS = 3          # halvings past the first pair of rules: a point's last rule has at most
                             # 2^(3L) times the first refinement's nodes (check_truth counts the first two)


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
        # The first rule's panels: 1/4 of p(y|z)'s scale sigma / slope in 1-D, where nodes are cheap; in
        # 2-D twice that scale, narrowed as sqrt(50 / D) beyond D = 50, where the coordinates' evidence
        # narrows the posterior as 1 / sqrt(D). Each point then refines from there (log_prob_and_error).
        # Measured against rules of 16 nodes on panels half as wide: with 8 nodes, the first refinement
        # is within 1e-15 at D = 6, 4e-12 at D = 20, 3e-10 at D = 200 and 3e-12 at D = 1000
        # (tests/test_folded.py holds the adaptive rule to rules 4 times finer).
        default = 1 / 4 if latent_dim == 1 else 2 * min(1.0, math.sqrt(50 / data_dim))
        width = (panel_fraction or default) * self.sigma / self.max_slope()
        self._half_panels = max(2, math.ceil(0.5 / width))      # of the first rule, on each side of the kink
        self._rules: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._centre = np.where(k < latent_dim, 1 / 8, 0.0)                     # the middle of m's range
        self._w, self._freqs = self._basis()                                     # m - centre = F @ W
        self._gram = self._w @ self._w.T                                         # [P, P]

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
    def _rule(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        """Composite Gauss-Legendre on [0, 1] (nodes, log weights), the rule on each axis of the tensor
        product over [0, 1]^L, with the first rule's panels halved `level` times (both halves [0, 1/2]
        and [1/2, 1] get the same count, so the kink is an edge)."""
        if level not in self._rules:
            nodes, weights = kinked_rule(self._half_panels * 2 ** level, NODES_PER_PANEL)
            self._rules[level] = nodes, np.log(weights)
        return self._rules[level]

    @property
    def node_count(self) -> int:
        """The nodes every point costs at least: the first rule's and its first refinement's, each
        (nodes per axis)^L, never held whole (at L = 2 and sigma = 0.001 they are 1.8e9)."""
        return sum(len(self._rule(level)[0]) ** self.latent_dim for level in (0, 1))

    def _node_chunk(self, level: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The nodes start .. stop-1 of the rule at `level`, row-major: z [g, L], log weights [g]."""
        axis, log_w = self._rule(level)
        idx = np.unravel_index(np.arange(start, min(stop, len(axis) ** self.latent_dim)), (len(axis),) * self.latent_dim)
        return np.stack([axis[i] for i in idx], -1), sum(log_w[i] for i in idx)

    # m(z) is linear in a few features of z: m(z) - centre = F(z) @ W, F [..., P] with P <= L + 12
    # (the first L coordinates, and the cos and sin of 2 pi j.u and of pi j.z for each distinct
    # frequency vector j: cos(x + phi) = cos x cos phi - sin x sin phi). So the exponent's part that
    # couples y and z is ((y - centre) W^T) . F(z): P terms per point and node, not D. Measured at
    # D = 1000 on 590,000 nodes: their means [G, D] alone are 4.4 GiB; computed a chunk at a time,
    # 100 points took 40 s (the means' cosines and an [n, D] x [D, G] product), through F 1.4 s.
    def _basis(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """(W [P, D], the distinct frequency vectors [r, L] of the symmetric and the breaking part)."""
        D, L = self.data_dim, self.latent_dim
        rows, freqs = [np.eye(L, D)], []                          # (u_l - 1/2)^2 - 1/8 on coordinate l
        for part in (slice(L, D - self.breaking), slice(D - self.breaking, D)):
            j, which = np.unique(self.freq[part], axis=0, return_inverse=True)
            k = np.arange(D)[part]
            on_cos, on_sin = np.zeros((len(j), D)), np.zeros((len(j), D))
            on_cos[which.reshape(-1), k] = AMPLITUDE * np.cos(self.phase[part])
            on_sin[which.reshape(-1), k] = -AMPLITUDE * np.sin(self.phase[part])
            rows += [on_cos, on_sin]
            freqs.append(j)
        return np.concatenate(rows), freqs

    def _features(self, z: np.ndarray) -> np.ndarray:
        """F(z) [..., P], with m(z) - centre = F(z) @ W (mean's formulas, regrouped)."""
        u = (2 * z) % 1.0
        symmetric = 2 * math.pi * (u @ self._freqs[0].T)
        breaking = math.pi * (z @ self._freqs[1].T)
        return np.concatenate([(u - 0.5) ** 2 - 1 / 8, np.cos(symmetric), np.sin(symmetric),
                               np.cos(breaking), np.sin(breaking)], -1)

    def _point_terms(self, y: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
        """Per point, (b = (y - centre) W^T / sigma^2 [n, P], log N(y; centre, sigma^2 I) [n]), read
        `budget` values at a time, so that with F(z) and the node term of _node_terms
        log N(y; m(z), sigma^2 I) = log N(y; centre, sigma^2 I) + b . F(z) + node term.
        y and m are centred at the middle of m's range, which keeps the cancellation small: measured,
        within 3e-13 of the direct sum at D = 1000 (log p* about 900), 2e-15 at D = 6."""
        along, at_centre = np.empty((len(y), len(self._w))), np.empty(len(y))
        step = max(1, budget // self.data_dim)
        for s in range(0, len(y), step):
            b = y[s:s + step] - self._centre
            along[s:s + step] = b @ self._w.T / self.sigma ** 2
            at_centre[s:s + step] = self._log_normal(b, 0.0)
        return along, at_centre

    def _node_terms(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(F(z) [g, P], the node term -|m(z) - centre|^2 / 2 sigma^2 = -F W W^T F^T / 2 sigma^2 [g])."""
        f = self._features(z)
        return f, -0.5 * ((f @ self._gram) * f).sum(1) / self.sigma ** 2

    def log_prob(self, y, budget: int = 4_000_000) -> np.ndarray:
        """Exact log p*(y), y [n, D] (or [n] when D = 1) -> [n] (log_prob_and_error)."""
        return self.log_prob_and_error(y, budget)[0]

    def log_prob_and_error(self, y, budget: int = 4_000_000) -> tuple[np.ndarray, np.ndarray]:
        """(log p*(y) [n], each point's error estimate [n]): each point is summed on the first rule and
        its refinement, and refined alone until the last two agree within TRUTH_TOLERANCE (or
        MAX_REFINEMENTS more halvings are spent; its estimate then says by how much it missed). No
        array exceeds `budget` elements at any D (bar [n, P] and [n])."""
        y = self._rows(y)
        along, at_centre = self._point_terms(y, budget)
        value, error = np.empty(len(y)), np.full(len(y), np.inf)
        todo, coarse = np.arange(len(y)), self._log_sum(along, 0, budget)
        for level in range(1, 2 + MAX_REFINEMENTS):
            fine = self._log_sum(along[todo], level, budget)
            diff = rule_difference(fine, coarse)
            value[todo], error[todo] = fine, diff
            met = diff <= TRUTH_TOLERANCE
            todo, coarse = todo[~met], fine[~met]
            if not len(todo):
                break
        return at_centre + value, error

    def _log_sum(self, along: np.ndarray, level: int, budget: int) -> np.ndarray:
        """log of the sum over the rule at `level` of w exp(b . F(z) + node term), per point: the nodes
        go in chunks, the points in chunks under each, and each point's sum is accumulated as a running
        (peak, sum) of exponentials."""
        n, G = len(along), len(self._rule(level)[0]) ** self.latent_dim
        g = max(1, min(G, budget // 16))                  # nodes [g, L], features [g, P <= 14]
        c = max(1, budget // g)                           # terms [c, g]
        peak, total = np.full(n, -np.inf), np.zeros(n)
        with np.errstate(divide="ignore", invalid="ignore"):
            for k in range(0, G, g):
                z, log_w = self._node_chunk(level, k, k + g)
                f, node = self._node_terms(z)
                node += log_w
                for s in range(0, n, c):
                    t = along[s:s + c] @ f.T                                        # [c, g]
                    t += node
                    new = np.maximum(peak[s:s + c], t.max(1))
                    shift = np.where(np.isfinite(new), new, 0.0)   # a point no node reaches stays -inf
                    t -= shift[:, None]
                    total[s:s + c] = total[s:s + c] * np.exp(peak[s:s + c] - shift) + np.exp(t, out=t).sum(1)
                    peak[s:s + c] = new
            return peak + np.log(total)

    def posterior(self, y, z_grid, budget: int = 4_000_000) -> np.ndarray:
        """Exact density p*(z | y) at z_grid [G, L] (or [G] when L = 1); rows are points y. Only the
        answer [n, G] is whole; the rest goes in chunks, as in log_prob."""
        y = self._rows(y)
        z = np.asarray(z_grid, np.float64).reshape(-1, self.latent_dim)
        along, at_centre = self._point_terms(y, budget)
        log_post = np.empty((len(y), len(z)))
        g = max(1, budget // 16)
        for k in range(0, len(z), g):
            f, node = self._node_terms(z[k:k + g])
            np.matmul(along, f.T, out=log_post[:, k:k + g])
            log_post[:, k:k + g] += node
        log_post += (at_centre - self.log_prob(y, budget))[:, None]
        inside = ((z >= 0) & (z <= 1)).all(-1)
        return np.where(inside[None], np.exp(log_post), 0.0)

    def _rows(self, y) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if y.ndim == 1 and self.data_dim == 1:
            y = y[:, None]
        y = np.atleast_2d(y)
        if y.shape[-1] != self.data_dim:
            raise ValueError(f"y has {y.shape[-1]} columns; this process has data_dim = {self.data_dim}")
        return y



def mirror_images(z: np.ndarray) -> np.ndarray:
    """The 2^L points that share z's fold, u(z): z [..., L] -> [2^L, ..., L]."""
    z = np.asarray(z, np.float64)
    shifts = np.array(list(itertools.product((0.0, 0.5), repeat=z.shape[-1])))
    return (z[None] + shifts.reshape((-1,) + (1,) * (z.ndim - 1) + (z.shape[-1],))) % 1.0


class FoldedSource(SplitsSection):
    """The paper's process lifted to data_dim observed and latent_dim latent dimensions (mogvae.data.folded), exact truth."""
    name: Literal["folded"] = "folded"
    data_dim: int = Field(2, ge=1, le=1000, description="D, observed dimensions")
    latent_dim: Literal[1, 2] = Field(1, description="L, the process's latent dimensions (the truth is a quadrature)")
    breaking: int | Literal["all"] = Field(0, description="coordinates that break the fold symmetry (0: the true "
                                           "posterior keeps its 2^L mirrored modes; 'all': every coordinate past "
                                           "the first L)")

    @model_validator(mode="after")
    def _dimensions_fit(self):
        if self.data_dim < self.latent_dim:
            raise ValueError(f"data.data_dim = {self.data_dim} is less than data.latent_dim = {self.latent_dim}: each "
                             f"latent coordinate has its own observed coordinate")
        if self.breaking != "all" and not 0 <= self.breaking <= self.data_dim - self.latent_dim:
            raise ValueError(f"data.breaking = {self.breaking} must be in [0, data_dim - latent_dim] = "
                             f"[0, {self.data_dim - self.latent_dim}] (or 'all')")
        return self

    @model_validator(mode="after")
    def _data_fit_in_memory(self):
        values = (self.n_train + self.n_val + self.n_test) * self.data_dim
        if values > MAX_DATA_VALUES:
            fit = MAX_DATA_VALUES // self.data_dim - self.n_val - self.n_test
            raise ValueError(f"data.n_train + n_val + n_test = {self.n_train + self.n_val + self.n_test:,} points of "
                             f"data_dim = {self.data_dim} is {values:,} values, more than mogvae holds in memory "
                             f"({MAX_DATA_VALUES:,})" + (f": set data.n_train <= {fit:,}" if fit >= 1 else ""))
        return self

    @property
    def breaking_count(self) -> int:
        return self.data_dim - self.latent_dim if self.breaking == "all" else self.breaking


def check_truth(data) -> None:
    """Refuse a folded truth that would take hours after training: its memory is bounded (data/folded.py),
    but each test point costs at least node_count terms (its first rule and first refinement), which
    grow as 1 / sigma^L."""
    def terms(sigma: float) -> int:
        return data.n_test * FoldedProcess(data.data_dim, data.latent_dim, data.breaking_count, sigma).node_count
    if terms(data.sigma) <= MAX_TRUTH_TERMS:
        return
    nodes = terms(data.sigma) // data.n_test
    fix = f"set data.n_test <= {int(MAX_TRUTH_TERMS // nodes):,}"
    # the least sigma that fits, within 7% (nodes fall as sigma grows, down to the coarsest rule)
    sigma = next((s for s in np.geomspace(data.sigma, 1e3, 200) if terms(s) <= MAX_TRUTH_TERMS), None)
    if sigma is not None:
        digits = 10.0 ** (math.floor(math.log10(sigma)) - 1)
        fix += f" or data.sigma >= {math.ceil(sigma / digits) * digits:.2g}"    # rounded up: it still fits
    raise ValueError(f"data.latent_dim = {data.latent_dim} with data.sigma = {data.sigma:g}: the truth's quadrature "
                     f"takes at least {nodes:,} nodes a point, and data.n_test = {data.n_test:,} points make {terms(data.sigma):.1e} "
                     f"terms, more than it computes in reasonable time ({MAX_TRUTH_TERMS:.0e}): {fix}")


def load_folded(d: FoldedSource) -> Source:
    process = FoldedProcess(d.data_dim, d.latent_dim, d.breaking_count, d.sigma)
    splits = make_splits(process, d.sizes(), d.seed)
    if d.data_dim == 1:      # one column is the 1-D case: the 1-D metrics and figures apply
        splits = {k: v[:, 0] for k, v in splits.items()}
    return Source(splits, process, d.data_dim)


SOURCE = DataSource(FoldedSource, load_folded, data_dim=lambda d: d.data_dim, check=check_truth, known_noise=True)
