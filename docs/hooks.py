"""MkDocs hook (mkdocs.yml `hooks:`): the generated parts of the reference pages.

A page holds a marker line, replaced when the site is built:

    <!-- generated: cli -->          every subcommand's `mogvae CMD --help`, from mogvae.cli._parser()
    <!-- generated: config -->       every configuration key: the defaults as TOML (`mogvae config --show`,
                                     mogvae.config.reference) and one table per section from the pydantic schema
    <!-- generated: quick -->        what `--quick` changes (mogvae.config.schema.QUICK)
    <!-- generated: presets -->      the named models (mogvae.config.schema.PRESETS)
    <!-- generated: api-entry-points -->  mkdocstrings directives for mogvae.load, .train, .Run, .Sweep

Generated from the code the command runs, so the reference cannot drift from it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import typing

HELP_WIDTH = "96"   # argparse wraps help to $COLUMNS; fixed, so the page does not depend on the builder's terminal


@contextlib.contextmanager
def _columns(width: str):
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def _fence(text: str, lang: str = "text") -> list[str]:
    return [f"```{lang}", text.rstrip("\n"), "```", ""]


def cli_reference() -> str:
    """`mogvae --help`, then each subcommand's one-line summary and `--help`, in the parser's order."""
    from mogvae.cli import _parser
    with _columns(HELP_WIDTH):
        parser = _parser()
        subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        summaries = {a.dest: a.help or "" for s in subcommands for a in s._choices_actions}
        commands = {name: sub for s in subcommands for name, sub in s.choices.items()}
        out = ["| command | does |", "|---|---|",
               *(f"| [`mogvae {name}`](#mogvae-{name}) | {_cell(summaries.get(name, ''))} |" for name in commands),
               "", "## `mogvae`", "", *_fence(parser.format_help())]
        for name, sub in commands.items():
            out += [f"## `mogvae {name}`", "", summaries.get(name, "").strip(), "", *_fence(sub.format_help())]
    return "\n".join(out)


def presets_reference() -> str:
    """The named models (`preset`), from the schema's PRESETS."""
    from mogvae.config.schema import PRESETS
    keys = sorted({k for settings in PRESETS.values() for k in settings})
    rows = ["| preset | " + " | ".join(f"`model.{k}`" for k in keys) + " |", "|---|" + "---|" * len(keys)]
    rows += [f"| `{name}` | " + " | ".join(f"`{settings.get(k, '')}`" for k in keys) + " |"
             for name, settings in PRESETS.items()]
    return "\n".join(rows) + "\n"


def _cell(text) -> str:
    """Text for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _toml_value(value) -> str:
    if value is None:
        return "(unset)"
    from mogvae.config.reference import _value
    try:
        return f"`{_value(value)}`"
    except TypeError:
        return f"`{value!r}`"


def _accepted(field, registry: dict | None = None) -> str:
    """What a field accepts: a Literal's values, a registry's names, a number's bounds, an element type."""
    if registry is not None:
        return _cell(" | ".join(f"`{_toml_literal(name)}`" for name in registry))
    parts = []

    def walk(annotation):
        origin = typing.get_origin(annotation)
        if origin is typing.Literal:
            parts.extend(f"`{_toml_literal(v)}`" for v in typing.get_args(annotation))
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            for arg in typing.get_args(annotation):
                walk(arg)
        elif origin in (tuple, list):
            args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
            parts.append(f"list of {getattr(args[0], '__name__', args[0]) if args else 'values'}")
        elif annotation is type(None):
            pass
        else:
            parts.append(getattr(annotation, "__name__", str(annotation)))
    walk(field.annotation)
    bounds = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥"),
                           ("max_length", "length ≤")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sign} {getattr(m, attr):,}" if isinstance(getattr(m, attr), int)
                              else f"{sign} {getattr(m, attr):g}")
    return _cell(", ".join([" | ".join(parts), *bounds]))


