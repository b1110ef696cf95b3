"""Training throughput: seed-epochs per second, mogvae against the loops people write.

One run measures, interleaved and on the same data, architecture (MLPs 64-64),
batch size (256) and number of epochs, for each of the four models:
  baseline        the plain per-seed PyTorch loop with a DataLoader (baseline_loop.py), torch's default threads
  mogvae-1x2      mogvae's trainer, all seeds as replicas in one process with 2 intra-op threads
  mogvae-2x1      mogvae's trainer, seeds split over 2 single-threaded worker processes (what `reproduce` does)
  pythae-vae/vamp pythae 0.1.2's trainer (VAE on mfg, VAMP on mog-prior) when pythae is installed
and prints medians over repeats, the ratios to the baseline and to pythae, and
the growth of resident memory during each run (+RSS, after freed memory is
returned to the OS; for the worker mode, summed over the workers);
results go to benchmarks/results/train_throughput.json. It then
times `mogvae reproduce` end to end (on defaults; --quick: `reproduce --quick`).

    python benchmarks/train_throughput.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
import multiprocessing as mp

import torch

sys.path.insert(0, str(Path(__file__).parent))
from baseline_loop import train_plain  # noqa: E402

from mogvae.config.schema import TrainConfig, preset  # noqa: E402
from mogvae.data.paper import PaperProcess, make_splits  # noqa: E402
from mogvae.model.vae import build_model  # noqa: E402
from mogvae.model.layers import initialize, replica_seed  # noqa: E402
from mogvae.training.trainer import fit  # noqa: E402

MODELS = {"mfg": ("normal", "gaussian"), "mog-prior": ("mog", "gaussian"),
          "mog-posterior": ("normal", "mog"), "mog-both": ("mog", "mog")}
RESULTS = Path(__file__).parent / "results" / "train_throughput.json"
QUICK_RESULTS = RESULTS.with_name("train_throughput.quick.json")  # a smoke run never overwrites the real one


def _release_freed_memory():
    """Give freed heap pages back to the OS (glibc), so that a block's RSS growth is its own peak."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Peak resident memory of this process during a block, sampled every 2 ms (MiB above the start)."""

    def __enter__(self):
        _release_freed_memory()
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    @property
    def mib(self) -> float:
        return self.peak - self.start


def mogvae_train(model: str, y_train, y_val, seeds, epochs: int, threads: int):
    """Train `seeds` as replicas; return (wall start, wall end, peak extra MiB)."""
    torch.set_num_threads(threads)
    with PeakRSS() as mem:
        vae = build_model(preset(model), replicas=len(seeds))
        gens = initialize(vae, seeds)
        start = time.time()
        fit(vae, y_train, y_val, TrainConfig(epochs=epochs), seeds, gens)
        end = time.time()
    return start, end, mem.mib


def baseline(model, data, seeds, epochs):
    torch.set_num_threads(torch.get_num_threads())
    with PeakRSS() as mem:
        start = time.perf_counter()
        for s in seeds:
            train_plain(*MODELS[model], data["train"], s, epochs)
        seconds = time.perf_counter() - start
    return len(seeds) * epochs / seconds, mem.mib


def mogvae_one_process(model, data, seeds, epochs):
    start, end, mib = mogvae_train(model, data["train"], data["val"], seeds, epochs, os.cpu_count() or 1)
    return len(seeds) * epochs / (end - start), mib


def mogvae_workers(pool, workers, model, data, seeds, epochs):
    parts = [seeds[i::workers] for i in range(workers)]
    futures = [pool.submit(mogvae_train, model, data["train"], data["val"], p, epochs, 1) for p in parts]
    out = [f.result() for f in futures]
    wall = max(o[1] for o in out) - min(o[0] for o in out)
    return len(seeds) * epochs / wall, sum(o[2] for o in out)


def pythae_trainer(kind, data, seeds, epochs):
    from pythae_runner import train_pythae
    with PeakRSS() as mem:
        start = time.perf_counter()
        for s in seeds:
            train_pythae(kind, data["train"], s, epochs)
        seconds = time.perf_counter() - start
    return len(seeds) * epochs / seconds, mem.mib


def _warm(_):
    return torch.get_num_threads()


