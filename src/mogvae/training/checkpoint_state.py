"""What a trainer's checkpoint must hold, checked before anything is loaded.

The checksum in storage/checkpoints.py catches damage, not a crafted file: a file with a
valid checksum can still name the wrong tensors, carry NaN Adam moments, or
claim epoch -3. Here the JSON header is validated against a schema (pydantic)
and the tensors' names, shapes, dtypes and values against the trainer that
would load them, so a checkpoint either resumes the run exactly or is refused.
"""
from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .trainer import Trainer


class _Exact(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Event(_Exact):
    replica: int = Field(ge=0)
    epoch: int = Field(ge=0)
    step: int = Field(ge=0)
    reason: str
    action: str


class _Divergence(_Exact):
    epoch: int = Field(ge=0)
    step: int = Field(ge=0)
    reason: str
    action: str


class _History(_Exact):
    train_loss: list[list[float]]   # NaN where a replica had stopped
    val_elbo: list[list[float]]
    events: list[_Event]
    divergence: list[_Divergence | None]


class _Meta(_Exact):
    epoch: int = Field(ge=1)
    step: int = Field(ge=1)
    history: _History
    lr: list[float] = Field(min_length=1, max_length=1)
    compiled: bool | None = None     # what train.compile = auto chose (absent before it was recorded)
    schedule: dict | None
    config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    versions: dict[str, str]


def expected_tensors(trainer: Trainer) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in this trainer's checkpoint after at least one step."""
    spec = {f"model.{k}": (tuple(v.shape), v.dtype) for k, v in trainer.model.state_dict().items()}
    for i, p in enumerate(trainer.params):
        spec[f"optim.{i}.step"] = ((), torch.float32)
        spec[f"optim.{i}.exp_avg"] = spec[f"optim.{i}.exp_avg_sq"] = (tuple(p.shape), p.dtype)
    for r, g in enumerate(trainer.generators):
        spec[f"rng.{r}"] = (tuple(g.get_state().shape), torch.uint8)
    R = len(trainer.seeds)
    spec |= {"active": ((R,), torch.uint8), "lr_factor": ((R,), torch.float64), "retries": ((R,), torch.int64)}
    return spec


def check_state(trainer: Trainer, tensors: dict[str, torch.Tensor], meta) -> None:
    """Raise ValueError (one line) unless (tensors, meta) is a state this trainer can resume exactly."""
    if not isinstance(meta, dict):
        raise ValueError(f"metadata is a {type(meta).__name__}, not an object")
    try:
        m = _Meta(**meta)
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"metadata field {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    _check_tensors(trainer, tensors)
    _check_progress(trainer, m, tensors)


def _check_tensors(trainer: Trainer, tensors: dict[str, torch.Tensor]) -> None:
    spec = expected_tensors(trainer)
    missing, extra = sorted(set(spec) - set(tensors)), sorted(set(tensors) - set(spec))
    if missing:
        raise ValueError(f"tensor {missing[0]} is missing ({len(missing)} missing)")
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]} ({len(extra)} unexpected)")
    for name, (shape, dtype) in spec.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"tensor {name}: {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name} holds non-finite values")
    for i in range(len(trainer.params)):
        if bool((tensors[f"optim.{i}.exp_avg_sq"] < 0).any()):
            raise ValueError(f"tensor optim.{i}.exp_avg_sq is negative")
    if not bool(((tensors["active"] == 0) | (tensors["active"] == 1)).all()):
        raise ValueError("tensor active holds values other than 0 and 1")
    if not bool(((tensors["lr_factor"] > 0) & (tensors["lr_factor"] <= 1)).all()):
        raise ValueError("tensor lr_factor outside (0, 1]")
    if not bool(((tensors["retries"] >= 0) & (tensors["retries"] <= trainer.config.max_retries)).all()):
        raise ValueError(f"tensor retries outside [0, {trainer.config.max_retries}]")


def _check_progress(trainer: Trainer, m: _Meta, tensors: dict[str, torch.Tensor]) -> None:
    cfg, R = trainer.config, len(trainer.seeds)
    if m.epoch > cfg.epochs:
        raise ValueError(f"epoch {m.epoch} is beyond the configured {cfg.epochs}")
    steps = m.epoch * math.ceil(len(trainer.data) / cfg.batch_size)
    if m.step != steps:
        raise ValueError(f"step {m.step} does not match epoch {m.epoch} ({steps} steps)")
    h = m.history
    for name, rows in (("train_loss", h.train_loss), ("val_elbo", h.val_elbo)):
        if len(rows) != m.epoch or any(len(row) != R for row in rows):
            raise ValueError(f"history.{name} is not {m.epoch} epochs x {R} replicas")
    if len(h.divergence) != R:
        raise ValueError(f"history.divergence has {len(h.divergence)} entries for {R} replicas")
    if any(e.replica >= R for e in h.events):
        raise ValueError("history.events names a replica that does not exist")
    if not (math.isfinite(m.lr[0]) and 0 < m.lr[0] <= cfg.lr):
        raise ValueError(f"lr {m.lr[0]!r} outside (0, {cfg.lr}]")
    if (m.schedule is None) != (cfg.lr_schedule == "constant"):
        raise ValueError("schedule state does not match train.lr_schedule")
    if m.schedule is not None:
        fresh = trainer.schedule.state_dict()
        if set(m.schedule) != set(fresh) or any(m.schedule[k] != fresh[k] for k in ("T_max", "eta_min", "base_lrs")):
            raise ValueError("schedule state does not match the configured schedule")
        if m.schedule["last_epoch"] != m.epoch:
            raise ValueError(f"schedule at epoch {m.schedule['last_epoch']!r}, checkpoint at {m.epoch}")
    optimizer_steps = {float(tensors[f"optim.{i}.step"]) for i in range(len(trainer.params))}
    if optimizer_steps != {float(m.step)}:
        raise ValueError(f"Adam's step count {sorted(optimizer_steps)} does not match step {m.step}")