def _toml_literal(v) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def _registries() -> dict[str, dict]:
    """Fields whose names are checked against a registry (a family added there is accepted, and listed here)."""
    from mogvae.config.schema import PRESETS
    from mogvae.model.posteriors import POSTERIORS
    from mogvae.model.priors import PRIORS
    found = {"preset": PRESETS, "model.prior": PRIORS, "model.posterior": POSTERIORS}
    with contextlib.suppress(ImportError):
        from mogvae.objectives import OBJECTIVES
        found["train.objective"] = OBJECTIVES
    return found


def _table(prefix: str, model, keys=None, registries: dict | None = None) -> list[str]:
    from pydantic import BaseModel
    registries = {**_registries(), **(registries or {})}
    rows = ["| key | default | accepts | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if keys is not None and name not in keys:
            continue
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            continue
        key = f"{prefix}{name}"
        shown = "(required)" if field.is_required() else _toml_value(default)
        rows.append(f"| `{key}` | {shown} | {_accepted(field, registries.get(key))} | "
                    f"{_cell(field.description or '')} |")
    return rows + [""]


def config_reference() -> str:
    """The defaults as TOML (what `mogvae config --show` prints), then a table per section."""
    from pydantic import BaseModel

    from mogvae.config.files import section_models
    from mogvae.config.reference import defaults_toml
    from mogvae.runs.run import RunConfig

    out = ["## Every key at its default", "",
           "What `mogvae config --show` prints: TOML that parses back to the default configuration.", "",
           *_fence(defaults_toml(RunConfig), "toml"),
           "## Top-level keys", "", *_table("", RunConfig)]
    for name, field in RunConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if not isinstance(default, BaseModel):
            continue
        members = section_models(field) or section_models(field.annotation)
        if len(members) <= 1:
            out += [f"## `[{name}]`", "", _cell(field.description or ""), "", *_table(f"{name}.", type(default))]
            continue
        # a union of sections (the data sources): the keys they share, then each member's own keys
        shared = [k for k in type(default).model_fields if all(k in m.model_fields for m in members)]
        out += [f"## `[{name}]`", "", _cell(field.description or ""), "",
                f"`{name}.name` chooses the section's kind; each kind has the shared keys below and its own.", "",
                "### Shared by every kind", "",
                *_table(f"{name}.", type(default), shared,
                        {f"{name}.name": [m.model_fields["name"].get_default() for m in members]})]
        for member in members:
            tag = member.model_fields["name"].get_default()
            own = [k for k in member.model_fields if k not in shared]
            out += [f"### `{name}.name = \"{tag}\"`", "", _cell((member.__doc__ or "").strip()), ""]
            out += _table(f"{name}.", member, own) if own else ["No keys of its own.", ""]
    return "\n".join(out)


def quick_reference() -> str:
    from mogvae.config.schema import QUICK
    rows = ["| key | `--quick` value |", "|---|---|"]
    rows += [f"| `{k}` | {_toml_value(list(v) if isinstance(v, tuple) else v)} |" for k, v in QUICK.items()]
    return "\n".join(rows) + "\n"


ENTRY_POINTS = ("load", "train", "Run", "Sweep")


def api_entry_points() -> str:
    """mkdocstrings directives for the notebook API, at wherever each name is defined today:
    `mogvae.load` is imported lazily (mogvae.__getattr__), so its home module is looked up here,
    not written into the page. The module's refusals (LoadError, ...) follow."""
    import inspect

    import mogvae
    out = []
    for name in ENTRY_POINTS:
        obj = getattr(mogvae, name)
        out += [f"::: {obj.__module__}.{obj.__qualname__}", ""]
    home = inspect.getmodule(getattr(mogvae, "load"))
    for name, obj in vars(home).items():
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == home.__name__:
            out += [f"::: {home.__name__}.{name}", ""]
    return "\n".join(out)


GENERATORS = {"<!-- generated: api-entry-points -->": api_entry_points, "<!-- generated: cli -->": cli_reference, "<!-- generated: config -->": config_reference,
              "<!-- generated: quick -->": quick_reference, "<!-- generated: presets -->": presets_reference}


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    for marker, render in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown
