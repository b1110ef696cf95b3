"""Executors: who runs the runs of a sweep. Only configurations (plain dicts), paths
and mogvae's own callables (what to do once a run is finished: draw its figures)
travel to workers, never user objects; a run is `train_run`, the same
function whichever executor calls it, on one intra-op thread, so its numbers
are bitwise the same everywhere.

- local: single-threaded worker processes, one per core (docs/speed.md),
  which die with their driver, even after kill -9, and are asked to stop
  (SIGTERM) before they are killed when the driver stops on its own;
- dask: an existing Dask distributed scheduler (`--scheduler tcp://HOST:PORT`).
  The run folders must be on a filesystem the workers share. A run whose worker
  dies is rescheduled by Dask on another worker and resumes from its checkpoint;
  a run still held by the task of a driver killed earlier is waited for.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path

from ..storage import faults
from .allocator import keep_freed_memory

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class WorkerFailed(RuntimeError):
    """A worker raised, or died without a word (killed, out of memory): one line, naming the run."""


class SchedulerLost(WorkerFailed):
    """The Dask scheduler went away mid-sweep."""


class SchedulerUnavailable(ValueError):
    """--scheduler names no scheduler that can be reached: a usage error, found before any folder is made."""


def train_run(config: dict, out: str, progress=None, tensorboard: bool = False, wait_for_lock: bool = False) -> str:
    """Train (or resume, or find finished) one run folder; return its metrics path.
    `wait_for_lock`: wait for whoever holds the run folder instead of refusing."""
    import torch

    from .run import RunConfig, RunSession
    torch.set_num_threads(1)
    session = RunSession(RunConfig(**config), Path(out), log=lambda message: None, wait_for_lock=wait_for_lock)
    return str(session.train(on_epoch=progress, tensorboard=tensorboard))


def _then(after, out: str) -> None:
    """What the driver asked to be done where a run has just finished, beside the other runs (a sweep's
    report has its figures drawn there: `after(out)`). The run is finished and saved whatever happens
    here; a drawing that fails is only drawn again by the report, which then says why."""
    if after is None:
        return
    try:
        after(out)
    except Exception:       # noqa: BLE001 -- not the run's failure; the report meets it again and reports it
        pass


def _die_with_parent(driver: int) -> None:
    """Linux: the kernel kills this process when its parent dies (even by kill -9),
    so no orphan goes on writing into a folder its driver has left. The parent is the
    fork server, which exits as soon as its driver is gone. Elsewhere, and as a second
    guard, a thread watching the parent's and the driver's pids does the same within a second."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = os.getppid()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def watch():
        while os.getppid() == parent and alive(driver):
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


class _Stop(SystemExit):
    """The driver's SIGTERM, raised wherever the worker is, so that a write in
    progress removes its temporary on the way out (storage.files.atomic_write_bytes).
    A SystemExit: the process then ends quietly, with no traceback."""


def _on_sigterm(signum, frame):
    raise _Stop(128 + signum)


def _stop_where_it_can_raise(unraisable) -> None:
    """sys.unraisablehook of a worker: a SIGTERM that lands in a callback Python cannot raise
    from (a weakref's, during an import) would be 'ignored' with a traceback on stderr and the
    worker would go on; it is delivered again instead, from a thread once this hook has
    returned (sent from here, it would land in the hook, as unraisable), to stop the worker
    where it can raise. Anything else is reported as Python does."""
    if isinstance(unraisable.exc_value, _Stop):
        again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
        again.daemon = True
        again.start()
        return
    sys.__unraisablehook__(unraisable)


def _failure(e: BaseException) -> dict:
    """A worker's exception as plain data: one line of text, and what the driver
    needs to re-raise a full disk as the OSError it is."""
    filename = getattr(e, "filename", None)
    return {"text": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}",
            "errno": getattr(e, "errno", None) if isinstance(e, OSError) else None,
            "strerror": getattr(e, "strerror", None), "filename": None if filename is None else str(filename)}


