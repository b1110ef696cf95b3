"""Output folders that mogvae owns, and nothing else.

A user's folder is sacred. Every folder mogvae writes into carries a manifest,
`.mogvae-manifest.json`, naming the files this kind of output consists of
(exact names and glob patterns, from a fixed vocabulary per kind). mogvae:

- writes into a folder only when it is new, empty, or holds such a manifest;
- replaces (`--overwrite`) only a folder all of whose entries the manifest
  names, and then deletes exactly those files and the folders it made;
- cleans up only its own temporaries (`.NAME.XXXXXXXX.tmp`, see files.py) of
  names it owns;
- never replaces `/`, a home folder, or the current directory or one of its
  parents.
"""
from __future__ import annotations

import fcntl
import os
import re
import socket
import stat
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

MANIFEST = ".mogvae-manifest.json"
LOCK = ".lock"
_TEMP = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")  # tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")


class OutputError(Exception):
    """A folder mogvae must not write into or replace: one line, naming it."""


@dataclass(frozen=True)
class Layout:
    """What one kind of output consists of: exact relative names and patterns."""
    kind: str
    files: tuple[str, ...]
    patterns: tuple[str, ...] = ()

    def owns(self, rel: str) -> bool:
        """Whether `rel` (a POSIX path inside the folder) is one of this layout's
        names, the manifest or lock, or a temporary of one of its names."""
        if rel in (MANIFEST, LOCK) or rel in self.files or any(fnmatchcase(rel, p) for p in self.patterns):
            return True
        path = PurePosixPath(rel)
        m = _TEMP.fullmatch(path.name)
        return bool(m) and self.owns(str(path.with_name(m["name"])))

    def folders(self) -> set[str]:
        """The sub-folders this layout writes into (and their parents)."""
        out = set()
        for name in (*self.files, *self.patterns):
            out.update(str(p) for p in PurePosixPath(name).parents if str(p) != ".")
        return out


