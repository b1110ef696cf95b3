"""Faults at chosen points, so that tests of crash safety do not depend on the
machine's speed. `MOGVAE_FAULT="POINT:K:SIGNAL[:ONCE_FILE]"` makes the process send
itself SIGNAL (KILL, TERM or INT) the K-th time it passes POINT; with ONCE_FILE,
only the first process to get there does (it creates the file), so that a
restarted worker with the same environment goes on. Points:

    epoch       after an epoch's history line is appended, before its checkpoint
    checkpoint  inside a checkpoint write: the temporary is complete, not yet renamed
    progress    in a sweep's (or reproduce's) driver, on the K-th progress report of a worker
    gather      in a sweep's driver, after every run finished, before metrics.csv is rebuilt

Unset (always, outside tests), a point costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

_passes: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("MOGVAE_FAULT")
    if not spec:
        return
    where, k, sig, *once = spec.split(":", 3)
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
    os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