# What a worker imports, once per driver process rather than once per worker: the fork server
# imports it, then forks each worker from itself (measured: a spawned worker spent 4-5 s importing
# PyTorch, its compiler and SciPy before its first epoch; since, training imports neither: training/adam.py,
# estimators/evaluate.py's _w1). A worker that compiles imports the compiler itself (training/compiled.py).
WORKER_PRELOAD = ["mogvae.runs.executors", "mogvae.runs.run", "mogvae.estimators.evaluate"]
SERVER_FOLDER = "MOGVAE_FORKSERVER_FOLDER"   # the driver's multiprocessing folder, which holds the server's socket
# A Unix socket's path holds at most 107 bytes: TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX must fit, or the fork server
# cannot start ("AF_UNIX path too long", met with a long TMPDIR); beyond this, workers are spawned instead.
SOCKET_FOLDER_ROOM = 107 - len("/pymp-XXXXXXXX/listener-XXXXXXXX")


def _worker_context():
    """Workers fork from a fork server: a clean single-threaded process (no inherited thread
    pools or locks, as with spawn) that has already imported WORKER_PRELOAD; spawn where
    there is no fork server (Windows) or where its socket's path would be too long. The server's socket lies in the driver's multiprocessing
    folder (/tmp/pymp-*), which the driver removes as it exits, but not when it is killed: the
    server, which exits as soon as its driver is gone, then removes it (`_tidy_after_driver`)."""
    import tempfile
    if "forkserver" not in mp.get_all_start_methods() or \
            len(os.fsencode(tempfile.gettempdir())) > SOCKET_FOLDER_ROOM:
        return mp.get_context("spawn")
    from multiprocessing import util
    os.environ[SERVER_FOLDER] = util.get_temp_dir()   # before the server starts: it inherits this environment
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)
    return ctx


def _tidy_after_driver() -> None:
    """In the fork server (which imports this module first): remove the driver's multiprocessing
    folder when the server exits, which it does once the driver is gone. A driver killed by kill -9
    otherwise left it behind, with the server's socket in it. Only a folder named as multiprocessing
    names its own (pymp-*) is removed."""
    import atexit
    import shutil
    folder = os.environ.get(SERVER_FOLDER)
    if folder and Path(folder).name.startswith("pymp-") and mp.current_process().name == "MainProcess":
        atexit.register(shutil.rmtree, folder, True)


if "multiprocessing.forkserver" in sys.modules and sys.argv[:1] == ["-c"]:
    _tidy_after_driver()


def _driver_environment() -> dict:
    """The driver's environment now, and its pid: a forked worker starts with the fork server's
    environment (the driver's when the server started), and the fork server is its parent."""
    return {**os.environ, faults.DRIVER_PID: str(os.getpid())}


