"""Exact (quadrature) evaluation of a model with a latent of dimension <= 2.

Model marginal log p(y) = log int p(y|z) p(z) dz: trapezoid rule on a uniform
grid covering every prior component to +- `span` scales. For smooth, rapidly
decaying integrands the uniform trapezoid rule converges faster than any power
of the spacing, which is why the default decoder activation is smooth (SiLU).
The decoder is evaluated once on the grid and reused for every y. The grid
has an odd number of nodes so every other node forms a coarse grid of the
same rule: |fine - coarse| bounds the coarse error and so, conservatively, the
fine one.

ELBO over q: Gauss-Hermite quadrature on each (Gaussian) component of q,
weighted by the mixture weights -- the stratified ELBO with the noise replaced
by Hermite nodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .model import VAE
from .objectives import log_weights

MAX_LATENT = 2
F64 = torch.float64  # densities and sums; the networks run in the precision they were trained in


@dataclass(frozen=True)
class Grid:
    nodes: torch.Tensor    # [R, G, D]
    log_w: torch.Tensor    # [R, G]  log quadrature weights (fine rule)
    coarse: torch.Tensor   # [G'] indices of the coarse sub-grid
    log_w_coarse: torch.Tensor  # [R, G']
    axes: tuple[torch.Tensor, ...]  # per-axis nodes, each [R, n]


def _trapezoid_log_weights(h: torch.Tensor, n: int) -> torch.Tensor:
    """log of the trapezoid weights on n uniform nodes of spacing h [R] -> [R, n]."""
    w = h[:, None].expand(-1, n).clone()
    w[:, 0] /= 2
    w[:, -1] /= 2
    return torch.log(w)


def latent_grid(model: VAE, size: int, span: float) -> Grid:
    """Uniform grid over the prior's mass, one per replica (each replica's own range)."""
    if size % 2 == 0:
        raise ValueError(f"grid size must be odd, got {size}")
    prior = model.prior().to(F64)
    D = prior.loc.shape[-1]
    if D > MAX_LATENT:
        raise ValueError(f"quadrature supports latent_dim <= {MAX_LATENT}, got {D}")
    loc, scale = prior.loc[:, 0, 0], prior.scale[:, 0, 0]                  # [R, K, D]
    lo = (loc - span * scale).amin(1)                                      # [R, D]
    hi = (loc + span * scale).amax(1)
    t = torch.linspace(0, 1, size, dtype=loc.dtype, device=loc.device)
    axes = [lo[:, d, None] + (hi - lo)[:, d, None] * t for d in range(D)]  # each [R, n]
    h = [(hi - lo)[:, d] / (size - 1) for d in range(D)]
    fine = [_trapezoid_log_weights(hd, size) for hd in h]
    coarse_n = (size + 1) // 2
    coarse = [_trapezoid_log_weights(2 * hd, coarse_n) for hd in h]
    idx = torch.arange(0, size, 2, device=loc.device)
    if D == 1:
        return Grid(axes[0][..., None], fine[0], idx, coarse[0], tuple(axes))
    # tensor product, row-major: node (i, j) -> i * size + j
    nodes = torch.stack([torch.stack(torch.meshgrid(a0, a1, indexing="ij"), -1).reshape(-1, 2)
                         for a0, a1 in zip(axes[0], axes[1])])             # [R, G, 2]
    log_w = (fine[0][:, :, None] + fine[1][:, None, :]).reshape(len(lo), -1)
    cidx = (idx[:, None] * size + idx[None, :]).reshape(-1)
    log_wc = (coarse[0][:, :, None] + coarse[1][:, None, :]).reshape(len(lo), -1)
    return Grid(nodes, log_w, cidx, log_wc, tuple(axes))


def _as_batch(y, R: int, device) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y, dtype=np.float64), dtype=F64, device=device)
    y = y.reshape(len(y), -1)                                  # [N, Y]
    return y[None].expand(R, *y.shape)                         # [R, N, Y]


def _device(model: VAE) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _grid_terms(model: VAE, grid: Grid):
    """Decoder mean, 1/sigma and log(w p(z) / sigma sqrt(2 pi)) at every node,
    so that log(w p(y|z) p(z)) = -0.5 ((y - mean) / sigma)^2 + offset."""
    z = grid.nodes[:, :, None, :]                              # [R, G, 1, D]
    mean = model.decoder.mean(z)[:, :, 0]                      # [R, G, Y], decoder evaluated once
    log_sigma = model.decoder.log_noise_as(F64)[:, 0]          # [R, 1, Y]
    log_prior = model.prior().to(F64).log_prob(z)[:, :, 0]     # [R, G]
    offset = log_prior - (log_sigma + 0.5 * math.log(2 * math.pi)).sum(-1)  # [R, G]
    return mean, torch.exp(-log_sigma), offset


def _log_terms(y: torch.Tensor, mean, inv_sigma, offset) -> torch.Tensor:
    """log p(y|z_g) p(z_g) for a chunk of y [R, n, Y] -> [R, G, n], computed in place."""
    t = mean[:, :, None, :] - y[:, None]                       # [R, G, n, Y]
    t.mul_(inv_sigma[:, :, None]).square_()
    t = t.sum(-1).mul_(-0.5)
    return t.add_(offset[:, :, None])


@torch.no_grad()
def log_marginal(model: VAE, y, grid: Grid, chunk: int = 256) -> "Marginal":
    """Model log p(y) per replica and point, by the fine and the coarse rule."""
    mean, inv_sigma, offset = _grid_terms(model, grid)
    y = _as_batch(y, grid.nodes.shape[0], grid.nodes.device)
    fine, coarse, edge = [], [], []
    outer = _outer_nodes(grid)
    for s in range(0, y.shape[1], chunk):
        terms = _log_terms(y[:, s:s + chunk], mean, inv_sigma, offset)       # [R, G, n]
        coarse.append(torch.logsumexp(terms[:, grid.coarse] + grid.log_w_coarse[:, :, None], dim=1))
        terms.add_(grid.log_w[:, :, None])
        fine.append(torch.logsumexp(terms, dim=1))
        edge.append(torch.logsumexp(terms[:, outer], dim=1) - fine[-1])
    return Marginal(torch.cat(fine, 1), torch.cat(coarse, 1), torch.exp(torch.cat(edge, 1)))


@dataclass(frozen=True)
class Marginal:
    """log p(y) [R, N] by the fine and the coarse rule, and the posterior mass
    that lies in the grid's outer 2% on either side: near 1e-30 when the grid
    covers the posterior, large when it is truncated."""
    log_p: torch.Tensor
    log_p_coarse: torch.Tensor
    edge_mass: torch.Tensor


def _outer_nodes(grid: Grid, fraction: float = 0.02) -> torch.Tensor:
    n = grid.axes[0].shape[1]
    k = max(1, int(fraction * n))
    idx = torch.arange(n)
    edge_1d = (idx < k) | (idx >= n - k)
    if len(grid.axes) == 1:
        return edge_1d.nonzero().flatten()
    return (edge_1d[:, None] | edge_1d[None, :]).reshape(-1).nonzero().flatten()


@torch.no_grad()
def posterior_on_grid(model: VAE, y, grid: Grid) -> torch.Tensor:
    """The model's exact posterior density p(z|y) at the grid nodes: [R, N, G]."""
    mean, inv_sigma, offset = _grid_terms(model, grid)
    terms = _log_terms(_as_batch(y, grid.nodes.shape[0], grid.nodes.device), mean, inv_sigma, offset)
    log_p = torch.logsumexp(terms + grid.log_w[:, :, None], dim=1, keepdim=True)
    return torch.exp(terms - log_p).transpose(1, 2)


