"""A study from outside mogvae: its spec as a dict and its reading (tests/test_plugins.py)."""
import csv
import statistics

SPEC = {
    "seeds": 2, "checkpoint_every": 1,
    "model": {"hidden": [8]},
    "data": {"n_train": 200, "n_val": 50, "n_test": 100},
    "train": {"epochs": 2, "batch_size": 100},
    "eval": {"grid_size": 201, "n_generated": 200, "gap_points": 0},
    "grid": {"preset": ["mfg", "mog-prior"]},
}


def present(out):
    """One line of reading: the mean test log-likelihood of each cell, from metrics.csv."""
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    means = {name: statistics.fmean(float(r["test_log_likelihood"]) for r in rows if r["run"] == name)
             for name in sorted({r["run"] for r in rows})}
    return ["## Toy reading", "", *(f"- toy mean {name}: {value:.6f}" for name, value in means.items()), ""], []