def _local_worker(conn, tensorboard: bool, environment: dict) -> None:
    """Train the (name, config, out, after) jobs the driver sends over `conn` until it sends
    None, each followed by `after` (_then); PyTorch is imported once per driver (WORKER_PRELOAD),
    not per run. Reports go back on the same pipe: ("progress", epoch), ("done", None) or
    ("error", failure)."""
    os.environ.clear()
    os.environ.update(environment)
    _die_with_parent(int(environment[faults.DRIVER_PID]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides; Ctrl-C reaches the whole group
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.unraisablehook = _stop_where_it_can_raise
    keep_freed_memory()      # a process of mogvae's own (not a Dask worker's, nor a caller's): runs/allocator.py
    try:
        while (job := conn.recv()) is not None:
            name, config, out, after = job
            try:
                train_run(config, out, progress=lambda epoch: conn.send(("progress", epoch)), tensorboard=tensorboard)
                _then(after, out)
            except _Stop:
                raise
            except BaseException as e:
                conn.send(("error", _failure(e)))
                return
            conn.send(("done", None))
    except (EOFError, OSError):  # the driver is gone: nobody to report to
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # from here on nothing is written: SIGTERM may just end it


def _death(proc, name: str) -> str:
    """The one line for a worker that closed its pipe without a word (killed, out of memory)."""
    proc.join(5)  # its pipe closed as it exited: the exit status follows at once
    code = proc.exitcode
    how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
           else f"exit code {code}" if code is not None else "no exit status")
    return (f"a worker died ({how}) while training {name}; its run keeps its last checkpoint: "
            "re-run the same command to resume")


def _stop(procs, grace: float) -> None:
    """Ask the workers still running to stop (SIGTERM, which a worker turns into an
    exception, so a write caught midway removes its temporary), then kill whichever
    has not exited after `grace` seconds. Every worker is gone when this returns,
    even if a second signal interrupts the wait."""
    alive = [p for p in procs if p.exitcode is None]
    try:
        for proc in alive:
            proc.terminate()
        deadline = time.monotonic() + grace
        while (alive := [p for p in alive if p.exitcode is None]) and time.monotonic() < deadline:
            wait([p.sentinel for p in alive], timeout=deadline - time.monotonic())
    finally:
        for proc in procs:
            if proc.exitcode is None:
                proc.kill()
            proc.join()


def run_local(jobs: list[tuple], workers: int, on_progress=None, on_done=None,
              tensorboard: bool = False, grace: float = 10.0) -> None:
    """The jobs (name, config, run folder, what to do after it: _then) on `workers` spawned
    worker processes (a clean interpreter: no inherited thread pools or locks), in the order given: the
    driver hands each idle worker the next job. One pipe per worker and nothing
    else: no multiprocessing.Queue or Lock, whose named semaphores outlive a driver
    killed by kill -9 (Python's resource tracker then warns of leaked semaphores).
    A worker that dies closes its pipe: the driver notices at once. On any
    exception here, SIGTERM and Ctrl-C included, every worker is stopped (see
    `_stop`) before this returns."""
    if not jobs:
        return
    ctx = _worker_context()
    todo = [*reversed(jobs)]          # pop() from the end: the order given
    procs, busy = {}, {}              # the driver's end of each pipe: its worker, and the run it trains
    try:
        for i in range(max(1, min(workers, len(jobs)))):
            conn, theirs = ctx.Pipe()
            proc = ctx.Process(target=_local_worker, args=(theirs, tensorboard, _driver_environment()),
                               daemon=True, name=f"mogvae-worker-{i}")
            proc.start()
            procs[conn] = proc
            theirs.close()            # the worker holds the only other end: EOF means it is gone
            _hand_out(conn, todo, busy)
        while busy:
            for conn in wait(list(busy)):
                name = busy[conn]
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    raise WorkerFailed(_death(procs[conn], name)) from None
                if kind == "progress":
                    faults.point("progress")
                    if on_progress:
                        on_progress(name, payload)
                elif kind == "error":
                    if payload["errno"] in DISK_FULL:  # the CLI's one line for a full disk, not a worker failure
                        raise OSError(payload["errno"], payload["strerror"], payload["filename"])
                    raise WorkerFailed(f"training {name} failed: {payload['text']}")
                else:
                    _hand_out(conn, todo, busy)
                    if on_done:
                        on_done(name)
        for proc in procs.values():
            proc.join()
    finally:
        _stop(list(procs.values()), grace)
        for conn in procs:
            conn.close()


def _hand_out(conn, todo: list, busy: dict) -> None:
    """The worker at `conn` is idle: send it the next job, or None (it exits)."""
    busy.pop(conn, None)
    if todo:
        busy[conn] = todo[-1][0]
        conn.send(todo.pop())
    else:
        conn.send(None)


def run_in_process(jobs: list[tuple], on_progress=None, on_done=None, tensorboard: bool = False) -> None:
    """One job after another in this process (workers = 1, and the tests)."""
    for name, config, out, after in jobs:
        train_run(config, out, progress=lambda epoch, name=name: on_progress and on_progress(name, epoch),
                  tensorboard=tensorboard)
        _then(after, out)
        if on_done:
            on_done(name)


def _printable(address: str) -> str:
    return address if address.isprintable() else ascii(address)


def check_scheduler(address: str, timeout: float = 5.0) -> None:
    """Raise SchedulerUnavailable, in one line naming the address, if it is not a
    Dask address or nothing answers there. A plain connect answers a refused port
    at once, where Dask's client would retry for its whole timeout."""
    shown = _printable(address)
    try:
        from distributed.comm import parse_address
        from distributed.comm.addressing import parse_host_port
        from distributed.comm.registry import get_backend
    except ImportError:
        raise SchedulerUnavailable(f"--scheduler {shown}: needs Dask distributed: "
                                   "pip install 'mogvae[cluster]'") from None
    try:
        scheme, location = parse_address(address)
        get_backend(scheme)
        if scheme == "inproc":
            raise ValueError("an in-process address cannot be reached from another process")
        host, port = parse_host_port(location)
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is not 1 to 65535")
    except ValueError as e:
        why = " ".join(str(e).split())
        raise SchedulerUnavailable(f"--scheduler {shown}: not a scheduler address ({why}); "
                                   "expected e.g. tcp://10.0.0.5:8786") from None
    if scheme not in ("tcp", "tls", "ws", "wss"):  # ucx: not a TCP port to probe
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return
    except ConnectionRefusedError:
        why = "connection refused: is a scheduler running there?"
    except socket.gaierror:
        why = f"unknown host {_printable(host)}"
    except TimeoutError:
        why = f"no answer within {timeout:g} s"
    except (OSError, ValueError) as e:
        why = " ".join(str(getattr(e, "strerror", None) or e).split())
    raise SchedulerUnavailable(f"--scheduler {shown}: cannot connect ({why})")


@contextlib.contextmanager
def _quiet(*names: str):
    """Silence these loggers and their children for a while: distributed logs a lost
    scheduler as errors and tracebacks on stderr, where the CLI promises one line."""
    prefixes = tuple(f"{n}." for n in names)
    loggers = [logging.getLogger(n) for n in names] + [
        lg for n, lg in list(logging.Logger.manager.loggerDict.items())
        if n.startswith(prefixes) and isinstance(lg, logging.Logger)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_dask(jobs: list[tuple], address: str, on_done=None, retries: int = 2,
             tensorboard: bool = False) -> None:
    """Submit each job to the Dask scheduler at `address`; return when all are done.
    A failed task is retried `retries` times; a task whose worker dies is
    rescheduled by the scheduler itself. Either way the run resumes from its
    newest checkpoint in the shared folder. A task waits for a run folder that an
    earlier task still holds (one of a driver killed before this one) instead of
    refusing it: it then finds the run finished, or resumes it."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise WorkerFailed("--scheduler needs Dask distributed: pip install 'mogvae[cluster]'") from None
    shown = _printable(address)
    with _quiet("distributed", "tornado", "asyncio"):
        try:
            client = Client(address, timeout="15s")
        except (OSError, TimeoutError) as e:
            raise WorkerFailed(f"--scheduler {shown}: cannot connect ({e})") from None
        with client:
            futures = {}
            for name, config, out, after in jobs:
                out = str(Path(out).resolve())   # the workers' working folder is not ours
                # a key unique to this run folder: two sweeps on one scheduler never share a result
                key = f"mogvae-run-{hashlib.sha256(out.encode()).hexdigest()[:16]}"
                futures[client.submit(_dask_task, config, out, tensorboard, after,
                                      pure=False, retries=retries, key=key)] = name
            for future in as_completed(futures):
                name = futures[future]
                if future.status != "finished":
                    _raise_failure(future, name, client.status, shown)
                if on_done:
                    on_done(name)


def _dask_task(config: dict, out: str, tensorboard: bool, after) -> str:
    """A run as a Dask task: train_run, waiting for a folder an earlier driver's task still holds, then _then."""
    metrics = train_run(config, out, tensorboard=tensorboard, wait_for_lock=True)
    _then(after, out)
    return metrics


def _raise_failure(future, name: str, client_status: str, address: str) -> None:
    """One line for a task that did not finish: the scheduler went away (the client
    then cancels every future at once), a full disk, or the task's own error."""
    if client_status != "running":
        raise SchedulerLost(f"the Dask scheduler at {address} went away; the runs keep their checkpoints: "
                            "run the same command again once a scheduler is back to resume")
    if future.cancelled():
        raise WorkerFailed(f"training {name} was cancelled on the cluster; its run keeps its checkpoints: "
                           "run the same command again to resume")
    error = future.exception()
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        raise OSError(error.errno, error.strerror, error.filename)
    text = (str(error).splitlines() or [""])[0][:200]
    raise WorkerFailed(f"training {name} failed on the cluster: {type(error).__name__}: {text}")
