"""Every configuration key with its default and meaning, as TOML (`mogvae config --show`).

Generated from the pydantic schema, so it cannot drift from what is accepted:
the output parses back into the default configuration (tested).
"""
from __future__ import annotations

import json
import textwrap

from pydantic import BaseModel


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string for these plain values
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def _comment(text: str | None) -> list[str]:
    return [f"# {line}" for line in textwrap.wrap(text, 96)] if text else []


def _fields(model: type[BaseModel]) -> tuple[list[str], list[tuple[str, type[BaseModel], str | None]]]:
    scalars, sections = [], []
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            sections.append((name, type(default), field.description))
            continue
        scalars += _comment(field.description)
        if default is None:  # TOML has no null: an optional key is shown commented out
            scalars.append(f"# {name} =   (unset by default)")
        else:
            scalars.append(f"{name} = {_value(default)}")
    return scalars, sections


def defaults_toml(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip().splitlines()
    lines = [f"# {model.__name__}: {doc[0] if doc else ''}".rstrip(), "# Every key is optional; unknown keys are refused.", ""]
    scalars, sections = _fields(model)
    lines += scalars
    for name, section, description in sections:
        inner, nested = _fields(section)
        if nested:
            raise TypeError(f"{model.__name__}.{name}: nested sections are not supported")
        lines += ["", *_comment(description), f"[{name}]", *inner, *_alternatives(model, name, section)]
    return "\n".join(lines) + "\n"


def _alternatives(model: type[BaseModel], name: str, default: type[BaseModel]) -> list[str]:
    """For a union of sections (the data sources), the other members' own keys, commented out."""
    from .files import section_models
    others = [m for m in section_models(model.model_fields[name]) if m is not default]
    lines = []
    for other in others:
        own = [k for k in other.model_fields if k not in default.model_fields or k == "name"]
        own.sort(key=lambda k: (k != "name", k not in vars(other).get("__annotations__", {})))  # its name, its own keys, then shared ones
        fields = {k: other.model_fields[k] for k in own}
        shown = ", ".join(f"{k} = (required)" if f.is_required() else f"{k} = {_value(f.get_default())}"
                          for k, f in fields.items())
        lines += ["", *_comment(f"or: {(other.__doc__ or '').strip()}"), f"# {shown}"]
    return lines
