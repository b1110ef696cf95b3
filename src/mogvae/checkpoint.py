"""Checkpoints that load without executing code: one safetensors file holding
every tensor, with the rest of the state as JSON in its header, and a SHA-256
of the tensor payload so that a flipped bit is refused rather than resumed."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .io import atomic_write_bytes

FORMAT = "mogvae-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: unreadable, truncated, altered, or not ours."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    header = {"format": FORMAT, "meta": json.dumps(meta, allow_nan=True), "sha256": _digest(tensors)}
    return atomic_write_bytes(path, safetensors_save(tensors, metadata=header), fault="checkpoint")


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes. A symlink, FIFO, device or
    folder is refused without reading it (a link to /dev/zero never ends; a FIFO blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        why = "a symbolic link" if e.errno == errno.ELOOP else e.strerror  # O_NOFOLLOW met a link
        raise CheckpointError(f"{path}: cannot read ({why})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file")
        raise CheckpointError(f"{path}: {st.st_size} bytes, more than a checkpoint of this run can hold ({max_bytes})")
    with os.fdopen(fd, "rb") as fh:
        return fh.read(max_bytes + 1)


def load_checkpoint(path: Path, max_bytes: int = 2**31) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint; any problem is a one-line CheckpointError."""
    data = _read_regular_file(Path(path), max_bytes)
    if len(data) > max_bytes:
        raise CheckpointError(f"{path}: grew past {max_bytes} bytes while being read")
    if not data:
        raise CheckpointError(f"{path}: empty file")
    try:
        tensors = safetensors_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])["__metadata__"]
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a valid mogvae checkpoint ({first[:120]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a mogvae checkpoint (no metadata object)")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a mogvae checkpoint (format {header.get('format')!r})")
    if _digest(tensors) != header.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch (the file was altered or damaged)")
    try:
        meta = json.loads(header["meta"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable metadata ({str(e)[:120]})") from None
    return tensors, meta
