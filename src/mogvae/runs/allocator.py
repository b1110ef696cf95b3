"""glibc's allocator told to keep freed tensors' memory in the process instead of handing it back.

glibc's malloc serves a block above its mmap threshold (128 KiB at first, raised as blocks are freed)
by a fresh mapping that it unmaps on free, and gives the heap's free top back to the kernel above its
trim threshold; the next tensor of that size is then faulted in again, a page at a time. Evaluation
allocates and frees tensors of megabytes thousands of times a second (the gap search's chunks of up to
1e6 terms), and measured (docs/speed.md) on reproduce's mixture-posterior run, 100 points x 5 replicas,
one thread: 1.7-2.3 million minor page faults and 3-4.5 s of system time in an 18-19 s search; with
the threshold at glibc's ceiling (32 MiB) and no trimming, 0.16 million and 15.0 s. The cost: a process
keeps its peak heap until it exits (its peak itself was unchanged, about 500 MB either way). The
numbers computed are the same: only where memory comes from changes. What it buys depends on what the
process did before: a worker that has just trained had already raised glibc's threshold by its own frees,
and `mogvae reproduce` on defaults measured 314 -> 308 s (its gap search 181 -> 177 s summed), within
the machine's drift; an evaluation on its own (a run resumed after its training, `mogvae evaluate`) is
where the 22% above is paid.

Only processes that mogvae owns do this: the `mogvae` command and its local workers. Not a Dask
worker, which serves other tasks too and whose nanny sets MALLOC_TRIM_THRESHOLD_ so that it hands
memory back (a review measured a worker keeping 400-460 MiB between tasks with this setting), nor a
Python caller's process, nor one whose environment already chooses malloc's thresholds.
"""
from __future__ import annotations

import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20       # glibc's ceiling on 64-bit systems (HEAP_MAX_SIZE / 2); larger is refused
TRIM_THRESHOLD = 2**31 - 1      # an int: in effect never trim
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_kept = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap threshold to its ceiling and stop trimming, once per process; whether that
    holds now. Elsewhere (macOS, musl), or where the environment sets malloc's thresholds itself
    (MALLOC_*_ or GLIBC_TUNABLES' glibc.malloc), nothing changes and False is returned. Both settings
    are set together: setting either alone makes glibc stop raising the mmap threshold as it goes, and
    the trim threshold alone measured 2.3x slower (every block above 128 KiB mapped afresh)."""
    global _kept
    if _kept:
        return True
    if platform.libc_ver()[0] != "glibc" or any(name in os.environ for name in USER_SETTINGS) \
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    import ctypes      # here: a process that never computes (`mogvae --help`) does not load it
    libc = ctypes.CDLL(None)    # the process's own symbols, glibc's among them
    _kept = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _kept
