"""Training engines side by side, one core, interleaved: seconds per seed-epoch and the
ratio to the matmul bound.

Every engine trains the same models on the same data (the paper's process, 10,000
points, MLPs 64-64 with SiLU, batch 256), each in its own process, all pinned to
the same core, with one intra-op thread:

  mogvae           Trainer.run_epoch, R seeds as replicas, train.compile = off
  mogvae-compiled  the same with train.compile = on (the compile is timed apart)
  per-seed loop    the loop a researcher writes (baseline_loop.py), one seed after another
  pythae           pythae 0.1.2's trainer (mfg as its VAE, mog-prior as VAMP), if installed
  jax              jit(vmap(epoch)) over the R seeds (jax_reference.py), if JAX and optax are

Each round times `epochs` epochs of every engine on every model in turn; the
table gives medians over rounds. The bound is the time the step's matrix products
(forward, and both gradients of each) would take at this core's measured peak (a
1024^3 float32 matmul): what a step costs if everything else were free.

    python benchmarks/engines.py [--quick] [--rounds N] [--epochs E] [--replicas R]
    python benchmarks/engines.py --table      # docs/speed.md's markdown table, from the saved results
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from baseline_loop import PlainVAE, plain_epochs  # noqa: E402

from mogvae.config.schema import TrainConfig, preset  # noqa: E402
from mogvae.data.paper import PaperProcess, make_splits  # noqa: E402
from mogvae.model.vae import build_model  # noqa: E402
from mogvae.model.layers import initialize, replica_seed  # noqa: E402
from mogvae.training.trainer import Trainer  # noqa: E402

MODELS = {"mfg": ("normal", "gaussian"), "mog-prior": ("mog", "gaussian"),
          "mog-posterior": ("normal", "mog"), "mog-both": ("mog", "mog")}
RESULTS = Path(__file__).parent / "results" / "engines.json"
QUICK_RESULTS = RESULTS.with_name("engines.quick.json")
N_TRAIN, BATCH, HIDDEN, K = 10_000, 256, (64, 64), 10
TARGETS = {"mfg": 0.012, "mog-prior": 0.012, "mog-posterior": 0.05, "mog-both": 0.05}  # issue 9, s/seed-epoch


def matmul_flops_per_seed_epoch(model: str) -> float:
    """Multiply-adds x 2 of every layer's product, times 3 (forward, input gradient, weight gradient)."""
    kq = K if MODELS[model][1] == "mog" else 1

    def per_point(i, o):
        widths = [i, *HIDDEN, o]
        return sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    encoder = N_TRAIN * per_point(1, 2 * kq)
    decoder = N_TRAIN * kq * per_point(1, 1)
    return 2 * 3 * (encoder + decoder)


def peak_flops() -> float:
    a = torch.randn(1024, 1024)
    a @ a
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


class MogvaeEngine:
    def __init__(self, model, data, seeds, compile_setting):
        vae = build_model(preset(model), replicas=len(seeds))
        gens = initialize(vae, seeds)
        config = TrainConfig(epochs=100_000, compile=compile_setting)   # a constant-ish lr: speed only
        self.trainer = Trainer(vae, data["train"], data["val"], config, seeds, gens)
        self.seeds = len(seeds)
        start = time.perf_counter()
        self.trainer.run_epoch()                       # the first epoch pays lazy setup (and the compile)
        self.setup_seconds = time.perf_counter() - start

    def epochs(self, n):
        for _ in range(n):
            self.trainer.run_epoch()


class PerSeedEngine:
    """baseline_loop's model and loop, one seed: an epoch over a shuffled DataLoader."""

    def __init__(self, model, data, seeds, _):
        torch.manual_seed(seeds[0])
        self.vae = PlainVAE(*MODELS[model])
        self.opt = torch.optim.Adam(self.vae.parameters(), lr=1e-3)
        y = torch.as_tensor(data["train"], dtype=torch.float32)[:, None]
        self.loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(y), batch_size=BATCH, shuffle=True)
        self.seeds, self.setup_seconds = 1, 0.0

    def epochs(self, n):
        plain_epochs(self.vae, self.opt, self.loader, n)


class PythaeEngine:
    def __init__(self, model, data, seeds, _):
        from pythae_runner import train_pythae
        self.kind, self.y, self.seed, self.seeds = ("vae" if model == "mfg" else "vamp"), data["train"], seeds[0], 1
        start = time.perf_counter()
        train_pythae(self.kind, self.y, self.seed, 1)     # imports and lazy initialization
        self.setup_seconds = time.perf_counter() - start

    def timed_epochs(self, n) -> float:
        """Its trainer is one call that builds everything first: the call with n + 1 epochs minus
        the call with 1, so that the setup cancels."""
        from pythae_runner import train_pythae
        start = time.perf_counter()
        train_pythae(self.kind, self.y, self.seed, 1)
        middle = time.perf_counter()
        train_pythae(self.kind, self.y, self.seed, n + 1)
        return (time.perf_counter() - middle) - (middle - start)


