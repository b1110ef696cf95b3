"""Built-in studies: each a sweep spec shipped with the package (this folder's
*.toml) plus the figures and reading that answer its question. The top floor:
may import storage/, config/, data/, estimators/, runs/ and report/."""
from __future__ import annotations

from importlib import resources

from ..config.files import apply_overrides, set_dotted
from ..config.schema import QUICK
from ..config.tomlcompat import loads


def spec(name: str, overrides: list[str], quick: bool) -> tuple[dict, dict]:
    """A study's (base configuration, grid); `quick` shrinks it to toy size: config.schema.QUICK, then
    the study's own [quick] keys (dotted) and, where it has one, its smaller [quick.grid]."""
    raw = loads(resources.files(__package__).joinpath(f"{name}.toml").read_text())
    own = raw.pop("quick", {})
    if quick:
        for key, value in QUICK.items():
            set_dotted(raw, key, list(value) if isinstance(value, tuple) else value, where="--quick")
        raw["grid"] = own.pop("grid", raw["grid"])
        for key, value in own.items():
            set_dotted(raw, key, value, where="--quick")
    raw = apply_overrides(raw, overrides)
    return raw, raw.pop("grid")


def _present_noise(out) -> tuple[list[str], list]:
    from . import noise
    figure = noise.noise_figure(out)
    return ["## Where richer priors and posteriors begin to matter", "", *noise.reading(out), ""], [figure]


def _present_families(out) -> tuple[list[str], list]:
    from ..runs.sweep import read_record
    from . import families, importance
    figure = families.families_figure(out)
    quick = read_record(out).get("title", "").endswith("(quick)")
    sampled, rows = importance.importance_figure(out, *(((1, 10, 100, 1000), 50) if quick else ()))
    return (["## Where each family's shortfall comes from", "", *families.reading(out), "",
             "## Importance sampling against quadrature", "", *importance.reading(rows), ""], [figure, sampled])


def _present_dimension(out) -> tuple[list[str], list]:
    from . import dimension
    figure = dimension.dimension_figure(out)
    return ["## Does the paper's finding survive more observed dimensions?", "", *dimension.reading(out), ""], [figure]


def _present_tabular(out) -> tuple[list[str], list]:
    from . import real_data
    figure = real_data.tabular_figure(out)
    return ["## Richer prior or richer posterior on real data?", "", *real_data.reading(out), ""], [figure]


PRESENTERS = {"noise": _present_noise, "families": _present_families, "dimension": _present_dimension,
              "tabular": _present_tabular}  # a study's own reading and figures, put first in its report

__all__ = ["spec", "PRESENTERS"]
