"""What an estimator of log p_theta(y) is: a name, whether its error is a bound, where it
fits, and the two things it computes (an Estimate on given points; evaluation's terms).
Each estimator is one module of this package; likelihood.ESTIMATORS registers them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Estimate:
    """log p(y) per replica and point, [R, N] (float64), with its error [R, N]:
    a standard error ("importance") or the quadrature rule's bound ("quadrature")."""
    value: torch.Tensor
    error: torch.Tensor
    method: str


@dataclass(frozen=True)
class Estimator:
    """A way to compute log p_theta(y), chosen by name or, for "auto", as the first registered
    one that fits (quadrature before importance sampling: exact where the latent allows it)."""
    name: str
    exact: bool     # its error is a bound, not a standard error: the gap search and the training-grid check use it
    fits: Callable[[int, int], bool]                 # (latent_dim, eval.grid_size) -> usable
    log_likelihood: Callable[..., Estimate]          # (model, y, *, n_samples, seeds, grid_size, grid_span)
    evaluation_terms: Callable[..., dict]            # (model, y_test, y_grid, eval config, seeds, phases=, elbo=) -> terms
    needs: str = ""                                  # where it fits, in words, for a refusal
    affordable: Callable[[int, int], bool] | None = None   # where "auto" takes it (default: wherever it fits)

    def chosen_by_auto(self, latent_dim: int, grid_size: int) -> bool:
        return self.fits(latent_dim, grid_size) and (self.affordable is None or self.affordable(latent_dim, grid_size))
