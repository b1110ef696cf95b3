"""Experiment (not used by mogvae): a batched per-point L-BFGS for the gap search (ELBO*),
against the Adam search of estimators/gaps.py, on one trained run's first N test points.

    .venv/bin/python benchmarks/experiments/gap_search_lbfgs.py RUN_FOLDER N [BACKTRACKS] [TOLERANCE]

Measured (2026-11-30, one core) on a 7,500-row 2-D ring CSV, 5 replicas, defaults:
  mog-posterior, 100 points, tolerance 1e-5: Adam 31.3 s (300 steps), L-BFGS 12.3 s (45 iterations
    + 139 line-search evaluations); mean ELBO* higher by 2.0e-3 nats with L-BFGS, per point from
    -9.1e-3 to +7.8e-2, median -3e-6.
  mfg, 200 points, tolerance 1e-6, 6 backtracks: Adam 3.9 s, L-BFGS 1.8 s; mean ELBO* higher by
    3.7e-2 nats with L-BFGS; per point from -0.50 to +15.5 nats, median +3e-8.
Reading: each search stops in local optima the other escapes (a Gaussian q of a bimodal
posterior picks one mode), by up to 15.5 nats for Adam. Neither dominates, so swapping one for
the other moves the approximation gap without making it a best-of-family value; the next step
(issue 21) is a per-point multi-start (both searches, or starts at the exact posterior's modes
from the quadrature grid), keeping each point's best by the reporting rule."""
import math, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from mogvae.runs.run import trained_model
from mogvae.estimators import gaps
from mogvae.estimators.gaps import hermite_elbo, NODES, _optimize
from mogvae.estimators.quadrature import F64, as_batch

BACKTRACKS = int(sys.argv[3]) if len(sys.argv) > 3 else 4

def dot(a, b):
    return (a * b).sum(-1)

def lbfgs(model, y, max_iters=200, tolerance=1e-5, memory=10, check_every=5):
    fast, final = NODES[model.latent_dim]
    posterior = model.posterior
    with torch.no_grad():
        start = posterior.raw(y).to(F64)
    def value_and_grad(x):
        x = x.detach().requires_grad_(True)
        f = -hermite_elbo(model, y, posterior.from_raw(x), fast)      # [R, B], minimized
        g, = torch.autograd.grad(f.sum(), x)
        return f.detach(), g
    def value(x):
        with torch.no_grad():
            return -hermite_elbo(model, y, posterior.from_raw(x), fast)
    x = start.clone()
    f, g = value_and_grad(x)
    S, Y, rho = [], [], []
    best = torch.full(y.shape[:2], -math.inf, dtype=F64)
    best_x = x.clone()
    previous, it, evals = None, 0, 0
    while True:
        if it % check_every == 0 or it == max_iters:
            with torch.no_grad():
                v = hermite_elbo(model, y, posterior.from_raw(x), final)
                better = v > best
                best = torch.where(better, v, best); best_x = torch.where(better[..., None], x, best_x)
            if previous is not None and float((best - previous).max()) < tolerance:
                break
            if it == max_iters:
                break
            previous = best.clone()
        # two-loop recursion, per point
        q = g.clone()
        alphas = []
        for s_, y_, r_ in zip(reversed(S), reversed(Y), reversed(rho)):
            a = r_ * dot(s_, q)
            q = q - a[..., None] * y_
            alphas.append(a)
        first = 1.0 / g.norm(dim=-1).clamp_min(1.0)
        if S:
            sy, yy = dot(S[-1], Y[-1]), dot(Y[-1], Y[-1])
            gamma = torch.where(sy > 0, sy / yy.clamp_min(1e-300), first)
        else:
            gamma = first
        r = q * (gamma[..., None] if torch.is_tensor(gamma) else gamma)
        for s_, y_, r_, a in zip(S, Y, rho, reversed(alphas)):
            b = r_ * dot(y_, r)
            r = r + (a - b)[..., None] * s_
        d = -r
        slope = dot(g, d)
        bad = ~(slope < 0)
        d = torch.where(bad[..., None], -g, d); slope = torch.where(bad, -dot(g, g), slope)
        t = torch.ones_like(f)
        accepted = torch.zeros_like(f, dtype=torch.bool)
        best_t, best_f = torch.zeros_like(f), f.clone()
        noise = 1e-6 * f.abs().clamp_min(1.0)     # the float32 decoder's rounding in the objective
        for _ in range(BACKTRACKS):
            f_new = value(x + t[..., None] * d); evals += 1
            lower = (f_new < best_f) & ~accepted
            best_t, best_f = torch.where(lower, t, best_t), torch.where(lower, f_new, best_f)
            ok = (f_new <= f + 1e-4 * t * slope + noise) & ~accepted
            accepted |= ok
            if float(accepted.double().mean()) > 0.98:
                break
            t = torch.where(accepted, t, t * 0.1)
        t = torch.where(accepted, t, best_t)     # else the lowest value tried (0: stay)
        stalled = ~accepted
        x_new = x + t[..., None] * d
        f_new, g_new = value_and_grad(x_new)
        s_, y_ = x_new - x, g_new - g
        sy = dot(s_, y_)
        valid = (sy > 1e-12) & ~stalled
        keep = ~stalled                        # a stalled point forgets its curvature: next, steepest descent
        S = [torch.where(keep[..., None], a, 0) for a in S]; Y = [torch.where(keep[..., None], a, 0) for a in Y]
        rho = [torch.where(keep, a, 0) for a in rho]
        S.append(torch.where(valid[..., None], s_, 0)); Y.append(torch.where(valid[..., None], y_, 0))
        rho.append(torch.where(valid, 1.0 / sy.clamp_min(1e-300), 0))
        if len(S) > memory:
            S.pop(0); Y.pop(0); rho.pop(0)
        x, f, g = x_new, f_new, g_new
        it += 1
    with torch.no_grad():
        encoder = hermite_elbo(model, y, posterior.from_raw(start), final)
    return best, encoder, it, evals

run = sys.argv[1]; n = int(sys.argv[2])
model, config, seeds = trained_model(run)
model = model.eval()
for p in model.parameters(): p.requires_grad_(False)
yt = as_batch(np.load(f"{run}/data/test.npy")[:n], len(seeds), torch.device("cpu"))
t = time.perf_counter(); a = _optimize(model, yt, 1000, 1e-5); ta = time.perf_counter() - t
t = time.perf_counter(); b = lbfgs(model, yt, tolerance=float(sys.argv[4]) if len(sys.argv) > 4 else 1e-5); tb = time.perf_counter() - t
print(f"adam  {ta:.1f} s, steps {a[2]}, mean ELBO* {float(a[0].mean()):.6f}")
print(f"lbfgs {tb:.1f} s, iters {b[2]} (+{b[3]} line-search evals), mean ELBO* {float(b[0].mean()):.6f}")
d = (b[0] - a[0])
print("lbfgs - adam per point: min %.2e median %.2e max %.2e" % (float(d.min()), float(d.median()), float(d.max())))
