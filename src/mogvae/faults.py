"""Faults at chosen points, so that tests of crash safety do not depend on the
machine's speed. `MOGVAE_FAULT="POINT:K:SIGNAL"` makes the process send itself
SIGNAL (KILL, TERM or INT) the K-th time it passes POINT:

    epoch       after an epoch's history line is appended, before its checkpoint
    checkpoint  inside a checkpoint write: the temporary is complete, not yet renamed
    progress    in `reproduce`'s driver, on the K-th progress report of a worker

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
    where, k, sig = spec.split(":")
    if where != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(k):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
