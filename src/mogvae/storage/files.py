"""Atomic file writes: a file either has its final name and full content, or
does not exist. Write to a temporary sibling, fsync, rename, fsync the folder."""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
import tempfile
from pathlib import Path

import numpy as np

from . import faults


def _file_mode() -> int:
    """What open() would give a new file under the current umask (mkstemp always gives 0600,
    which would keep collaborators out of a shared results folder)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fault: str | None = None) -> Path:
    """Write `data` to `path` atomically. The temporary is `.NAME.XXXXXXXX.tmp` beside it
    (folders.py recognizes exactly that pattern as mogvae's own); `fault` names a
    faults.py point passed between the complete temporary and the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:   # mkstemp inside the try: a SIGTERM raised just after it returns still removes the temporary
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _file_mode())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if fault:
            faults.point(fault)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_npy(path, array: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


def write_npz(path, arrays: dict[str, np.ndarray]) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())


class UnreadableFile(ValueError):
    """A file mogvae wrote and now reads back that is not what it wrote (a link, a FIFO, a
    device, too large, damaged): one line naming it. Nothing is read from such a file."""


MAX_RECORD_BYTES = 256 * 2**20   # sweep.json, metrics.csv, history.jsonl, status.json, config.json
MAX_ARRAY_BYTES = 2**31          # curves.npz, data/*.npy


def read_bytes(path, max_bytes: int = MAX_RECORD_BYTES) -> bytes:
    """The bytes of a regular file of at most max_bytes, as checkpoints are read: a
    symbolic link, FIFO, device or folder is refused without reading it (a link to
    /dev/zero never ends; a FIFO blocks forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        why = "a symbolic link" if e.errno == errno.ELOOP else e.strerror   # O_NOFOLLOW met a link
        raise UnreadableFile(f"{path}: cannot read ({why})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(f"{path}: not a regular file (a folder, FIFO, socket or device); mogvae reads "
                                 "back only the files it wrote")
        raise UnreadableFile(f"{path}: {st.st_size:,} bytes, more than mogvae ever writes there ({max_bytes:,})")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnreadableFile(f"{path}: grew past {max_bytes:,} bytes while being read")
    return data


def read_text(path, max_bytes: int = MAX_RECORD_BYTES) -> str:
    try:
        return read_bytes(path, max_bytes).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnreadableFile(f"{path}: damaged (not UTF-8 text at byte {e.start})") from None


def read_json(path, max_bytes: int = MAX_RECORD_BYTES):
    """A JSON file mogvae wrote; damaged or absurdly nested JSON is an UnreadableFile."""
    try:
        return json.loads(read_text(path, max_bytes))
    except (ValueError, RecursionError) as e:
        if isinstance(e, UnreadableFile):
            raise
        raise UnreadableFile(f"{path}: damaged (not the JSON mogvae wrote: {str(e)[:80] or 'too deeply nested'})") \
            from None


def read_npy(path, max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
    try:
        return np.load(io.BytesIO(read_bytes(path, max_bytes)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        if isinstance(e, UnreadableFile):
            raise
        raise UnreadableFile(f"{path}: damaged (not the .npy mogvae wrote)") from None


def read_npz(path, max_bytes: int = MAX_ARRAY_BYTES) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(read_bytes(path, max_bytes)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, KeyError) as e:
        if isinstance(e, UnreadableFile):
            raise
        raise UnreadableFile(f"{path}: damaged (not the .npz mogvae wrote)") from None


def write_csv(path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or (list(rows[0]) if rows else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def read_csv(path, max_bytes: int = MAX_RECORD_BYTES) -> list[dict[str, str]]:
    """Rows of a CSV file mogvae wrote; a row whose width differs from the header's is damage."""
    try:
        rows = list(csv.DictReader(io.StringIO(read_text(path, max_bytes), newline="")))
    except csv.Error as e:
        raise UnreadableFile(f"{path}: damaged ({e})") from None
    if any(None in row or None in row.values() for row in rows):
        raise UnreadableFile(f"{path}: damaged (a row's width differs from the header's)")
    return rows
