"""Faults at chosen points, so that tests of crash safety do not depend on the
machine's speed. `MOGVAE_FAULT="POINT:K:ACTION[:FILE]"` acts the K-th time a
process passes POINT. ACTION is

    KILL, TERM, INT  the process sends itself that signal
    ENOSPC, EIO ...  an errno name: the point raises that OSError (ENOSPC: a full disk)
    TERM-PARENT      SIGTERM to the sweep's driver (MOGVAE_DRIVER_PID, else the parent), then wait up to a minute
                     at the point for a signal of its own (the driver's answer)
    HOLD             wait at the point (up to five minutes) until FILE (needed) is removed

With FILE, only the first process to get there acts (it creates the file), so
that a restarted worker with the same environment goes on. Points:

    epoch       after an epoch's history line is appended, before its checkpoint
    checkpoint  inside a checkpoint write: the temporary is complete, not yet renamed
    progress    in a sweep's (or reproduce's) driver, on the K-th progress report of a worker
    gather      in a sweep's driver, after every run finished, before metrics.csv is rebuilt

Unset (always, outside tests), a point costs one dictionary lookup.
"""
from __future__ import annotations

import errno
import os
import signal
import time

_passes: dict[str, int] = {}
DRIVER_PID = "MOGVAE_DRIVER_PID"   # set in a local worker's environment: its driver is not its parent (the fork server is)


def point(name: str) -> None:
    spec = os.environ.get("MOGVAE_FAULT")
    if not spec:
        return
    where, k, action, *once = spec.split(":", 3)
    if where != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] != int(k):
        return
    if once:
        try:
            os.close(os.open(once[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if action.startswith("E"):
        code = getattr(errno, action)
        raise OSError(code, os.strerror(code))
    if action == "HOLD":
        deadline = time.monotonic() + 300
        while os.path.exists(once[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    if action == "TERM-PARENT":
        os.kill(int(os.environ.get(DRIVER_PID, os.getppid())), signal.SIGTERM)
        time.sleep(60)
        return
    os.kill(os.getpid(), getattr(signal, f"SIG{action}"))
