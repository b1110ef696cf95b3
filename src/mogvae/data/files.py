"""Data files: a .npy or text file of one point per row, read with limits and
refusals that name the file and the row (DataError), and cut into splits."""
from __future__ import annotations

import io
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from .base import MAX_POINTS, DataSource, FractionSplits, Source, UnknownTruth


class DataError(ValueError):
    """A data file that cannot be used: the message names the file and the row."""


MAX_ABS_VALUE = 1e6          # larger values overflow float32 losses: standardize such data first
MAX_FILE_BYTES = 512 * 2**20  # a data file is read whole into memory
MAX_LINE = 16_384             # characters in one row of a text file
MAX_COLUMNS = 1000            # observed dimensions a file may have


def _open_regular(path):
    """A regular file of at most MAX_FILE_BYTES, opened for reading. A folder, FIFO
    or device is named as such (never opened: a FIFO would block)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path}: is a folder, not a data file")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: not a regular file (a FIFO, socket or device)")
    if st.st_size > MAX_FILE_BYTES:
        raise DataError(f"{path}: {st.st_size:,} bytes; data files are limited to {MAX_FILE_BYTES:,}")
    try:
        raw = open(path, "rb", buffering=0)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return io.BufferedReader(_Snapshot(raw, st.st_size))


class _Snapshot(io.RawIOBase):
    """A file as large as it was when its size was checked: what a writer appends while it is
    read is not read (a file that grows mid-read once broke the line count's array)."""

    def __init__(self, raw, size: int):
        self.raw, self.size, self.left = raw, size, size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(memoryview(buffer)[:self.left]) if self.left else 0
        self.left -= n or 0
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self.raw.seek(offset, whence)
        self.left = max(0, self.size - position)
        return position

    def tell(self) -> int:
        return self.size - self.left

    def close(self) -> None:
        self.raw.close()
        super().close()


def _read_npy(path, fh) -> np.ndarray:
    try:
        y = np.load(fh, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError, ... for files that are not .npy
        first = (str(e).splitlines() or [type(e).__name__])[0][:80] or type(e).__name__
        raise DataError(f"{path}: not a readable .npy of numbers ({first})") from None
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim not in (1, 2) or (y.ndim == 2 and not 1 <= y.shape[1] <= MAX_COLUMNS):
        raise DataError(f"{path}: expected one point per row (at most {MAX_COLUMNS} columns), got an array of "
                        f"shape {y.shape}")
    if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
        raise DataError(f"{path}: expected real numbers, got dtype {y.dtype}")
    return y


class _BadValues:
    """Rows holding NaN or inf, or values beyond +-MAX_ABS_VALUE, gathered over a file read in
    chunks: how many of each, and the first one's row and value (for the one-line refusal)."""

    def __init__(self):
        self.count, self.first = {"finite": 0, "big": 0}, {}

    def add(self, values: np.ndarray, rows) -> None:
        """values [m, W]; rows() -> their row numbers [m], asked for only when one is bad."""
        with np.errstate(invalid="ignore"):
            for kind, mask in (("finite", ~np.isfinite(values)), ("big", np.abs(values) > MAX_ABS_VALUE)):
                hit = mask.any(1)
                if hit.any():
                    self.count[kind] += int(hit.sum())
                    if kind not in self.first:
                        i = int(np.argmax(hit))
                        self.first[kind] = (rows()[i], values[i][mask[i]][0])

    def check(self, path) -> None:
        if self.count["finite"]:
            row, value = self.first["finite"]
            raise DataError(f"{path}: row {row}: {value} is not finite ({self.count['finite']} such rows)")
        if self.count["big"]:
            row, value = self.first["big"]
            raise DataError(f"{path}: row {row}: {value:g} is beyond +-{MAX_ABS_VALUE:g} "
                            f"({self.count['big']} such rows); standardize the data first")


TEXT_BLOCK = 2**18                   # bytes of a text file parsed at a time
_TRAILING_COMMAS = re.compile(r",+[ \t\r\f\v]*(?=#|\n|\Z)")   # "1,2,\n" is the row 1,2


def _text_blocks(path, fh):
    """(row number of its first line, its text) for blocks of about TEXT_BLOCK bytes that end at a
    line end, read from fh (binary). A line longer than MAX_LINE bytes is refused when its turn
    comes (after the lines before it), having read at most MAX_LINE + TEXT_BLOCK bytes of it."""
    row, rest = 1, b""
    while True:
        chunk = fh.read(TEXT_BLOCK)
        data = rest + chunk
        cut = data.rfind(b"\n") + 1 if chunk else len(data)          # at the end, all that is left
        block, rest = data[:cut], data[cut:]
        ends = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n"))
        if block and not block.endswith(b"\n"):
            ends = np.append(ends, len(block))                        # the last line, without a line end
        long = np.flatnonzero(np.diff(ends, prepend=-1) - 1 > MAX_LINE)
        if len(long) or len(rest) > MAX_LINE:                         # rest: a line with no end in sight
            i = int(long[0]) if len(long) else len(ends)
            if i:
                yield row, _decode(block[:int(ends[i - 1]) + 1])
            raise DataError(f"{path}: row {row + i}: longer than {MAX_LINE} characters")
        if block:
            yield row, _decode(block)
            row += len(ends)
        if not chunk:
            return


def _decode(block: bytes) -> str:
    """A block as text, without its last line end (undecodable bytes replaced: they are no number)."""
    text = block.decode("utf-8", errors="replace")
    return text[:-1] if text.endswith("\n") else text


def _row_text(line: str) -> str:
    """What a row holds: the text before any #, without surrounding spaces or trailing commas."""
    return line.split("#")[0].strip().rstrip(",")


def _fields(text: str) -> list[str]:
    """A row's values: separated by commas if it has any, else by spaces."""
    return [f.strip() for f in (text.split(",") if "," in text else text.split())]


def _parse_lines(path, text: str, row: int, width: int) -> tuple[np.ndarray, list[int]]:
    """The rows of a block (its first row's number, `row`) by Python's float(), with the refusal
    that names the row (and column): (values [m, width], their row numbers). For the blocks numpy's
    parser does not take whole, and to name the row of a bad value."""
    values, rows = [], []
    for n, line in enumerate(text.split("\n"), row):
        content = _row_text(line)
        if not content:
            continue
        fields = _fields(content)
        if len(fields) != width:
            raise DataError(f"{path}: row {n}: {len(fields)} values, but the first row has {width}")
        for column, field in enumerate(fields, 1):
            try:
                values.append(float(field))
            except ValueError:
                where = f", column {column}" if width > 1 else ""
                raise DataError(f"{path}: row {n}{where}: not a number ({field[:40]!r})") from None
        rows.append(n)
    return np.array(values, dtype=np.float64).reshape(-1, width), rows


def _parse_fast(text: str, width: int, separator: str | None) -> np.ndarray | None:
    """The rows of a block by numpy's C parser ([m, width]), or None where it does not take them all
    as _parse_lines would (then _parse_lines decides). Trailing commas and CRs are dropped first."""
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if "," in text:
        text = _TRAILING_COMMAS.sub("", text)
    rows = text.split("\n")        # numpy takes a list of lines without a Python loop over them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                            # a block of comments: "no data"
            values = np.loadtxt(rows, dtype=np.float64, comments="#", delimiter=separator, ndmin=2)
    except ValueError:
        return None
    return values if values.shape[1] == width or not values.size else None


def _read_text(path, fh) -> np.ndarray:
    """One point per row, its values separated by commas or spaces (# comments), every row as wide
    as the first, streamed a block at a time: numpy's C parser reads each block into an array sized
    by the file's line count (measured, 100 MB of one-digit rows: 14 s and 8 bytes a value, where a
    Python loop over lines took 170 s and 25 bytes a value). A block it does not take (a word, a
    ragged row, mixed separators) is read again line by line, which names the bad row (and column)
    or takes what float() takes. NaN, inf and values beyond +-MAX_ABS_VALUE are refused once the
    whole file is read, naming the first such row and how many there are."""
    lines_in_file = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(TEXT_BLOCK), b"")) + 1
    fh.seek(0)
    y, n, width, separator, bad = None, 0, None, None, _BadValues()
    for row, text in _text_blocks(path, fh):
        if width is None:
            first = next(((i, t) for i, line in enumerate(text.split("\n")) if (t := _row_text(line))), None)
            if first is None:
                continue
            width, separator = len(_fields(first[1])), "," if "," in first[1] else None
            if width > MAX_COLUMNS:
                raise DataError(f"{path}: row {row + first[0]}: {width} values; a data file has at most "
                                f"{MAX_COLUMNS} columns")
            y = np.empty((lines_in_file, width))
        values = _parse_fast(text, width, separator)
        if values is None:
            values = _parse_lines(path, text, row, width)[0]
        bad.add(values, lambda: _parse_lines(path, text, row, width)[1])
        y[n:n + len(values)] = values
        n += len(values)
    bad.check(path)
    if y is None:
        return np.empty(0)
    y.resize((n, width), refcheck=False)                              # in place: the unused rows go
    return y[:, 0] if width == 1 else y


