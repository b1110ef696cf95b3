"""A VAE is its three parts; it holds no loss code (see objectives/bounds.py)."""
from __future__ import annotations

import torch
from torch import nn

from .decoders import GaussianDecoder
from .posteriors import POSTERIORS
from .priors import PRIORS


class VAE(nn.Module):
    def __init__(self, prior: nn.Module, posterior: nn.Module, decoder: GaussianDecoder):
        super().__init__()
        self.prior, self.posterior, self.decoder = prior, posterior, decoder

    @property
    def latent_dim(self) -> int:
        return self.posterior.d

    def generate(self, generators: list[torch.Generator], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (z, y) from the model: z [R, n, D], y [R, n, Y]."""
        with torch.no_grad():
            z = self.prior().sample(generators, n)
            mean = self.decoder.mean(z[:, :, None, :])[:, :, 0]        # [R, n, Y]
            noise = self.decoder.noise()[:, None, :]
            eps = torch.stack([torch.randn(mean.shape[1:], generator=g, dtype=mean.dtype)
                               for g in generators])
            return z, mean + noise * eps


def build_model(config, replicas: int, data_dim: int = 1, noise: float = 0.1) -> VAE:
    """The VAE that `config` (a `config.schema.ModelConfig`, which sits above model/: it validates
    names against PRIORS and POSTERIORS) names, with R = `replicas` independent copies.
    Parameters are left uninitialized: call `layers.initialize` with seeds."""
    common = dict(replicas=replicas, latent_dim=config.latent_dim, data_dim=data_dim,
                  hidden=tuple(config.hidden), activation=config.activation)
    mixture = dict(n_components=config.n_components, learn_weights=config.learn_weights, flow_bins=config.flow_bins)
    prior = PRIORS[config.prior](**common, **mixture)
    posterior = POSTERIORS[config.posterior](**common, **mixture)
    decoder = GaussianDecoder(**common, noise=noise, learn_noise=config.learn_decoder_noise)
    if hasattr(prior, "attach"):
        prior.attach(posterior)       # a prior built from the encoder (VampPrior)
    return VAE(prior, posterior, decoder)

