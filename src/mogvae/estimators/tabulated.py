"""The model as the gap search sees it with a 1-D latent: the decoder's mean f(z) read from a table, and
a prior of several components too (TabulatedPrior).

The search evaluates log p(y, z) at its rule's nodes (gaps.search_elbo), per point, per step, and
most of its cost was the decoder's network (about 60% of the search, measured on a trained mixture-both
run). With a 1-D latent f is one function of z for every point: it is computed once per replica, with
its derivative (by autograd, the network's own), on TABLE_NODES uniform nodes over the prior's
+-TABLE_SPAN scales, and read between them by cubic Hermite interpolation (error at most
h^4 max|f''''| / 384: h is about 1e-3 for a standard-normal prior). Beyond the table f goes on as the
straight line of its end (as a network of SiLU or tanh units does, far out); only a q beyond the prior's
12 scales meets that, and the polish below corrects it. The table does not depend on the points, so a
point's search stays the same whatever points are searched beside it (gaps._value_and_gradient).

The interpolant is smooth where the float32 network is a staircase in z (its input rounded to float32:
up to 7.6e-6 apart in f on a steep test model, whatever the table's size), which a narrow q can feel: on
that model a search on the table alone ended up to 2.6e-4 nats below one on the network. So the search's
last pass (the polish) runs on the network itself, and ELBO* is scored with it by evaluation's grid rule
(gaps.gap_metrics): the table only steers the search, as the search's rules do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..model.decoders import GaussianDecoder
from ..model.layers import replica_count
from ..model.vae import VAE
from .quadrature import F64

TABLE_NODES = 32001    # nodes of the table, per replica
TABLE_SPAN = 12.0      # the table covers every prior component to +- this many of its scales
MAX_TABLE = 50_000_000   # values in a table (400 MB with its slopes); a larger one (many observed dimensions) is not made
PRIOR_STEPS = 0.1      # the prior is tabulated where the table's step is at most this many of its narrowest
                       # component's scales: log p within 1.1e-6 nats measured at 0.075 (a scale of 0.01)
SMOOTH = (nn.Tanh, nn.SiLU, nn.Softplus)   # activations whose network a cubic interpolant follows (not ReLU's kinks)


@dataclass(frozen=True)
class TabulatedDecoder:
    """f(z) by cubic Hermite interpolation of values and derivatives at uniform nodes, per replica:
    lo, h [R]; values, slopes [R, G, Y]. The rest (the noise, the likelihood) is the decoder's own."""
    decoder: GaussianDecoder
    lo: torch.Tensor
    h: torch.Tensor
    values: torch.Tensor
    slopes: torch.Tensor

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """f(z): z [R, S, B, 1] -> [R, S, B, Y], differentiable in z; element by element (no sums), so
        a value does not depend on the others computed with it."""
        return _hermite(self.lo, self.h, self.values, self.slopes, z)

    def log_noise_as(self, dtype: torch.dtype) -> torch.Tensor:
        return self.decoder.log_noise_as(dtype)

    def log_prob_from_mean(self, y: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return self.decoder.log_prob_from_mean(y, mean)

    def log_prob(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.decoder.log_prob_from_mean(y, self.mean(z))


def _hermite(lo: torch.Tensor, h: torch.Tensor, values: torch.Tensor, slopes: torch.Tensor,
             z: torch.Tensor) -> torch.Tensor:
    """A table's cubic Hermite interpolant (lo, h [R]; values, slopes [R, G, Y]) at z [R, S, B, 1]:
    [R, S, B, Y], the straight lines of its ends beyond it."""
    R, S, B, _ = z.shape
    G, Y = values.shape[1:]
    u = (z.reshape(R, S * B) - lo[:, None]) / h[:, None]
    # a NaN z (a search's step gone wrong) reads node 0 and stays NaN in value, which the line search
    # rejects; as an index it would be -2^63 and stop the whole evaluation (it did, in a noise study)
    i = torch.nan_to_num(u.detach(), nan=0.0).floor().clamp(0, G - 2).long()
    t = (u - i)[..., None]                                                  # in [0, 1] inside the table
    at = i[..., None].expand(-1, -1, Y)
    step = h[:, None, None]
    f0, f1 = values.gather(1, at), values.gather(1, at + 1)
    d0, d1 = slopes.gather(1, at) * step, slopes.gather(1, at + 1) * step
    t2, t3 = t * t, t * t * t
    inside = (2 * t3 - 3 * t2 + 1) * f0 + (t3 - 2 * t2 + t) * d0 + (3 * t2 - 2 * t3) * f1 + (t3 - t2) * d1
    below, above = u[..., None] < 0, u[..., None] > G - 1
    out = torch.where(below, f0 + t * d0, torch.where(above, f1 + (t - 1) * d1, inside))   # straight lines beyond
    return out.reshape(R, S, B, Y)


@dataclass(frozen=True)
class TabulatedPrior:
    """A smooth prior of several components (a mixture, a VampPrior of Gaussians) as the search reads it:
    log p(z) by cubic Hermite interpolation of its values and derivatives on the decoder's nodes, where the
    prior itself evaluates every component at every node (a 10-component mixture was about a fifth of a
    mixture-both search's forward pass). Calling it gives itself, as calling a prior module gives its
    distribution; what else the search reads (its reach, for the posterior start's grid) is the prior's own.
    Beyond the table log p goes on as a straight line, above the true one: only a q beyond the prior's 12
    scales meets that, and the polish on the network corrects it."""
    prior: object          # the prior's distribution, in float64
    lo: torch.Tensor
    h: torch.Tensor
    values: torch.Tensor   # [R, G, 1]
    slopes: torch.Tensor

    def __call__(self) -> "TabulatedPrior":
        return self

    def to(self, dtype: torch.dtype) -> "TabulatedPrior":
        return self

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """z [R, S, B, 1] -> [R, S, B]."""
        return _hermite(self.lo, self.h, self.values, self.slopes, z.to(self.values.dtype))[..., 0]

    def __getattr__(self, name: str):
        # only for names the table does not hold; while copy or pickle builds one, it holds no prior yet,
        # and the answer must be an AttributeError (a KeyError made copy.copy, deepcopy and pickle fail)
        if "prior" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["prior"], name)


@dataclass(frozen=True)
class SearchModel:
    """What the gap search reads of a VAE (its prior, posterior family and latent size), with the
    decoder tabulated; `network` is the VAE itself (the polish runs on it)."""
    decoder: TabulatedDecoder
    posterior: nn.Module
    prior: nn.Module | TabulatedPrior
    network: VAE
    latent_dim: int = 1
    # the objective's relative rounding, which the line search forgives: float64 throughout here (with the
    # network's 1e-6 a search on the table accepted slightly uphill steps and wandered)
    rounding: ClassVar[float] = 1e-13


def tabulated(model: VAE, nodes: int = TABLE_NODES, span: float = TABLE_SPAN):
    """`model` for the search: with a 1-D latent, a Gaussian decoder and a smooth activation, a
    SearchModel whose decoder is tabulated over every prior component to +-span scales; otherwise the
    model itself."""
    decoder = model.decoder
    if (model.latent_dim != 1 or not isinstance(decoder, GaussianDecoder)
            or not any(isinstance(m, SMOOTH) for m in decoder.net.modules())
            or replica_count(model) * nodes * decoder.data_dim > MAX_TABLE):
        return model
    with torch.no_grad():
        prior = model.prior().to(F64)
        lo, hi = (end[:, 0, 0] for end in prior.reach(span))                            # [R] each
    z = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, nodes, dtype=F64, device=lo.device)
    z = z[:, :, None, None]                                                              # [R, G, 1, 1]
    h = (hi - lo) / (nodes - 1)
    table = TabulatedDecoder(decoder, lo, h, *_with_slopes(decoder.mean, z))
    if prior.strata > 1 and prior.smooth and bool((h <= PRIOR_STEPS * prior.resolution().amin(-1)).all()):
        # several components, each spanning PRIOR_STEPS table steps or more: read from a table too
        return SearchModel(table, model.posterior, TabulatedPrior(prior, lo, h, *_with_slopes(
            lambda at: prior.log_prob(at)[..., None], z)), model)
    return SearchModel(table, model.posterior, model.prior, model)


def _with_slopes(f, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f at the table's nodes z [R, G, 1, 1] and its derivatives in z: values, slopes [R, G, Y], by
    reverse mode, one pass per output (forward mode imports TorchScript decompositions)."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        values = f(z)[:, :, 0]                                                           # [R, G, Y]
        slopes = torch.stack([torch.autograd.grad(values[..., k].sum(), z, retain_graph=True)[0][:, :, 0, 0]
                              for k in range(values.shape[-1])], -1)
    return values.detach(), slopes