def load_data_file(path) -> np.ndarray:
    """y values, [n] for one column or [n, D] for D, from a .npy (no pickles) or a text file
    with one point per line, its values separated by commas or spaces (# comments allowed).
    Refuses what is not a regular file or is larger than MAX_FILE_BYTES, empty files, ragged
    rows, other shapes, text, NaN, inf, and values beyond +-MAX_ABS_VALUE; each refusal names
    the file and, where there is one, the row."""
    npy = str(path).endswith(".npy")
    with _open_regular(path) as fh:   # a text file's values are checked as it is read
        y = np.asarray(_read_npy(path, fh), dtype=np.float64) if npy else _read_text(path, fh)
    if len(y) == 0:
        raise DataError(f"{path}: no data")
    if npy:
        bad, rows = _BadValues(), y.reshape(len(y), -1)
        for s in range(0, len(y), 4096):                              # no temporaries the size of y
            bad.add(rows[s:s + 4096], lambda: range(s + 1, s + 4097))
        bad.check(path)
    return y


class FileSource(FractionSplits):
    """Your own values: one row per point, one column per dimension (truth unknown: those metrics are NaN).
    The rows are shuffled by `seed` and split by the two fractions; a count set for a split takes exactly
    that many rows instead (a run written before fractions existed set all three)."""
    name: Literal["file"] = "file"
    path: str = Field(min_length=1, description="a .npy, .csv or .txt, one point per row (columns: dimensions); a relative path "
                      "is relative to where it is written: a file's folder, or the current directory for --set")
    n_train: int | None = Field(None, ge=1, le=MAX_POINTS, description="training rows (unset: every row the "
                                "validation and test splits leave)")
    n_val: int | None = Field(None, ge=1, le=MAX_POINTS, description="validation rows (unset: val_fraction of the rows)")
    n_test: int | None = Field(None, ge=1, le=MAX_POINTS, description="test rows (unset: test_fraction of the rows)")

    def sizes_for(self, rows: int) -> dict[str, int]:
        """Rows per split for a file of `rows` rows; DataError, saying what to set, where they do not fit."""
        val = self.n_val if self.n_val is not None else round(self.val_fraction * rows)
        test = self.n_test if self.n_test is not None else round(self.test_fraction * rows)
        train = self.n_train if self.n_train is not None else rows - val - test
        sizes = {"train": train, "val": val, "test": test}
        if sum(sizes.values()) > rows:
            raise DataError(f"{self.path}: {rows} rows, but the splits ask for {sum(sizes.values())} "
                            f"({', '.join(f'n_{k} = {v}' for k, v in sizes.items())}): lower data.n_train, n_val or "
                            "n_test, or leave them unset to split every row by data.val_fraction and test_fraction")
        empty = [k for k, v in sizes.items() if v < 1]
        if empty:
            raise DataError(f"{self.path}: {rows} rows leave the {empty[0]} split empty at data.val_fraction = "
                            f"{self.val_fraction:g} and test_fraction = {self.test_fraction:g}: use a file of more rows")
        return sizes


def split_file_data(y: np.ndarray, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """A seeded shuffle of a data file cut into the requested splits (sizes that fit: sizes_for)."""
    order = np.random.default_rng(seed).permutation(len(y))
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = y[order[start:start + n]]
        start += n
    return out


def load_file(d: FileSource) -> Source:
    y = load_data_file(d.path)
    flat = y.reshape(len(y), -1)
    constant = np.flatnonzero(flat.min(0) == flat.max(0))
    if len(constant):    # no spread to model: its std ratio and every density in it would be degenerate
        raise DataError(f"{d.path}: column {constant[0] + 1} holds one value ({flat[0, constant[0]]:g}) in every row; "
                        "drop constant columns first")
    splits = split_file_data(y, d.sizes_for(len(y)), d.seed)
    return Source(splits, UnknownTruth(), 1 if y.ndim == 1 else y.shape[1])


SOURCE = DataSource(FileSource, load_file)