def have_pythae() -> bool:
    try:
        import pythae  # noqa: F401  (only asks whether it is installed)
        return True
    except ImportError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run in under a minute; ratios still printed")
    ap.add_argument("--repeats", type=int, help="interleaved repeats (median reported)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--no-reproduce", action="store_true", help="skip timing `mogvae reproduce`")
    args = ap.parse_args()
    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    epochs = args.epochs or (1 if quick else 3)
    n_seeds_batched, n_seeds_plain = (4, 1) if quick else (8, 2)
    data = make_splits(PaperProcess(), {"train": 10_000, "val": 2_000}, 0)
    seeds = [replica_seed(0, i) for i in range(n_seeds_batched)]
    workers = min(2, os.cpu_count() or 1)
    models = list(MODELS)
    pythae = have_pythae()
    if not pythae:
        print("pythae is not installed: its rows are skipped (pip install -e '.[bench]' adds it)")
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        list(pool.map(_warm, range(workers)))  # start the workers before timing
        warm = {"train": data["train"][:2000], "val": data["val"][:200]}
        for model in models:  # first calls pay for lazy initialization: not timed
            baseline(model, warm, seeds[:1], 1)
            mogvae_one_process(model, warm, seeds, 1)
            mogvae_workers(pool, workers, model, warm, seeds, 1)
        for rep in range(repeats):
            for model in models:
                runs = {
                    "baseline": lambda: baseline(model, data, seeds[:n_seeds_plain], epochs),
                    "mogvae-1x2": lambda: mogvae_one_process(model, data, seeds, epochs),
                    f"mogvae-{workers}x1": lambda: mogvae_workers(pool, workers, model, data, seeds, epochs),
                }
                if pythae and model in ("mfg", "mog-prior"):
                    kind = "vae" if model == "mfg" else "vamp"
                    runs[f"pythae-{kind}"] = lambda: pythae_trainer(kind, data, seeds[:n_seeds_plain], epochs)
                for method, run in runs.items():
                    samples.setdefault((model, method), []).append(run())
                    rate = samples[(model, method)][-1][0]
                    print(f"  repeat {rep + 1}/{repeats}  {model:14s} {method:12s} {rate:8.2f} seed-epochs/s", flush=True)
    table = summarize(samples, models, workers)
    report = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
              "settings": {"epochs": epochs, "repeats": repeats, "seeds_batched": n_seeds_batched,
                           "seeds_plain": n_seeds_plain, "train_points": 10_000, "batch_size": 256,
                           "hidden": [64, 64], "quick": quick},
              "results": table}
    if not args.no_reproduce:
        report["reproduce_seconds"] = time_reproduce(quick)
        print(f"\nmogvae reproduce{' --quick' if quick else ''} end to end: {report['reproduce_seconds']:.1f} s")
    target = QUICK_RESULTS if quick else RESULTS
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {target}")


def summarize(samples, models, workers) -> list[dict]:
    best = f"mogvae-{workers}x1"
    rows = []
    print(f"\n{'model':14s} {'method':12s} {'seed-epochs/s':>14s} {'+RSS MiB':>9s} {'vs baseline':>12s} {'vs pythae':>10s}")
    for model in models:
        base = statistics.median(s[0] for s in samples[(model, "baseline")])
        pyt = [k for k in samples if k[0] == model and k[1].startswith("pythae")]
        pyt_rate = statistics.median(s[0] for s in samples[pyt[0]]) if pyt else None
        for (m, method), runs in samples.items():
            if m != model:
                continue
            rate = statistics.median(r[0] for r in runs)
            mem = max(r[1] for r in runs)
            row = {"model": model, "method": method, "seed_epochs_per_s": rate, "peak_mib": mem,
                   "ratio_to_baseline": rate / base,
                   "ratio_to_pythae": (rate / pyt_rate) if pyt_rate else None}
            rows.append(row)
            vs_p = f"{row['ratio_to_pythae']:.2f}x" if pyt_rate and method.startswith("mogvae") else ""
            print(f"{model:14s} {method:12s} {rate:14.2f} {mem:9.0f} {rate / base:11.2f}x {vs_p:>10s}"
                  + ("   <- reproduce's mode" if method == best else ""))
    return rows


def time_reproduce(quick: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mogvae.cli", "reproduce", "--out", str(Path(tmp) / "out")]
        start = time.perf_counter()
        subprocess.run(cmd + (["--quick"] if quick else []), check=True, capture_output=True)
        return time.perf_counter() - start


if __name__ == "__main__":
    main()
