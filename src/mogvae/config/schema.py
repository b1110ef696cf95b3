"""Typed, validated configuration (pydantic v2).

Unknown keys are rejected, numbers must be finite, and every error names the
field. Named model presets give the paper's 2x2 design.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from ..model.posteriors import POSTERIORS
from ..model.priors import PRIORS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data):
        """pydantic's lax mode reads `true` as 1; a number field given a boolean is a mistake."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is not None and isinstance(value, bool) and field.annotation in (int, float):
                    raise ValueError(f"{name}: expected a number, got {str(value).lower()}")
        return data


MAX_POINTS = 10_000_000      # per split: the data are held in memory, with every split's copy in the run folder
MAX_DATA_VALUES = 250_000_000  # points x dimensions over the three splits: 2 GB of float64 drawn before training


class _Splits(Strict):
    """What every data source shares: split sizes, the seed of its draws and the noise."""
    sigma: float = Field(0.1, ge=1e-3, le=1e3, description="noise std of y|z (the paper's 0.01 read as a "
                         "variance); also the decoder's known noise (its initial value where learned). At least "
                         "1e-3: below it the truth's quadrature needs millions of nodes and the model's posterior is "
                         "narrower than the evaluation grid")
    n_train: int = Field(10_000, ge=1, le=MAX_POINTS, description="training points (tabular: at most this many)")
    n_val: int = Field(2_000, ge=1, le=MAX_POINTS, description="validation points, the ELBO curve in history (tabular: "
                       "at most)")
    n_test: int = Field(10_000, ge=1, le=MAX_POINTS, description="held-out points for the exact evaluation (tabular: "
                        "at most)")
    seed: int = Field(0, ge=0, description="seed of the data draws (or of the shuffle of a file or data set)")

    @model_validator(mode="before")
    @classmethod
    def _no_null_path(cls, data):
        """Folders written before the sources were a union recorded `path = null` for every source."""
        if isinstance(data, dict) and "path" in data and data["path"] is None and "path" not in cls.model_fields:
            data = {k: v for k, v in data.items() if k != "path"}
        return data


class PaperSource(_Splits):
    """The paper's 1-D process (exact truth)."""
    name: Literal["paper"] = Field("paper", description="the data source: paper | file | folded | tabular (each "
                                   "has its own keys; see the README)")


class FileSource(_Splits):
    """Your own values: one row per point, one column per dimension (truth unknown: those metrics are NaN)."""
    name: Literal["file"] = "file"
    path: str = Field(min_length=1, description="a .npy, .csv or .txt, one point per row (columns: dimensions); a relative path "
                      "is relative to where it is written: a file's folder, or the current directory for --set")


class FoldedSource(_Splits):
    """The paper's process lifted to data_dim observed and latent_dim latent dimensions (mogvae.data.folded), exact truth."""
    name: Literal["folded"] = "folded"
    data_dim: int = Field(2, ge=1, le=1000, description="D, observed dimensions")
    latent_dim: Literal[1, 2] = Field(1, description="L, the process's latent dimensions (the truth is a quadrature)")
    breaking: int | Literal["all"] = Field(0, description="coordinates that break the fold symmetry (0: the true "
                                           "posterior keeps its 2^L mirrored modes; 'all': every coordinate past "
                                           "the first L)")

    @model_validator(mode="after")
    def _dimensions_fit(self):
        if self.data_dim < self.latent_dim:
            raise ValueError(f"data.data_dim = {self.data_dim} is less than data.latent_dim = {self.latent_dim}: each "
                             f"latent coordinate has its own observed coordinate")
        if self.breaking != "all" and not 0 <= self.breaking <= self.data_dim - self.latent_dim:
            raise ValueError(f"data.breaking = {self.breaking} must be in [0, data_dim - latent_dim] = "
                             f"[0, {self.data_dim - self.latent_dim}] (or 'all')")
        return self

    @model_validator(mode="after")
    def _data_fit_in_memory(self):
        values = (self.n_train + self.n_val + self.n_test) * self.data_dim
        if values > MAX_DATA_VALUES:
            fit = MAX_DATA_VALUES // self.data_dim - self.n_val - self.n_test
            raise ValueError(f"data.n_train + n_val + n_test = {self.n_train + self.n_val + self.n_test:,} points of "
                             f"data_dim = {self.data_dim} is {values:,} values, more than mogvae holds in memory "
                             f"({MAX_DATA_VALUES:,})" + (f": set data.n_train <= {fit:,}" if fit >= 1 else ""))
        return self

    @property
    def breaking_count(self) -> int:
        return self.data_dim - self.latent_dim if self.breaking == "all" else self.breaking


