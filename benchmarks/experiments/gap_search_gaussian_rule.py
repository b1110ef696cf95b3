"""Does the gap search's Gauss-Hermite rule judge a Gaussian q correctly in 1-D? Two checks on a
finished run folder (a Gaussian posterior, 1-D latent):

  disagreement  the search again (estimators.gaps.best_posterior) on the first 500 gap points, and each
                point's ELBO* by the search's reporting rule (Gauss-Hermite, 64 nodes) minus the ELBO of
                the same q by evaluation's grid rule (estimators.quadrature.integrate);
  brute force   an independent ELBO* per point: every (loc, scale) of a 121 x 27 grid, each scored by a
                trapezoid on 8,001 nodes over z in [-10, 10] with log p(y, z) from the network in float64,
                the best refined three times by a local 21 x 21 grid; minus the saved ELBO*
                (pointwise.npz). This one needs nothing of mogvae's estimators.

    python benchmarks/experiments/gap_search_gaussian_rule.py disagreement RUN [RUN ...]
    python benchmarks/experiments/gap_search_gaussian_rule.py brute RUN REPLICA POINTS

Measured on the noise study at main 19e6290 (docs/findings.md, the families section): at sigma = 0.1
the two rules agree within 3e-7 and the brute force is within 3e-8 of the saved ELBO*; at sigma <= 0.05
the rules disagree by over 1e-2 nats at 57-513 of 5,000 point-replicas per run (up to 6.8 nats); on the
first 40 points of replica 0 the brute force is 1.6e-4 nats higher on average at sigma = 0.03 on mfg (up
to 1.5e-3), and no higher by over 1.1e-7 on mog-prior at sigma = 0.03 and 0.05 and on mfg at sigma = 0.02.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

from mogvae.estimators.gaps import best_posterior
from mogvae.estimators.quadrature import integrate, latent_grid
from mogvae.runs.run import trained_model

F64 = torch.float64


def disagreement(path: str) -> None:
    model = trained_model(path)[0]
    y = np.load(f"{path}/data/test.npy")[:500]
    best = best_posterior(model, y)
    on_grid = integrate(model, y, latent_grid(model, 2001, 8.0, y=y, q=best.q), q=best.q)
    d = (best.elbo_star - on_grid.elbo).numpy()
    print(f"{path}: search rule minus grid rule, largest {d.max():.3g}; over 1e-4 at {(d > 1e-4).sum()}, "
          f"over 1e-2 at {(d > 1e-2).sum()} of {d.size} point-replicas", flush=True)


def brute_force(path: str, replica: int, points: int) -> None:
    model = trained_model(path)[0]
    y = torch.tensor(np.load(f"{path}/data/test.npy")[:points], dtype=F64)
    saved = np.load(f"{path}/pointwise.npz")["elbo_star"][replica, :points]
    z = torch.linspace(-10, 10, 8001, dtype=F64)
    dz = float(z[1] - z[0])
    with torch.no_grad():
        nodes = z.reshape(1, -1, 1, 1).expand(model.decoder.log_noise_as(F64).shape[0], -1, 1, 1)
        prior = model.prior().to(F64).log_prob(nodes)[replica, :, 0]                     # [G]
        mean = model.decoder.mean(nodes)[replica, :, 0, :].double()                      # [G, Y]
        log_sigma = model.decoder.log_noise_as(F64)[replica, 0, 0]                       # [Y]
        log_joint = ((-0.5 * ((y.reshape(-1, 1, 1) - mean[None]) / log_sigma.exp()) ** 2 - log_sigma
                      - 0.5 * math.log(2 * math.pi)).sum(-1) + prior)                    # [N, G]

    def elbo(joint, loc, scale):                                                         # [G], [C], [C] -> [C]
        log_q = (-0.5 * ((z[None] - loc[:, None]) / scale[:, None]) ** 2 - torch.log(scale)[:, None]
                 - 0.5 * math.log(2 * math.pi))
        return (torch.exp(log_q) * (joint[None] - log_q)).sum(1) * dz

    locs, scales = torch.meshgrid(torch.linspace(-6, 6, 121, dtype=F64), torch.logspace(-2, 0.6, 27, dtype=F64),
                                  indexing="ij")
    best = []
    for i in range(points):
        values = elbo(log_joint[i], locs.flatten(), scales.flatten())
        k = int(values.argmax())
        loc, scale = float(locs.flatten()[k]), float(scales.flatten()[k])
        for width in (0.05, 0.005, 0.0005):
            step = torch.linspace(-1, 1, 21, dtype=F64)
            ll, ss = torch.meshgrid(loc + width * step, scale * torch.exp(4 * width * step), indexing="ij")
            values = elbo(log_joint[i], ll.flatten(), ss.flatten())
            k = int(values.argmax())
            loc, scale = float(ll.flatten()[k]), float(ss.flatten()[k])
        best.append(float(values.max()))
    d = np.array(best) - saved
    print(f"{path} replica {replica}: brute force minus saved ELBO*, mean {d.mean():.3g}, largest {d.max():.3g}, "
          f"smallest {d.min():.3g}; over 1e-4 at {(d > 1e-4).sum()} of {points} points")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "disagreement":
        for run in sys.argv[2:]:
            disagreement(run)
    else:
        brute_force(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
