"""The training loop a researcher would write: one seed at a time, nn.Linear
MLPs, a DataLoader, torch.distributions -- the same model, estimator, data,
batch size and optimizer as mogvae, without the replica axis."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal
from torch.utils.data import DataLoader, TensorDataset


def mlp(i: int, hidden: tuple[int, ...], o: int) -> nn.Sequential:
    layers, widths = [], [i, *hidden, o]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers[:-1])


class PlainVAE(nn.Module):
    def __init__(self, prior: str, posterior: str, k: int = 10, hidden=(64, 64), sigma: float = 0.1,
                 data_dim: int = 1, latent_dim: int = 1):
        super().__init__()
        self.kq, self.d = (k if posterior == "mog" else 1), latent_dim
        self.encoder = mlp(data_dim, hidden, 2 * self.kq * latent_dim)
        self.decoder = mlp(latent_dim, hidden, data_dim)
        self.sigma = sigma
        self.mog_prior = prior == "mog"
        if self.mog_prior:
            self.prior_loc = nn.Parameter(torch.randn(k, latent_dim))
            self.prior_raw_scale = nn.Parameter(torch.full((k, latent_dim), 0.54))

    def prior(self):
        if not self.mog_prior:
            return Independent(Normal(torch.zeros(self.d), torch.ones(self.d)), 1)
        k = self.prior_loc.shape[0]
        return MixtureSameFamily(Categorical(logits=torch.zeros(k)),
                                 Independent(Normal(self.prior_loc, F.softplus(self.prior_raw_scale) + 1e-4), 1))

    def neg_elbo(self, y: torch.Tensor) -> torch.Tensor:
        h = self.encoder(y).reshape(len(y), 2 * self.kq, self.d)           # [B, 2K, d]
        loc, scale = h[:, :self.kq], F.softplus(h[:, self.kq:]) + 1e-4     # [B, K, d]
        z = loc + scale * torch.randn_like(loc)                             # one draw per component
        if self.kq == 1:
            q = Independent(Normal(loc[:, 0], scale[:, 0]), 1)
        else:
            q = MixtureSameFamily(Categorical(logits=torch.zeros(y.shape[0], self.kq)),
                                  Independent(Normal(loc, scale), 1))
        zs = z.transpose(0, 1)                                              # [K, B, d]
        log_lik = Normal(self.decoder(zs), self.sigma).log_prob(y).sum(-1)  # [K, B]
        log_w = log_lik + self.prior().log_prob(zs) - q.log_prob(zs)
        return -log_w.mean(0).mean()


def plain_epochs(model: PlainVAE, optimizer, loader, epochs: int) -> None:
    """`epochs` passes of the plain loop over a DataLoader of (y,) batches."""
    for _ in range(epochs):
        for (yb,) in loader:
            optimizer.zero_grad()
            model.neg_elbo(yb).backward()
            optimizer.step()


def train_plain(name_prior: str, name_posterior: str, y, seed: int, epochs: int, batch_size: int = 256,
                lr: float = 1e-3) -> float:
    torch.manual_seed(seed)
    model = PlainVAE(name_prior, name_posterior)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(torch.as_tensor(y, dtype=torch.float32)[:, None]),
                        batch_size=batch_size, shuffle=True)
    loss = math.nan
    for _ in range(epochs):
        for (yb,) in loader:
            opt.zero_grad()
            loss_t = model.neg_elbo(yb)
            loss_t.backward()
            opt.step()
            loss = float(loss_t)
    return loss
