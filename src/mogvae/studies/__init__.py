"""Built-in studies: each a sweep spec shipped with the package (this folder's
*.toml) plus the figures and reading that answer its question."""
from __future__ import annotations

from importlib import resources

from ..configfile import ConfigError, apply_overrides
from ..tomlcompat import loads

QUICK = {"seeds": 2, "data.n_train": 1000, "data.n_val": 200, "data.n_test": 1000, "train.epochs": 5,
         "eval.grid_size": 1001, "eval.n_generated": 2000, "model.hidden": [16, 16]}


def spec(name: str, overrides: list[str], quick: bool) -> tuple[dict, dict]:
    """A study's (base configuration, grid); `quick` shrinks it to toy size (the grid stays)."""
    raw = loads(resources.files(__package__).joinpath(f"{name}.toml").read_text())
    if quick:
        raw = apply_overrides(raw, [f"{k}={v!r}".replace("'", '"') for k, v in QUICK.items()])
    raw = apply_overrides(raw, overrides)
    return raw, raw.pop("grid")


def _present_noise(out) -> tuple[list[str], list]:
    from . import noise
    figure = noise.noise_figure(out)
    return ["## Where richer priors and posteriors begin to matter", "", *noise.reading(out), ""], [figure]


PRESENTERS = {"noise": _present_noise}  # a study's own reading and figures, put first in its report

__all__ = ["spec", "ConfigError", "QUICK", "PRESENTERS"]
