"""Built-in studies: each a plan of runs with the figures and reading that answer its
question, in the STUDIES registry. The top floor below cli: may import every other subpackage.
Adding one: a module with `present(out)` and `SPEC` (or a <name>.toml here), optionally `after_run(out,
quick, run)` (per-run work done by the workers), and its line below."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..config.tomlcompat import loads   # light: `mogvae --help` lists STUDIES without importing PyTorch


@dataclass(frozen=True)
class Study:
    """A study by name. `module` is importable and has `present(out) -> (Markdown lines,
    figure paths)`, its reading put first in its report, and either `SPEC` (a sweep spec as a
    dict: a train configuration plus [grid], optionally [quick]) or a <name>.toml in this
    package. `pipeline`: "sweep" runs the spec as a sweep; "reproduce" is the paper's study,
    with the output contract of `mogvae reproduce`."""
    name: str
    summary: str       # one line for `mogvae study --help`
    module: str
    pipeline: str = "sweep"

    def present(self, out: Path) -> tuple[list[str], list]:
        return importlib.import_module(self.module).present(out)

    def after_run(self, out: Path, quick: bool):
        """What a worker does as each run of the study at `out` finishes, beside the other runs (the module's
        `after_run(out, quick, run)`, where it has one: work its report would otherwise do one run after
        another), as `after(run)`; None where the study has none."""
        from functools import partial
        work = getattr(importlib.import_module(self.module), "after_run", None)
        return None if work is None else partial(work, str(Path(out).resolve()), quick)

    def raw_spec(self) -> dict:
        own = getattr(importlib.import_module(self.module), "SPEC", None)
        if own is not None:
            return {k: dict(v) if isinstance(v, dict) else v for k, v in own.items()}
        return loads(resources.files(__package__).joinpath(f"{self.name}.toml").read_text())

    def spec(self, overrides: list[str], quick: bool) -> tuple[dict, dict]:
        """The study's (base configuration, grid); `quick` shrinks it to toy size: config.schema.QUICK, then
        the study's own [quick] keys (dotted) and, where it has one, its smaller [quick.grid]."""
        from ..config.files import apply_overrides, set_dotted
        from ..config.schema import QUICK
        if self.pipeline == "reproduce":      # the paper's plan is ReproduceConfig's (runs/reproduce.py)
            from ..config.schema import ReproduceConfig, quick as toy
            from ..runs.reproduce import spec
            base, grid = spec(toy(ReproduceConfig()) if quick else ReproduceConfig())
            return apply_overrides(base, overrides), grid
        raw = self.raw_spec()
        own = raw.pop("quick", {})
        if quick:
            for key, value in QUICK.items():
                set_dotted(raw, key, list(value) if isinstance(value, tuple) else value, where="--quick")
            raw["grid"] = own.pop("grid", raw["grid"])
            for key, value in own.items():
                set_dotted(raw, key, value, where="--quick")
        raw = apply_overrides(raw, overrides)
        return raw, raw.pop("grid")


STUDIES = {s.name: s for s in (
    Study("paper", "the paper's four models over seeds, with its figures and claims (what `mogvae reproduce` runs)",
          "mogvae.studies.paper", pipeline="reproduce"),
    Study("noise", "the four models over sigma in 0.1 ... 0.01", "mogvae.studies.noise"),
    Study("families", "every prior x posterior, with the gap decomposition against the exact-likelihood oracle",
          "mogvae.studies.families"),
    Study("dimension", "the four models on the folded process at D = 1 ... 20, ambiguous and symmetry-broken",
          "mogvae.studies.dimension"),
    Study("tabular", "the four models on three scikit-learn data sets at d_z = 2 and 5", "mogvae.studies.real_data"),
)}


def present(name: str, out: Path):
    """A study's reading and figures, for the sweep report (None: not a study's folder)."""
    study = STUDIES.get(name)
    return None if study is None else study.present(out)


__all__ = ["Study", "STUDIES", "present"]
