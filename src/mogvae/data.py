"""Data sources with a known truth.

The paper's process (§3.1): z ~ U(0, 1), y | z ~ N(f(z), sigma^2) with
f(z) = 1[z<0.5] (2z-0.5)^2 + 1[z>=0.5] (2z-1.5)^2.
The paper writes N(f(z), 0.01); we read 0.01 as the variance, so sigma = 0.1.

Everything here is float64 NumPy: the truth is the reference the models are
measured against, so it is computed more precisely than the models are.
"""
from __future__ import annotations

import io
import math
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
from numpy.polynomial.legendre import leggauss
from scipy.special import logsumexp

KINK = 0.5  # f is continuous but not differentiable here: always a quadrature node


def _check_positive_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def kinked_rule(half_panels: int, nodes_per_panel: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre on [0, 1]: `half_panels` equal panels on each side of KINK (so
    KINK is an edge, and the rule sees only smooth pieces), `nodes_per_panel` nodes each.
    Returns (nodes, weights), float64."""
    x, w = leggauss(nodes_per_panel)
    edges = np.linspace(0.0, 1.0, 2 * half_panels + 1)
    a, b = edges[:-1, None], edges[1:, None]
    return ((b - a) / 2 * x + (a + b) / 2).ravel(), ((b - a) / 2 * w).ravel()


class PaperProcess:
    """The 1-D process of the paper with its exact marginal and posterior."""

    name = "paper"
    latent_support = (0.0, 1.0)

    def __init__(self, sigma: float = 0.1, nodes_per_panel: int = 16):
        self.sigma = _check_positive_finite("sigma", sigma)
        # Composite Gauss-Legendre on each smooth piece [0, .5] and [.5, 1].
        # p(y|z) as a function of z varies on the scale sigma / |f'(z)| >= sigma / 2,
        # so panels a quarter of that wide make the rule exact to float64 precision.
        panels = max(32, math.ceil(KINK / (self.sigma / 8)))
        self._z_nodes, weights = kinked_rule(panels, nodes_per_panel)
        self._log_w = np.log(weights)

    @staticmethod
    def f(z):
        """The true decoder, for NumPy arrays or scalars."""
        z = np.asarray(z, dtype=np.float64)
        return np.where(z < KINK, (2 * z - 0.5) ** 2, (2 * z - 1.5) ** 2)

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw n pairs (z, y), float64, reproducibly from `seed`."""
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        rng = np.random.default_rng(seed)
        z = rng.uniform(0.0, 1.0, size=int(n))
        y = self.f(z) + self.sigma * rng.standard_normal(int(n))
        return z, y

    def log_likelihood(self, y, z) -> np.ndarray:
        """log N(y; f(z), sigma^2), broadcasting y against z."""
        y, z = np.asarray(y, np.float64), np.asarray(z, np.float64)
        r = (y - self.f(z)) / self.sigma
        return -0.5 * r**2 - math.log(self.sigma) - 0.5 * math.log(2 * math.pi)

    def log_prob(self, y, budget: int = 4_000_000) -> np.ndarray:
        """Exact log p*(y) = log int_0^1 N(y; f(z), sigma^2) dz, per point, in chunks
        whose [points, nodes] terms stay within `budget` elements."""
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        out = np.empty_like(y)
        chunk = max(1, budget // len(self._z_nodes))
        for start in range(0, y.size, chunk):
            yc = y[start:start + chunk, None]
            out[start:start + chunk] = logsumexp(
                self.log_likelihood(yc, self._z_nodes[None]) + self._log_w, axis=1)
        return out

    def posterior(self, y, z_grid) -> np.ndarray:
        """Exact density p*(z|y) at z_grid (in [0, 1]); rows are values of y."""
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        z = np.asarray(z_grid, dtype=np.float64)
        inside = (z >= 0) & (z <= 1)
        log_joint = self.log_likelihood(y[:, None], z[None])
        log_post = log_joint - self.log_prob(y)[:, None]
        return np.where(inside[None], np.exp(log_post), 0.0)

    def joint_density(self, y, z) -> np.ndarray:
        """p*(y, z) = N(y; f(z), sigma^2) on z in [0, 1] (the prior is uniform)."""
        z = np.asarray(z, np.float64)
        return np.where((z >= 0) & (z <= 1), np.exp(self.log_likelihood(y, z)), 0.0)

    def describe(self) -> dict:
        return {"name": self.name, "sigma": self.sigma}


def make_splits(process: PaperProcess, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Independent train/val/test draws of y. Each split's stream is derived from
    (seed, split name) so that changing one split's size leaves the others alone."""
    out = {}
    for name, n in sizes.items():
        key = int.from_bytes(name.encode(), "little") % (2**31)
        ss = np.random.SeedSequence(entropy=seed, spawn_key=(key,))
        _, y = process.sample(n, ss.generate_state(1)[0])
        out[name] = y
    return out


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


def split_file_data(y: np.ndarray, sizes: dict[str, int], seed: int, path="data") -> dict[str, np.ndarray]:
    """A seeded shuffle of a data file cut into the requested splits."""
    need = sum(sizes.values())
    if need > len(y):
        raise DataError(f"{path}: {len(y)} rows, but the splits ask for {need} ({sizes})")
    order = np.random.default_rng(seed).permutation(len(y))
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = y[order[start:start + n]]
        start += n
    return out


class UnknownTruth:
    """Stands in for a process when the data come from a file: every true
    quantity is NaN, so metrics against the truth are reported as unknown."""

    name = "file"

    @staticmethod
    def f(z):
        return np.full(np.shape(z), np.nan)

    def log_prob(self, y):
        return np.full(len(np.atleast_1d(y)), np.nan)

    def posterior(self, y, z_grid):
        return np.full((len(np.atleast_1d(y)), len(z_grid)), np.nan)
