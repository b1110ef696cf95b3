"""Typed, validated configuration (pydantic v2).

Unknown keys are rejected, numbers must be finite, and every error names the
field. Named model presets give the paper's 2x2 design.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, PlainValidator, SerializeAsAny, field_validator
from pydantic_core import PydanticCustomError

from ..data.base import SplitsSection
from ..data.paper import PaperSource
from ..data.sources import SOURCES
from ..model.posteriors import POSTERIORS
from ..model.priors import PRIORS
from ..objectives import OBJECTIVES
from ..storage.strict import Strict


class _SourceSection:
    """Validates a [data] table as the section of the source its `name` selects (a table without
    `name` is the paper's, as before sources existed), looked up in data.sources.SOURCES at
    validation time: a source registered there is valid at once, with its own keys."""

    @staticmethod
    def members() -> list[type[SplitsSection]]:
        return [source.section for source in SOURCES.values()]

    def __call__(self, value):
        if isinstance(value, SplitsSection):
            return value
        name = value.get("name", "paper") if isinstance(value, dict) else None
        if not isinstance(name, str) or name not in SOURCES:     # [] or {} is no name: refused
            raise PydanticCustomError("unknown_source", "data.name must be one of {names}", {"names": list(SOURCES)})
        return SOURCES[name].section.model_validate(value)


DataConfig = Annotated[SerializeAsAny[SplitsSection], PlainValidator(_SourceSection())]
"""The data section: the section of the source `name` selects, each with its own validated keys."""


def _one_of(registry: dict, what: str, name: str) -> str:
    """A name the registry holds, read when validating (a plug-in registered after import counts),
    or a ValueError that lists the names."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose from {sorted(registry)}")
    return name


class ModelConfig(Strict):
    prior: str = Field("normal", description="normal: N(0, I); mog: a learnable mixture of n_components Gaussians; "
                                             "vamp: the VampPrior, the encoder at n_components learnable "
                                             "pseudo-inputs")
    posterior: str = Field("gaussian", description="gaussian: mean-field N(mu(y), sigma(y)^2); mog: a mixture of "
                                                   "n_components Gaussians from the encoder; flow: a rational-"
                                                   "quadratic spline flow of flow_bins bins on the encoder's Gaussian")
    n_components: int = Field(10, ge=1, le=1000, description="M, for mixture priors/posteriors")
    flow_bins: int = Field(8, ge=2, le=64, description="spline bins per latent coordinate, for the flow posterior")
    latent_dim: int = Field(1, ge=1, le=64, description="dimension of z; exact evaluation needs <= 2")
    hidden: tuple[int, ...] = Field((64, 64), min_length=1, max_length=8,
                                    description="hidden widths of the encoder and decoder MLPs")
    activation: Literal["tanh", "relu", "silu", "softplus"] = Field(
        "silu", description="smooth, so the quadrature converges fast; 6x cheaper than tanh on a CPU")
    learn_decoder_noise: bool = Field(False, description="learn the decoder's noise, one per output, starting from "
                                      "data.sigma (else it is data.sigma, known). Unset in a run's configuration: "
                                      "learned where the data's noise is unknown (file, tabular), known for the "
                                      "simulated processes (paper, folded)")
    learn_weights: bool = Field(False, description="learn mixture weights (else equal weights)")

    _registered = field_validator("prior", "posterior")(
        lambda cls, v, info: _one_of(PRIORS if info.field_name == "prior" else POSTERIORS, info.field_name, v))

    @field_validator("hidden")
    @classmethod
    def _widths_positive(cls, v):
        if any(w < 1 or w > 4096 for w in v):
            raise ValueError(f"hidden widths must be in [1, 4096], got {list(v)}")
        return v


