"""The maximum-likelihood oracle (train.objective = "exact"): the prior and the decoder
are trained on log p(y) itself, by differentiable quadrature over the latent
(latent_dim <= 2), and the encoder on the ELBO of that model, so that the oracle
has a posterior to report without it pulling the generative model. The gap
decomposition (estimators/gaps.py) measures every VAE against it."""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..model.grid import MAX_LATENT, latent_grid
from ..model.vae import VAE
from .bounds import elbo

MAX_TRAINING_NODES = 20_001  # latent nodes per replica the exact objective differentiates at every step
NODES_PER_DECODER_PASS = 100  # measured: a step over 1001 nodes costs about a 10-component posterior's


def training_log_marginal(model: VAE, y: torch.Tensor, size: int, span: float = 8.0) -> torch.Tensor:
    """log p_theta(y) by the trapezoid rule over the prior's reach, differentiable in
    the prior's and the decoder's parameters (the exact objective): y [R, B, Y] -> [R, B].
    The nodes follow the prior at every step but carry no gradient: the rule's
    weights are constants, and the integrand carries the parameters.

    The Gaussian exponent -(y - f)^2 / 2 sigma^2 is expanded so that its part that
    couples y and the node is one batched matrix product, and its part in y alone
    leaves the log-sum-exp: [R, B, G] is touched by the product, the exp and the
    sum only (measured 5x faster than broadcasting the Gaussian over [R, G, B]).
    y and f are centred first, so that float32 keeps the cancellation small."""
    with torch.no_grad():
        grid = latent_grid(model, size, span)
    nodes = grid.nodes.to(y.dtype)                                          # [R, G, D]
    mean = model.decoder.mean(nodes[:, :, None, :])[:, :, 0]                # [R, G, Y]
    log_sigma = model.decoder.log_noise_as(y.dtype)[:, 0]                   # [R, 1, Y]
    inv_var = torch.exp(-2 * log_sigma)
    log_prior = model.prior().to(y.dtype).log_prob(nodes[:, :, None, :])[:, :, 0]   # [R, G]
    centre = mean.detach().mean(1, keepdim=True)                            # [R, 1, Y]
    mean, y = mean - centre, y - centre
    offset = (log_prior + grid.log_w.to(y.dtype) - log_sigma.sum(-1)
              - 0.5 * y.shape[-1] * math.log(2 * math.pi) - 0.5 * (mean * mean * inv_var).sum(-1))   # [R, G]
    exponent = torch.baddbmm(offset[:, None, :], y * inv_var, mean.transpose(1, 2))             # [R, B, G]
    return LogSumExp.apply(exponent) - 0.5 * (y * y * inv_var).sum(-1)


class LogSumExp(torch.autograd.Function):
    """log sum_g exp(x_g) over the last axis, keeping the normalized weights from the
    forward pass for the backward (torch.logsumexp recomputes exp(x - lse) there:
    measured, the two exps over [R, B, G] were 40% of an exact-objective step)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        peak = x.amax(-1, keepdim=True)
        weights = (x - peak).exp_()
        total = weights.sum(-1, keepdim=True)
        ctx.save_for_backward(weights.div_(total))
        return (total.log_() + peak).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (weights,) = ctx.saved_tensors
        return weights * grad[..., None]


class ExactLikelihood:
    """The oracle as a training objective: not sampled (its quadrature is already a few
    large tensor operations, never compiled or chunked), and the reference every
    VAE's gaps are measured against."""
    name = "exact"
    summary = ("the maximum-likelihood oracle, prior and decoder trained on log p(y) by quadrature "
               "(latent_dim <= 2), the encoder on the ELBO of that model")
    sampled: ClassVar[bool] = False
    oracle: ClassVar[bool] = True

    def check(self, model, train) -> None:
        """Refuse (ValueError naming the field) what the quadrature cannot differentiate at every step."""
        d = model.latent_dim
        if d > MAX_LATENT:
            raise ValueError(f"train.objective = 'exact' differentiates log p(y) by quadrature over z: it needs "
                             f"model.latent_dim <= {MAX_LATENT}, got {d}")
        if train.exact_grid ** d > MAX_TRAINING_NODES:
            fit = int(MAX_TRAINING_NODES ** (1 / d)) // 2 * 2 - 1
            raise ValueError(f"train.exact_grid = {train.exact_grid} with latent_dim = {d} is "
                             f"{train.exact_grid ** d:,} nodes at every step: set train.exact_grid <= {fit}")

    def training_grid(self, train) -> int:
        """The nodes per axis training integrated on: evaluation reports that rule's error at the optimum."""
        return train.exact_grid

    def step_cost(self, train) -> float:
        return train.exact_grid / NODES_PER_DECODER_PASS

    def backward(self, model: VAE, params: list, y: torch.Tensor, eps: torch.Tensor, train, live) -> torch.Tensor:
        """Gradients into each parameter's .grad; returns the loss per replica, [R]. Every
        parameter that log p(y) depends on (prior, decoder, and a prior's own use of the
        encoder) follows the quadrature log-likelihood alone; the rest (the encoder)
        follows the ELBO of that model. `live` sums a per-replica loss over the
        replicas still training (stopped ones contribute no gradient)."""
        loss = -training_log_marginal(model, y, train.exact_grid).mean(1)
        grads = list(torch.autograd.grad(live(loss), params, allow_unused=True))
        rest = [i for i, g in enumerate(grads) if g is None]
        if rest:
            elbo_loss = live(-elbo(model, y, eps).mean(1))
            for i, g in zip(rest, torch.autograd.grad(elbo_loss, [params[i] for i in rest], allow_unused=True)):
                grads[i] = g
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if g is None:
                p.grad.zero_()
            else:
                p.grad.copy_(g)
        return loss


EXACT = ExactLikelihood()