def hermite_rule(n: int, dim: int, dtype=torch.float64):
    """Nodes [J, D] and weights [J] for E_{N(0, I_D)}[g] with J = n^D."""
    x, w = np.polynomial.hermite.hermgauss(n)
    x, w = x * math.sqrt(2.0), w / math.sqrt(math.pi)
    grids = np.meshgrid(*([x] * dim), indexing="ij")
    nodes = np.stack([g.reshape(-1) for g in grids], -1)
    weights = np.prod(np.stack(np.meshgrid(*([w] * dim), indexing="ij"), -1).reshape(-1, dim), -1)
    return torch.as_tensor(nodes, dtype=dtype), torch.as_tensor(weights, dtype=dtype)


class InterpolatedDecoder:
    """f_phi tabulated once on a fine uniform grid and read back by cubic
    (Catmull-Rom) interpolation, so that the ELBO's Gauss-Hermite nodes -- K * J
    per data point -- cost an index computation instead of an MLP evaluation.
    1-D latents only; the table spacing makes the interpolation error ~1e-9."""

    def __init__(self, model: VAE, lo: torch.Tensor, hi: torch.Tensor, spacing: float = 2e-3,
                 max_nodes: int = 400_001):
        R = lo.shape[0]
        self.n = int(min(max_nodes, max(1001, math.ceil(float((hi - lo).max()) / spacing) + 4)))
        self.lo = lo - 2 * (hi - lo) / self.n                             # [R], a margin for the stencil
        self.h = (hi - self.lo + 2 * (hi - lo) / self.n) / (self.n - 1)  # [R]
        t = torch.arange(self.n, dtype=F64, device=lo.device)
        nodes = self.lo[:, None] + self.h[:, None] * t                    # [R, n]
        self.values = model.decoder.mean(nodes[:, :, None, None])[:, :, 0]  # [R, n, Y]
        self.R = R

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """z [R, S, B, 1] -> f_phi(z) [R, S, B, Y]."""
        R, S, B, _ = z.shape
        t = (z.reshape(R, -1) - self.lo[:, None]) / self.h[:, None]      # [R, S*B]
        i = t.floor().clamp(1, self.n - 3)
        u = (t - i)[..., None]
        i = i.long()
        Y = self.values.shape[-1]
        p = [torch.gather(self.values, 1, (i + k)[..., None].expand(-1, -1, Y)) for k in (-1, 0, 1, 2)]
        out = 0.5 * (2 * p[1] + (p[2] - p[0]) * u + (2 * p[0] - 5 * p[1] + 4 * p[2] - p[3]) * u**2
                     + (3 * (p[1] - p[2]) + p[3] - p[0]) * u**3)
        return out.reshape(R, S, B, Y)


