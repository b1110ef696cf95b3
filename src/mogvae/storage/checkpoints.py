"""Checkpoints that load without executing code: one safetensors file holding
every tensor, with the rest of the state as JSON in its header, and a SHA-256
of the tensor payload so that a flipped bit is refused rather than resumed."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .files import UnreadableFile, atomic_write_bytes, read_bytes

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


def load_checkpoint(path: Path, max_bytes: int = 2**31) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint; any problem is a one-line CheckpointError."""
    try:
        data = read_bytes(Path(path), max_bytes)      # a link, FIFO or device is refused unread
    except UnreadableFile as e:
        raise CheckpointError(str(e)) from None
    if not data:
        raise CheckpointError(f"{path}: empty file")
    try:
        tensors = safetensors_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])["__metadata__"]
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError, RecursionError) as e:
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
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable metadata ({str(e)[:120] or type(e).__name__})") from None
    return tensors, meta