TABULAR_SETS = ("breast_cancer", "diabetes", "digits")


class TabularSource(_Splits):
    """A real data set shipped inside scikit-learn (mogvae.data.tabular): no truth, so those metrics are NaN."""
    name: Literal["tabular"] = "tabular"
    dataset: Literal[TABULAR_SETS] = Field("breast_cancer", description="breast_cancer (569 x 30), diabetes "
                                           "(442 x 10) or digits (1797 x 61 after dropping constant pixels)")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="the share of rows in the validation split")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="the share of rows in the test split")


def _source_tag(value) -> str | None:
    """The source a [data] table names; a table without `name` is the paper's (as before sources existed)."""
    name = value.get("name", "paper") if isinstance(value, dict) else getattr(value, "name", None)
    return name if isinstance(name, str) and name in SOURCE_SECTIONS else None     # [] or {} is no name: refused


SOURCE_SECTIONS = {"paper": PaperSource, "file": FileSource, "folded": FoldedSource, "tabular": TabularSource}
DataConfig = Annotated[Union[tuple(Annotated[cls, Tag(name)] for name, cls in SOURCE_SECTIONS.items())],
                       Discriminator(_source_tag, custom_error_type="unknown_source",
                                     custom_error_message=f"data.name must be one of {list(SOURCE_SECTIONS)}")]
"""The data section: one of SOURCE_SECTIONS, chosen by `name`, each with its own validated keys."""


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
    learn_decoder_noise: bool = Field(False, description="learn the decoder's noise (else it is data.sigma, known)")
    learn_weights: bool = Field(False, description="learn mixture weights (else equal weights)")

    @field_validator("prior", "posterior")
    @classmethod
    def _registered(cls, v, info):
        registry = PRIORS if info.field_name == "prior" else POSTERIORS
        if v not in registry:
            raise ValueError(f"unknown {info.field_name} {v!r}; choose from {sorted(registry)}")
        return v

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
    objective: Literal["elbo", "iwae", "exact"] = Field(
        "elbo", description="elbo: the VAE; iwae: the importance-weighted bound with n_samples draws per component "
        "(stratified over a mixture posterior); exact: the maximum-likelihood oracle, prior and decoder trained on "
        "log p(y) by quadrature (latent_dim <= 2), the encoder on the ELBO of that model")
    exact_grid: int = Field(1001, ge=101, le=20_001, description="latent nodes per axis of the quadrature that "
                            "objective = 'exact' differentiates (odd; evaluation reports its error at the optimum)")
    device: str = Field("cpu", description="cpu, or cuda where a GPU build of PyTorch is installed")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the training loss: 1.2-1.3x faster steps for a 5-30 s compile per "
        "process; auto compiles CPU jobs long enough to repay it twice (see mogvae.training.compiled). Compiled kernels round "
        "differently (about 1e-7), so a run keeps its choice")

    _odd_grid = field_validator("exact_grid")(lambda cls, v, info: _odd(v, info))

    @field_validator("device")
    @classmethod
    def _device_named(cls, v):
        """A device mogvae can train on, by name: whether this machine has it is training.trainer.check_device's."""
        if not re.fullmatch(r"cpu|cuda(:[0-9]{1,2})?", v):
            raise ValueError("train.device must be cpu, cuda or cuda:N")
        return v


class EvalConfig(Strict):
    grid_size: int = Field(2001, ge=101, description="latent nodes per axis over the prior (odd)")
    grid_span: float = Field(8.0, gt=2, description="grid covers each prior component to +- span scales")
    n_generated: int = Field(20_000, ge=100, description="samples drawn from each model for sample-based metrics")
    n_importance: int = Field(5000, ge=2, le=1_000_000, description="importance samples per point where quadrature "
                              "cannot go (latent_dim > 2): log p(y) with its standard error")
    gap_points: int = Field(500, ge=0, le=1_000_000, description="test points (the first ones) on which the "
                            "approximation and amortization gaps are measured: each needs its own optimized q "
                            "(0: skip them)")

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


QUICK = {"seeds": 2, "data.n_train": 1000, "data.n_val": 200, "data.n_test": 1000, "train.epochs": 5,
         "eval.grid_size": 1001, "eval.n_generated": 2000, "eval.gap_points": 100, "model.hidden": (16, 16)}
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
    """A pydantic ValidationError as one line, 'where: what (got value)'. The source's tag, which
    pydantic puts in the location of a union member's field (data.folded.breaking), is dropped."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    if len(loc) >= 2 and loc[0] == "data" and loc[1] in SOURCE_SECTIONS:
        del loc[1]
    value = err.get("input")
    got = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
    return f"{'.'.join(loc) or 'configuration'}: {err['msg']}{got}"