@torch.no_grad()
def quadrature_elbo(model: VAE, y, n_nodes: int, interpolate: bool = True) -> torch.Tensor:
    """ELBO(y) = sum_k pi_k E_{q_k}[log p(y|z) + log p(z) - log q(z|y)] by
    Gauss-Hermite on each component: [R, N]. With a 1-D latent the decoder is
    read from an `InterpolatedDecoder` table unless `interpolate` is False."""
    device = _device(model)
    R, K, D = model.prior().loc.shape[0], model.posterior.k, model.latent_dim
    nodes, weights = hermite_rule(n_nodes, D)
    nodes, weights = nodes.to(device), weights.to(device)
    y = _as_batch(y, R, device)
    decoder = None
    if interpolate and D == 1:
        reach = float(nodes.abs().max())
        q = model.posterior(y).to(F64)                              # encoder only: cheap
        lo = (q.loc - reach * q.scale).flatten(1).amin(1)
        hi = (q.loc + reach * q.scale).flatten(1).amax(1)
        decoder = InterpolatedDecoder(model, lo, hi)
    out = []
    # Chunks of ~32k latent nodes keep the [R, J, K, B, K] mixture terms in cache (measured: 3x faster than 512 points).
    chunk = max(8, 32_768 // (len(nodes) * K))
    for s in range(0, y.shape[1], chunk):
        yc = y[:, s:s + chunk]
        B = yc.shape[1]
        eps = nodes[None, :, None, None, :].expand(R, -1, K, B, D)  # [R, J, K, B, D]
        log_w, pi = log_weights(model, yc, eps, decoder_mean=decoder)  # [R, J, K, B]
        out.append(((log_w * pi).sum(2) * weights[None, :, None]).sum(1))
    return torch.cat(out, 1)