class JaxEngine:
    def __init__(self, model, data, seeds, _):
        from jax_reference import JaxTrainer
        start = time.perf_counter()
        self.trainer = JaxTrainer(*MODELS[model], data["train"], seeds)
        self.trainer.run_epoch()                       # jit compile
        self.setup_seconds, self.seeds = time.perf_counter() - start, len(seeds)

    def epochs(self, n):
        for _ in range(n):
            self.trainer.run_epoch()


def available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def engines_for(model: str) -> dict:
    out = {"mogvae": (MogvaeEngine, "off"), "mogvae-compiled": (MogvaeEngine, "on"),
           "per-seed loop": (PerSeedEngine, None)}
    if model in ("mfg", "mog-prior") and available("pythae"):
        out["pythae"] = (PythaeEngine, None)
    if available("jax") and available("optax"):
        out["jax"] = (JaxEngine, None)
    return out


def serve(conn, model, name, replicas, core) -> None:
    """One engine in its own process, pinned to `core`: built once, then timed on request.
    A process per engine keeps each one's memory in its steady state: run in one process, an
    engine that follows another reuses none of its freed pages and pays their first-touch
    faults, which made differences of 20-30% appear that whole-process timings did not show."""
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    data = make_splits(PaperProcess(), {"train": N_TRAIN, "val": 2_000}, 0)
    seeds = [replica_seed(0, i) for i in range(replicas)]
    cls, arg = engines_for(model)[name]
    engine = cls(model, data, seeds, arg)
    conn.send(engine.setup_seconds)
    while (epochs := conn.recv()) is not None:
        if hasattr(engine, "timed_epochs"):
            seconds = engine.timed_epochs(epochs)
        else:
            start = time.perf_counter()
            engine.epochs(epochs)
            seconds = time.perf_counter() - start
        conn.send(seconds / (epochs * engine.seeds))


def measure(models, rounds, epochs, replicas) -> dict:
    """Per model, every engine in its own process on the same core; rounds interleave the engines."""
    ctx, core = mp.get_context("spawn"), min(os.sched_getaffinity(0))
    rows = []
    peak = peak_flops()
    for model in models:
        workers = {}
        for name in engines_for(model):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=serve, args=(child, model, name, replicas, core), daemon=True)
            proc.start()
            workers[name] = (proc, parent)
        setup = {name: conn.recv() for name, (_, conn) in workers.items()}   # built one after another: one core
        times = {name: [] for name in workers}
        for r in range(rounds):
            for name, (_, conn) in workers.items():
                conn.send(epochs)
                times[name].append(conn.recv())
                print(f"  round {r + 1}/{rounds}  {model:14s} {name:16s} {times[name][-1]:.4f} s/seed-epoch", flush=True)
        for proc, conn in workers.values():
            conn.send(None)
            proc.join()
        bound = matmul_flops_per_seed_epoch(model) / peak
        for name, values in times.items():
            median = statistics.median(values)
            rows.append({"model": model, "engine": name, "s_per_seed_epoch": median, "rounds": values,
                         "bound_s": bound, "ratio_to_bound": median / bound, "setup_s": setup[name],
                         "target_s": TARGETS[model]})
    return {"peak_gflops": peak / 1e9, "rows": rows}


def table(report: dict) -> str:
    rows = report["rows"]
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    lines = ["| model | " + " | ".join(engines) + " | bound | target |", "|---" * (len(engines) + 3) + "|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = {r["engine"]: r for r in rows if r["model"] == model}
        any_row = next(iter(cells.values()))
        text = [f"{cells[e]['s_per_seed_epoch']:.4f} ({cells[e]['ratio_to_bound']:.1f}x)" if e in cells else "-"
                for e in engines]
        lines.append(f"| {model} | " + " | ".join(text) + f" | {any_row['bound_s']:.4f} | {any_row['target_s']} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="mfg and mog-posterior, 1 round of 1 epoch (under 2 min)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--replicas", type=int, default=5, help="seeds trained together by the batched engines")
    ap.add_argument("--table", action="store_true", help="print the saved results as docs/speed.md's table")
    args = ap.parse_args()
    target = QUICK_RESULTS if args.quick else RESULTS
    if args.table:
        print(table(json.loads(target.read_text())))
        return
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    models = ["mfg", "mog-posterior"] if args.quick else list(MODELS)
    rounds, epochs = args.rounds or (1 if args.quick else 3), args.epochs or (1 if args.quick else 2)
    report = measure(models, rounds, epochs, args.replicas)
    report["settings"] = {"rounds": rounds, "epochs": epochs, "replicas": args.replicas, "train_points": N_TRAIN,
                          "batch_size": BATCH, "hidden": list(HIDDEN), "threads": 1, "cores": 1,
                          "torch": torch.__version__, "quick": args.quick}
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nseconds per seed-epoch (x the matmul bound), one core, peak {report['peak_gflops']:.0f} GFLOP/s:\n")
    print(table(report))
    print("\nsetup (lazy initialization, compiles): " + ", ".join(
        f"{r['model']}/{r['engine']} {r['setup_s']:.1f} s" for r in report["rows"] if r["setup_s"] > 1))
    print(f"written {target}")


if __name__ == "__main__":
    main()
