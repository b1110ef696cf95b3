"""The latent grid: uniform trapezoid nodes over the prior's reach (and, given y, the
posterior's), one grid per replica. Quadrature evaluation (estimators/quadrature.py)
integrates on it, and so does the exact training objective (objectives/exact.py):
it lives with the model, below both, because it reads nothing but the model's reach."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .distributions import box
from .vae import VAE

MAX_LATENT = 2       # the grid's tensor product stops being affordable beyond two latent dimensions
F64 = torch.float64  # densities and sums; the networks run in the precision they were trained in


@dataclass(frozen=True)
class Grid:
    nodes: torch.Tensor    # [R, G, D]
    log_w: torch.Tensor    # [R, G]  log quadrature weights (fine rule)
    coarse: torch.Tensor   # [G'] indices of the coarse sub-grid (every other node of the core)
    log_w_coarse: torch.Tensor  # [R, G']
    axes: tuple[torch.Tensor, ...]  # per-axis nodes, each [R, n]
    core: slice = field(default_factory=lambda: slice(None))  # the nodes covering the prior, where log p(y) is integrated; the rest serve q


def trapezoid_log_weights(h: torch.Tensor, n: int) -> torch.Tensor:
    """log of the trapezoid weights on n uniform nodes of spacing h [R] -> [R, n]."""
    w = h[:, None].expand(-1, n).clone()
    w[:, 0] /= 2
    w[:, -1] /= 2
    return torch.log(w)


def latent_grid(model: VAE, size: int, span: float, y=None, max_size: int = 20_001, q=None) -> Grid:
    """Uniform grid, one per replica, over every prior component to +- `span`
    scales and, when `y` is given, over every component of q(z|y) too (so the
    ELBO's integrand is covered). `size` nodes span the prior; a wider range gets
    more nodes at the same spacing, up to `max_size`. `q` (batch over y) stands in for
    the encoder's posterior (the gap decomposition's optimized q)."""
    if size % 2 == 0:
        raise ValueError(f"grid size must be odd, got {size}")
    prior = model.prior().to(F64)
    D = model.latent_dim
    if D > MAX_LATENT:
        raise ValueError(f"quadrature supports latent_dim <= {MAX_LATENT}, got {D}")
    p_lo, p_hi = box(*prior.reach(span))                                   # [R, D]
    lo, hi = p_lo, p_hi
    spacing = (hi - lo) / (size - 1)
    if y is not None:
        q = (model.posterior(as_batch(y, lo.shape[0], lo.device)) if q is None else q).to(F64)
        q_lo, q_hi = box(*q.reach(span))
        lo, hi = torch.minimum(lo, q_lo), torch.maximum(hi, q_hi)
        need = int(((hi - lo) / spacing).max().ceil()) + 1
        size = min(max_size if D == 1 else size, max(size, need + (need + 1) % 2))
    t = torch.linspace(0, 1, size, dtype=lo.dtype, device=lo.device)
    axes = [lo[:, d, None] + (hi - lo)[:, d, None] * t for d in range(D)]  # each [R, n]
    h = [(hi - lo)[:, d] / (size - 1) for d in range(D)]
    fine = [trapezoid_log_weights(hd, size) for hd in h]
    if D == 1:
        # the core: the nodes over the prior's reach (an even start, so the coarse rule is every other node)
        i0 = int(((p_lo[:, 0] - lo[:, 0]) / h[0]).round().min()) // 2 * 2
        i1 = int(((p_hi[:, 0] - lo[:, 0]) / h[0]).round().max()) + 1
        core = slice(i0, min(i1, size))
        idx = torch.arange(core.start, core.stop, 2, device=lo.device)
        log_wc = torch.log(2 * h[0])[:, None].expand(-1, len(idx))    # integrand ~e^-32 at the ends
        return Grid(axes[0][..., None], fine[0], idx, log_wc, tuple(axes), core)
    coarse_n = (size + 1) // 2
    coarse = [trapezoid_log_weights(2 * hd, coarse_n) for hd in h]
    idx = torch.arange(0, size, 2, device=lo.device)
    # tensor product, row-major: node (i, j) -> i * size + j
    nodes = torch.stack([torch.stack(torch.meshgrid(a0, a1, indexing="ij"), -1).reshape(-1, 2)
                         for a0, a1 in zip(axes[0], axes[1])])             # [R, G, 2]
    log_w = (fine[0][:, :, None] + fine[1][:, None, :]).reshape(len(lo), -1)
    cidx = (idx[:, None] * size + idx[None, :]).reshape(-1)
    log_wc = (coarse[0][:, :, None] + coarse[1][:, None, :]).reshape(len(lo), -1)
    return Grid(nodes, log_w, cidx, log_wc, tuple(axes))


def as_batch(y, R: int, device) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y, dtype=np.float64), dtype=F64, device=device)
    y = y.reshape(len(y), -1)                                  # [N, Y]
    return y[None].expand(R, *y.shape)                         # [R, N, Y]
