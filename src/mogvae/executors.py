"""Executors: who runs the runs of a sweep. Only configurations (plain dicts) and
paths travel to workers, never user objects; a run is `train_run`, the same
function whichever executor calls it, on one intra-op thread, so its numbers
are bitwise the same everywhere.

- local: single-threaded worker processes, one per core (README, "Speed"),
  which die with their driver, even after kill -9;
- dask: an existing Dask distributed scheduler (`--scheduler tcp://HOST:PORT`).
  The run folders must be on a filesystem the workers share. A run whose worker
  dies is rescheduled by Dask on another worker and resumes from its checkpoint.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue as queues
import signal
import threading
import time
from pathlib import Path

from . import faults


class WorkerFailed(RuntimeError):
    """A worker raised, or died without a word (killed, out of memory)."""


def train_run(config: dict, out: str, progress=None, tensorboard: bool = False) -> str:
    """Train (or resume, or find finished) one run folder; return its metrics path."""
    import torch

    from .runs import RunConfig, RunSession
    torch.set_num_threads(1)
    session = RunSession(RunConfig(**config), Path(out), log=lambda message: None)
    return str(session.train(on_epoch=progress, tensorboard=tensorboard))


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (even by kill -9),
    so no orphan goes on writing into a folder its driver has left. Elsewhere a
    thread watching the parent's pid does the same, within a second."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _local_worker(jobs, messages) -> None:
    """Take (name, config, out) jobs until None; PyTorch is imported once per worker, not per run."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides; Ctrl-C reaches the whole group
    while (job := jobs.get()) is not None:
        name, config, out, tensorboard = job
        try:
            train_run(config, out, progress=lambda epoch: messages.put(("progress", name, epoch)),
                      tensorboard=tensorboard)
            messages.put(("done", name, None))
        except BaseException as e:
            messages.put(("error", name, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"))
            return


def run_local(jobs: list[tuple[str, dict, str]], workers: int, on_progress=None, on_done=None,
              tensorboard: bool = False) -> None:
    """The jobs (name, config, run folder) on `workers` spawned worker processes (a
    clean interpreter: no inherited thread pools or locks), in the order given.
    On any exception here, SIGTERM and Ctrl-C included, every worker is killed
    before this returns."""
    ctx = mp.get_context("spawn")
    queue, messages = ctx.Queue(), ctx.Queue()
    for job in jobs:
        queue.put((*job, tensorboard))
    procs = [ctx.Process(target=_local_worker, args=(queue, messages), daemon=True, name=f"mogvae-worker-{i}")
             for i in range(max(1, min(workers, len(jobs))))]
    for proc in procs:
        queue.put(None)
        proc.start()
    remaining = {name for name, _, _ in jobs}
    try:
        while remaining:
            try:
                kind, name, payload = messages.get(timeout=0.2)
            except queues.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]  # 0: ran out of jobs
                if dead and messages.empty():   # a worker says "done" before taking the next job: none came
                    raise WorkerFailed(f"a worker died (exit code {dead[0].exitcode}) while training one of "
                                       f"{sorted(remaining)}")
                continue
            if kind == "progress":
                faults.point("progress")
                if on_progress:
                    on_progress(name, payload)
            elif kind == "error":
                raise WorkerFailed(f"training {name} failed: {payload}")
            else:
                remaining.discard(name)
                if on_done:
                    on_done(name)
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.exitcode is None:
                proc.kill()
            proc.join()


def run_in_process(jobs: list[tuple[str, dict, str]], on_progress=None, on_done=None,
                   tensorboard: bool = False) -> None:
    """One job after another in this process (workers = 1, and the tests)."""
    for name, config, out in jobs:
        train_run(config, out, progress=lambda epoch, name=name: on_progress and on_progress(name, epoch),
                  tensorboard=tensorboard)
        if on_done:
            on_done(name)


def run_dask(jobs: list[tuple[str, dict, str]], address: str, on_done=None, retries: int = 2,
             tensorboard: bool = False) -> None:
    """Submit each job to the Dask scheduler at `address`; return when all are done.
    A failed task is retried `retries` times; a task whose worker dies is
    rescheduled by the scheduler itself. Either way the run resumes from its
    newest checkpoint in the shared folder."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise WorkerFailed("--scheduler needs Dask distributed: pip install 'mogvae[cluster]'") from None
    try:
        client = Client(address, timeout="15s")
    except (OSError, TimeoutError) as e:
        raise WorkerFailed(f"--scheduler {address}: cannot connect ({e})") from None
    with client:
        # a key unique to this run folder: two sweeps on one scheduler never share a result
        futures = {client.submit(train_run, config, out, tensorboard=tensorboard, pure=False, retries=retries,
                                 key=f"mogvae-run-{hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]}"):
                   name for name, config, out in jobs}
        for future in as_completed(futures):
            name = futures[future]
            if future.status != "finished":
                raise WorkerFailed(f"training {name} failed on the cluster: {future.exception()}")
            if on_done:
                on_done(name)
