"""The folded process's exact truth per test point (issue 21: "the 2-D truth ... at <= 2 ms per point
at D = 6"): the adaptive rule (data/folded.py: 8 nodes a panel, each point refined until its estimate
meets TRUTH_TOLERANCE) against the fixed rule it replaced (16 nodes a panel, panels min(1, sqrt(200 / D))
of sigma over the largest slope wide, no estimate), side by side in one process, rounds interleaved,
medians reported, one thread. The largest difference between the two is printed too: both are
converged, so it is rounding.

    python benchmarks/truth.py [--quick] [--points N] [--rounds R]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import threadpoolctl

from mogvae.data.folded import FoldedProcess
from mogvae.data.paper import kinked_rule

CASES = [(2, 0, 0.1), (6, 0, 0.1), (6, 2, 0.05), (20, 3, 0.1), (200, 3, 0.1)]    # (D, breaking, sigma), L = 2
TARGET_MS = 2.0                                                                   # at D = 6, sigma = 0.1


def with_fixed_rule(process: FoldedProcess) -> FoldedProcess:
    """`process` whose rule at level 1 is the one before the adaptive rule, exactly: 16 Gauss-Legendre
    nodes a panel, panels min(1, sqrt(200 / D)) of sigma over the largest slope wide, at least 16 on
    each side of the kink."""
    width = min(1.0, math.sqrt(200 / process.data_dim)) * process.sigma / process.max_slope()
    nodes, weights = kinked_rule(max(16, math.ceil(0.5 / width)), 16)
    process._rules[1] = nodes, np.log(weights)
    return process


def fixed_rule(process: FoldedProcess, y: np.ndarray) -> np.ndarray:
    """log p*(y) by the fixed rule alone (with_fixed_rule), no estimate."""
    along, at_centre = process._point_terms(y, 4_000_000)
    return at_centre + process._log_sum(along, 1, 4_000_000)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="D = 6 only, 50 points, 2 rounds")
    parser.add_argument("--points", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = [(6, 0, 0.1)] if args.quick else CASES
    points, rounds = (50, 2) if args.quick else (args.points, args.rounds)
    print(f"{'D':>4s} {'breaking':>8s} {'sigma':>6s} {'adaptive ms/pt':>14s} {'fixed ms/pt':>11s} {'ratio':>6s} "
          f"{'max estimate':>12s} {'max |diff|':>10s}")
    with threadpoolctl.threadpool_limits(1):
        for data_dim, breaking, sigma in cases:
            adaptive = FoldedProcess(data_dim, 2, breaking, sigma)
            fixed = with_fixed_rule(FoldedProcess(data_dim, 2, breaking, sigma))
            _, y = adaptive.sample(points, 1)
            times = {"adaptive": [], "fixed": []}
            for _ in range(rounds):
                start = time.perf_counter()
                value, estimate = adaptive.log_prob_and_error(y)
                times["adaptive"].append(time.perf_counter() - start)
                start = time.perf_counter()
                reference = fixed_rule(fixed, y)
                times["fixed"].append(time.perf_counter() - start)
            a, f = (1e3 * statistics.median(times[k]) / points for k in ("adaptive", "fixed"))
            print(f"{data_dim:4d} {breaking:8d} {sigma:6g} {a:14.2f} {f:11.2f} {f / a:6.2f} {estimate.max():12.1e} "
                  f"{np.abs(value - reference).max():10.1e}", flush=True)
            if (data_dim, breaking, sigma) == (6, 0, 0.1):
                verdict = "met" if a <= TARGET_MS else f"missed by {a / TARGET_MS:.2f}x"
                print(f"     target <= {TARGET_MS} ms a point at D = 6: {verdict}")


if __name__ == "__main__":
    main()
