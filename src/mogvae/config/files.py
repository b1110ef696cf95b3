"""Configuration files: TOML text -> a dict that a pydantic model validates.

Shared by `mogvae train` (one run) and `mogvae sweep` (a grid of runs): the
same reading, the same `--set key=value` overrides (values in TOML syntax, bare
words are strings), and one rule for data paths: **a relative `data.path` is
relative to where it is written**. In a file (its `[data]` table, or a value of
its `[grid]`), that file's folder; on the command line (`--set`), the current
directory. Either way it is made absolute as it is read, before anything is
recorded, so a run resumed from another folder reads the same file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import get_args

from pydantic import BaseModel

from .tomlcompat import TOMLDecodeError, loads


class ConfigError(ValueError):
    """A configuration file or override that cannot be read: one line, naming it."""


def read_toml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        raw = loads(text)
    except TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a mogvae configuration") from None
    absolute_data_path(raw.get("data"), path.parent)   # a grid's values: runs.sweep.expand, from the same folder
    return raw


def absolute_path(path, base: Path):
    """A path string made absolute against `base` (if relative), ~ expanded and normalised;
    anything else as it is (validation names what is wrong with it)."""
    if not isinstance(path, str) or not path:
        return path
    return os.path.normpath(base / Path(path).expanduser())   # ~ expanded; a/../b is b (one file, one name)


def absolute_data_path(data, base: Path) -> None:
    """A [data] table's relative path made absolute against `base`, in place."""
    if isinstance(data, dict) and "path" in data:
        data["path"] = absolute_path(data["path"], base)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        set_dotted(raw, key.strip(), parse_value(value.strip()), where=f"--set {key.strip()}")
        if key.strip() in ("data", "data.path"):        # written on the command line: from the current directory
            absolute_data_path(raw.get("data"), Path.cwd())
    return raw


def parse_value(text: str):
    try:
        return loads(f"v = {text}")["v"]
    except TOMLDecodeError:
        return text
    except RecursionError:
        raise ConfigError(f"--set {text[:40]}...: nested too deeply to be a setting") from None


def set_dotted(d: dict, key: str, value, where: str) -> None:
    *parents, last = key.split(".")
    for p in parents:
        if not isinstance(d.setdefault(p, {}), dict):
            raise ConfigError(f"{where}: {p} is not a section")
        d = d[p]
    d[last] = value


def section_models(field) -> list[type[BaseModel]]:
    """The models a field (a pydantic FieldInfo) holds: one for a section, each member for a
    choice of sections (the data sources: a validator that knows its `members`), none for a
    plain value."""
    for meta in field.metadata:
        members = getattr(getattr(meta, "func", None), "members", None)
        if members is not None:
            return members()
    return _annotation_models(field.annotation)


def _annotation_models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in get_args(annotation):
        out += _annotation_models(arg)
    return out


def dotted_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every settable key of a configuration model, dotted: {"seeds", "train.lr", ...}; a union
    of sections contributes every member's keys (data.path, data.data_dim, ...)."""
    out = set()
    for name, field in model.model_fields.items():
        sections = section_models(field)
        if not sections:
            out.add(prefix + name)
        for sub in sections:
            out |= dotted_fields(sub, f"{prefix}{name}.")
    return out