def _entries(root: Path):
    """Every entry below root, hidden ones included, as (relative POSIX path, is a real folder)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for d in dirnames:
            p = base / d
            yield p.relative_to(root).as_posix(), not p.is_symlink()
        for f in filenames:
            yield (base / f).relative_to(root).as_posix(), False


def foreign_entries(root: Path, layout: Layout) -> list[str]:
    """Entries of root that the layout does not name, sorted."""
    folders = layout.folders()
    return sorted(rel for rel, is_dir in _entries(root)
                  if not (layout.owns(rel) or (is_dir and rel in folders)))


def read_manifest(root: Path) -> Layout | None:
    """The layout recorded in root's manifest, or None when there is none (or it is not mogvae's)."""
    path = root / MANIFEST
    if not path.is_file() or path.is_symlink():
        return None
    from .files import read_json
    try:
        data = read_json(path, max_bytes=2**20)       # a manifest names a few dozen files
        layout = Layout(data["kind"], tuple(data["files"]), tuple(data.get("patterns", ())))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if data.get("written_by") != "mogvae":
        return None
    return layout


def _manifest_is_plausible(recorded: Layout, allowed: re.Pattern) -> bool:
    """A manifest may only name files mogvae writes for its kind: a crafted one
    listing `thesis.tex` must not make --overwrite delete it."""
    names = (*recorded.files, *recorded.patterns)
    return all(allowed.fullmatch(n) and ".." not in PurePosixPath(n).parts for n in names)


def write_manifest(root: Path, layout: Layout) -> None:
    from .. import __version__
    from .files import write_json
    write_json(root / MANIFEST, {"written_by": "mogvae", "version": __version__, "kind": layout.kind,
                                 "files": list(layout.files), "patterns": list(layout.patterns)})


def _protected(path: Path) -> str | None:
    """Why `path` may never be replaced, or None."""
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "is the filesystem root"
    try:
        if resolved == Path.home().resolve():
            return "is a home folder"
    except RuntimeError:  # no home (HOME unset and no passwd entry)
        pass
    if resolved == cwd or resolved in cwd.parents:
        return "is the current directory or one of its parents"
    return None


def check_out_path(out: Path | str, option: str = "--out") -> Path:
    """An output path that can be a folder: not empty text, not an existing file."""
    if str(out).strip() == "":
        raise OutputError(f"{option}: empty path; name a folder")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out}: exists and is not a folder")
    for parent in out.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{option} {out}: {parent} is not a folder")
    return out


def claim(out: Path, layout: Layout, allowed: re.Pattern, *, resume: bool, overwrite: bool = False,
          option: str = "--out") -> Path:
    """Make `out` a folder of this layout, or refuse in one line, having touched nothing.

    New or empty: the manifest is written. Already a folder of this kind:
    replaced when `overwrite` (deleting exactly the files its manifest names),
    else continued as it is when `resume`, else refused. Anything else is refused."""
    out = check_out_path(out, option)
    if out.exists() and any(out.iterdir()):
        recorded = read_manifest(out)
        if recorded is not None and recorded.kind != layout.kind:
            raise OutputError(f"{option} {out}: holds a mogvae {recorded.kind} output, not a {layout.kind} folder; "
                              "choose a new or empty folder")
        if recorded is None:
            first = sorted(p.name for p in out.iterdir())[0]
            raise OutputError(f"{option} {out}: folder is not empty and is not a mogvae {layout.kind} folder "
                              f"(it holds {first!r}); choose a new or empty folder")
        if not _manifest_is_plausible(recorded, allowed):
            raise OutputError(f"{option} {out}: its {MANIFEST} names files that a mogvae {layout.kind} folder "
                              "never holds; not trusted, nothing touched")
        check_own_folders(out, layout, option)
        if overwrite:
            reason = _protected(out)
            if reason:
                raise OutputError(f"{option} {out}: refusing to replace a folder that {reason}")
            foreign = foreign_entries(out, recorded)
            if foreign:
                raise OutputError(f"{option} {out}: refusing to replace: it holds {len(foreign)} file(s) mogvae "
                                  f"did not write (first: {foreign[0]!r})")
            remove_owned(out, recorded)
        elif not resume:
            raise OutputError(f"{option} {out}: holds an earlier mogvae {layout.kind} output "
                              "(pass --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    if read_manifest(out) != layout:  # a resumed folder keeps its manifest untouched
        write_manifest(out, layout)
    return out


def take_lock(root: Path, what: str, wait: bool = False, announce: bool = True):
    """Hold root's lock file (an flock: the kernel releases it when its holder dies,
    even by kill -9) and, with `announce`, write who holds it (else announce_holder
    does, once there is work to do: a finished run re-run changes no file). With
    `wait`, block until the holder finishes (a Dask task of a killed driver, still
    training); else refuse in one line that names the holder (`what`: the kind of
    holder, "sweep" or "process"). Returns the open file: the lock lasts as long as
    it does. A lock that is a link or not a regular file is refused, never followed
    or truncated."""
    try:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        raise OutputError(f"{root / LOCK}: cannot be used as mogvae's lock ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{root / LOCK}: not a regular file; mogvae's lock must be one")
    fh = os.fdopen(fd, "r+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        holder = lock_holder(root)
        fh.close()
        raise OutputError(f"{root}: in use by another mogvae {what}" + (f" ({holder})" if holder else "")
                          + "; wait for it to finish, or stop it, and run the same command again") from None
    if announce:
        announce_holder(fh)
    return fh


def announce_holder(lock) -> None:
    """Write this process into the lock file it holds, for a refusal to name."""
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()


def lock_holder(root: Path) -> str:
    """Who holds root's lock, as its holder wrote it ('' if unknown)."""
    try:
        fd = os.open(root / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as fh:
        text = fh.read(200).decode("utf-8", "replace").strip()
    return "".join(c for c in text.splitlines()[0] if c.isprintable()) if text else ""


def check_own_folders(root: Path, layout: Layout, option: str = "--out") -> None:
    """The sub-folders mogvae writes into must be real folders of root: one that is a link (or a
    file) would send mogvae's writes, or its clean-up, somewhere it never claimed."""
    for rel in sorted(layout.folders()):
        path = root / rel
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise OutputError(f"{option} {root}: {rel} is a link or a file, not the folder mogvae made; "
                              "nothing written")


def remove_owned(root: Path, layout: Layout) -> None:
    """Delete the files the layout names (and their temporaries), then its folders if empty."""
    for rel, is_dir in sorted(_entries(root), key=lambda e: -e[0].count("/")):
        if not is_dir and layout.owns(rel):
            (root / rel).unlink()
    for rel in sorted(layout.folders(), key=lambda r: -r.count("/")):
        try:
            (root / rel).rmdir()
        except OSError:
            pass  # not there, or holds something: left alone


def remove_stale_temporaries(root: Path, layout: Layout) -> None:
    """Temporaries of an interrupted write of one of the layout's own names, in the folders it writes."""
    for folder in {"", *layout.folders()}:
        d = root / folder
        if not d.is_dir():
            continue
        for entry in d.iterdir():
            rel = entry.relative_to(root).as_posix()
            if _TEMP.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink() and layout.owns(rel):
                entry.unlink()