PRESETS: dict[str, dict] = {
    "mfg": {"prior": "normal", "posterior": "gaussian"},
    "mog-prior": {"prior": "mog", "posterior": "gaussian"},
    "mog-posterior": {"prior": "normal", "posterior": "mog"},
    "mog-both": {"prior": "mog", "posterior": "mog"},
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from {list(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def _odd(v: int, info) -> int:
    if v % 2 == 0:
        raise ValueError(f"{info.field_name} must be odd (every other node forms the coarse rule whose difference "
                         f"bounds the error), got {v}")
    return v


class TrainConfig(Strict):
    epochs: int = Field(200, ge=1, le=100_000, description="enough to plateau on the defaults (figures/training.png)")
    batch_size: int = Field(256, ge=1, description="points per step, per replica")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Adam's learning rate")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine: anneal to lr * final_lr_factor, so the last epochs average out minibatch noise")
    final_lr_factor: float = Field(0.01, gt=0, le=1.0, description="the cosine schedule ends at lr * this")
    on_divergence: Literal["stop", "skip", "rollback"] = Field(
        "stop", description="per replica, on a non-finite loss or gradient (see training.trainer.Trainer)")
    max_retries: int = Field(3, ge=0, le=100, description="skips or rollbacks per replica before it stops")
    n_samples: int = Field(1, ge=1, le=1000, description="reparameterized draws per posterior component per step "
                           "(with objective = 'iwae', the K of the bound, per component)")
    objective: str = Field("elbo", description="; ".join(f"{o.name}: {o.summary}" for o in OBJECTIVES.values()))
    exact_grid: int = Field(1001, ge=101, le=20_001, description="latent nodes per axis of the quadrature that "
                            "objective = 'exact' differentiates (odd; evaluation reports its error at the optimum)")
    device: str = Field("cpu", description="cpu, or cuda where a GPU build of PyTorch is installed")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the training loss: 1.2-1.3x faster steps for a 5-30 s compile per "
        "process; auto compiles CPU jobs long enough to repay a cold compile (see mogvae.training.compiled). Compiled "
        "kernels round differently (about 1e-7), so a run keeps its choice, recorded in its checkpoints")

    _odd_grid = field_validator("exact_grid")(lambda cls, v, info: _odd(v, info))

    _objective_registered = field_validator("objective")(lambda cls, v: _one_of(OBJECTIVES, "objective", v))

    @field_validator("device")
    @classmethod
    def _device_named(cls, v):
        """A device mogvae can train on, by name: whether this machine has it is training.trainer.check_device's."""
        if not re.fullmatch(r"cpu|cuda(:[0-9]{1,2})?", v):
            raise ValueError("train.device must be cpu, cuda or cuda:N")
        return v


GRID_2D = 401   # eval.grid_size's default at latent_dim = 2: 161,201 nodes, the 2-D studies' rule


def resolve_defaults(model: dict, eval_: dict, known_noise: bool) -> tuple[dict, dict]:
    """The defaults that depend on other sections, filled in where the user left them unset:
    the decoder's noise is learned unless the data's noise is known, and a 2-D latent gets a
    grid that fits (GRID_2D). Written into the configuration, so config.json says what ran."""
    if "learn_decoder_noise" not in model:
        model = {**model, "learn_decoder_noise": not known_noise}
    if "grid_size" not in eval_ and model.get("latent_dim", 1) == 2:
        eval_ = {**eval_, "grid_size": GRID_2D}
    return model, eval_


class EvalConfig(Strict):
    grid_size: int = Field(2001, ge=101, description="latent nodes per axis over the prior (odd). Unset in a run's "
                           f"configuration: 2001 for latent_dim = 1, {GRID_2D} for latent_dim = 2 (2001^2 nodes would "
                           "not fit)")
    grid_span: float = Field(8.0, gt=2, description="grid covers each prior component to +- span scales")
    n_generated: int = Field(20_000, ge=100, description="samples drawn from each model for sample-based metrics")
    n_importance: int = Field(5000, ge=2, le=1_000_000, description="importance samples per point where quadrature "
                              "cannot go (latent_dim > 2): log p(y) with its standard error")
    gap_points: int = Field(500, ge=0, le=1_000_000, description="test points (the first ones) on which the "
                            "approximation and amortization gaps are measured: each needs its own optimized q, so "
                            "the cost grows with points x the posterior's strata (a mixture's n_components) x "
                            "steps; for a mixture it is evaluation's costliest phase, shown with an ETA (0: skip "
                            "them)")
    gap_steps: int = Field(1000, ge=1, le=100_000, description="at most this many L-BFGS iterations of that search, "
                           "per start (a point stops sooner once its best ELBO gains under 1e-5 nats over 10 "
                           "iterations, then searches on once from its best with a 100x tighter stop); metrics.csv "
                           "reports the most a point took as gap_optimizer_steps")
    gap_starts: int = Field(0, ge=0, le=100, description="extra starts of that search per point: the encoder's q "
                            "moved by Gaussian noise of scale 0.3 in its raw parameters, each point from its own "
                            "random stream. A mixture q has many local optima: on a 10-component mixture at sigma "
                            "= 0.03 each such start raised ELBO* at up to 8% of points; 4 of them doubled the "
                            "search's time (0: the encoder's, the posterior's and the neighbours' starts only)")

    tolerance: float = Field(1e-4, gt=0, le=1.0, description="nats per test point: with a 1- or 2-D latent, each "
                             "point whose quadrature error bound (log p, the ELBO, ELBO*) misses it is integrated "
                             "again, adaptively, until it meets it or a budget is spent; a replica whose bound "
                             "still misses it is flagged in metrics.csv and left out of every comparison and "
                             "verdict of the reports. Below about 1e-6 the float32 networks' rounding, not the "
                             "rule, sets what a bound can reach")
    sampling_tolerance: float = Field(1e-2, gt=0, le=10.0, description="nats per test point, where importance "
                                      "sampling stands in (latent_dim > 2): the means of log p and the ELBO are "
                                      "held to it (sampling_error_bound: two standard errors of each mean plus log "
                                      "p's bias); a point whose standard error needs it draws again, up to 16 x "
                                      "n_importance, and a replica still above it is flagged as an exact one is. "
                                      "Not eval.tolerance: means within 1e-4 would take about 1e7 draws a point "
                                      "(measured on diabetes at d_z = 5: 16 x the draws reached 5e-4, at 17 x "
                                      "the cost)")

    _odd_grid = field_validator("grid_size")(lambda cls, v, info: _odd(v, info))


class ReproduceConfig(Strict):
    """What `mogvae reproduce` runs: every model x every seed."""
    models: tuple[str, ...] = ("mfg", "mog-prior", "mog-posterior", "mog-both")
    seeds: int = Field(5, ge=1, le=1000)
    base_seed: int = Field(0, ge=0)
    model: ModelConfig = ModelConfig()
    data: PaperSource = PaperSource()    # reproduce is the paper's study
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    workers: int = Field(0, ge=0, le=64, description="worker processes; 0 picks by the machine")

    @field_validator("models")
    @classmethod
    def _models_known(cls, v):
        unknown = [m for m in v if m not in PRESETS]
        if unknown or not v:
            raise ValueError(f"unknown model(s) {unknown}; choose from {list(PRESETS)}")
        duplicated = sorted({m for m in v if v.count(m) > 1})
        if duplicated:
            raise ValueError(f"{', '.join(duplicated)} given more than once")
        return v


QUICK = {"seeds": 2, "data.n_train": 1000, "data.n_val": 200, "data.n_test": 250, "train.epochs": 5,
         "eval.grid_size": 1001, "eval.n_generated": 2000, "eval.gap_points": 10, "eval.gap_steps": 50,
         "model.hidden": (16, 16)}
"""Toy size, for `--quick` (reproduce and the studies): the same pipeline well under a minute."""


def quick(config: ReproduceConfig) -> ReproduceConfig:
    """The same pipeline at toy size (QUICK; seeds and epochs are capped, not raised)."""
    sections = {}
    for key, value in QUICK.items():
        if "." in key:
            section, field = key.split(".")
            sections.setdefault(section, {})[field] = value
    return config.model_copy(update={
        "seeds": min(config.seeds, QUICK["seeds"]),
        **{name: getattr(config, name).model_copy(update=fields) for name, fields in sections.items()},
        "train": config.train.model_copy(update={"epochs": min(config.train.epochs, QUICK["train.epochs"])}),
    })


def describe_error(e) -> str:
    """A pydantic ValidationError as one line, 'where: what (got value)'."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    value = err.get("input")
    got = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
    return f"{'.'.join(loc) or 'configuration'}: {err['msg']}{got}"
