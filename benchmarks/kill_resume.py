"""kill -9 at random moments (the tests kill at chosen points instead; see
tests/test_faults.py): each trial kills `mogvae train` once or twice after a
random delay, re-runs it to the end, and checks that the final checkpoint,
history and metrics are bitwise those of an uninterrupted run. How many kills
land mid-training depends on this machine's speed, which is why this is a
benchmark and not a test.

    python benchmarks/kill_resume.py [--trials 10]
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mogvae.storage.checkpoints import load_checkpoint

CONFIG = """
preset = "mog-both"
seeds = 2
[model]
hidden = [16, 16]
n_components = 3
[data]
n_train = 2000
n_val = 200
n_test = 500
[train]
epochs = 30
[eval]
grid_size = 801
n_generated = 1000
"""


def command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mogvae.cli", "train", str(config), "--out", str(out)]


def metrics_but_wall_time(out: Path) -> list[dict]:
    """metrics.csv exactly as written, but for train_seconds (wall time differs between identical runs)."""
    with open(out / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "train_seconds"} for row in csv.DictReader(fh)]


def final_state(out: Path):
    newest = sorted((out / "checkpoints").glob("*.safetensors"))[-1]
    tensors, meta = load_checkpoint(newest)
    return newest.name, tensors, meta, (out / "history.jsonl").read_bytes(), metrics_but_wall_time(out)


def same(a, b) -> bool:
    return (a[0] == b[0] and a[2] == b[2] and a[1].keys() == b[1].keys()
            and all(torch.equal(a[1][k], b[1][k]) for k in a[1]) and a[3:] == b[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = tmp / "run.toml"
        config.write_text(CONFIG)
        subprocess.run(command(config, tmp / "ref"), check=True, capture_output=True)
        reference = final_state(tmp / "ref")
        interrupted = identical = 0
        for trial in range(args.trials):
            out = tmp / f"trial{trial}"
            for _ in range(rng.choice([1, 2])):
                proc = subprocess.Popen(command(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(rng.uniform(1.8, 4.5))
                interrupted += proc.poll() is None
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            subprocess.run(command(config, out), check=True, capture_output=True)
            identical += same(final_state(out), reference)
        print(f"{args.trials} trials, {interrupted} kills landed mid-run, {identical}/{args.trials} bitwise identical")


if __name__ == "__main__":
    main()
