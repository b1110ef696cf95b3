"""One readable training loop for R replicas at once.

Each replica has its own generator (data order and noise), its own loss, and
its own divergence status: a replica whose loss or gradients stop being finite
is frozen at its last finite parameters and recorded; its siblings go on.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config.schema import TrainConfig
from ..model.layers import make_generators
from ..model.vae import VAE
from ..objectives import OBJECTIVES
from ..objectives.bounds import draw_noise, elbo
from .adam import Adam, CosineSchedule
from .compiled import LEGACY_THRESHOLD, CompiledLoss, latent_points_per_step, should_compile

VAL_NOISE_OFFSET = 7919  # val noise generators: seed + offset, reset each epoch
VAL_CHUNK = 512          # validation points per pass (see validation_elbo)
CHUNK_ROWS = 1280        # decoded latent points per replica per pass of a step: a mixture posterior at
                         # R = 20 trains about 1.3x faster than with the whole batch of 256 x 10 at once
                         # (unchanged at R = 5, whose batch fits the cache, with less memory; docs/speed.md)


def check_device(device: str) -> None:
    """Refuse, in one line (ValueError), a device this machine cannot train on."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device = {device!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"train.device = {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


@dataclass
class Divergence:
    epoch: int
    step: int
    reason: str
    action: str = "stop"


@dataclass
class History:
    """Per-epoch curves, [epochs, R]; per replica the divergence that stopped it
    (None if it trained to the end); and every divergence event with its action."""
    train_loss: list[list[float]] = field(default_factory=list)
    val_elbo: list[list[float]] = field(default_factory=list)
    divergence: list[Divergence | None] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def diverged(self) -> list[bool]:
        return [d is not None for d in self.divergence]

    def to_json(self) -> dict:
        # no wall time: a resumed run's checkpoints must equal an uninterrupted one's, bit for bit
        return {"train_loss": self.train_loss, "val_elbo": self.val_elbo, "events": self.events,
                "divergence": [None if d is None else vars(d) for d in self.divergence]}

    @classmethod
    def from_json(cls, d: dict) -> "History":
        return cls(d["train_loss"], d["val_elbo"], [None if x is None else Divergence(**x) for x in d["divergence"]],
                   d["events"])


def _per_replica_finite_grads(model: VAE) -> torch.Tensor:
    checks = [torch.isfinite(p.grad.flatten(1).sum(1)) for p in model.parameters() if p.grad is not None]
    return torch.stack(checks).all(0)


def validation_elbo(model: VAE, y_val: torch.Tensor, seeds: list[int], n_samples: int = 1,
                    chunk: int = VAL_CHUNK) -> torch.Tensor:
    """Mean ELBO on the validation set per replica, [R], with noise fixed per replica
    (the same draws every epoch, so the curve shows the model, not the noise). In chunks of
    `chunk` points: whole, a mixture posterior's 2,000 points decode as 25 MB tensors that
    leave the cache, and validation took 12% of an epoch."""
    gens = make_generators([s + VAL_NOISE_OFFSET for s in seeds])
    R = len(seeds)
    y = y_val.expand(R, *y_val.shape[1:])
    with torch.no_grad():
        eps = draw_noise(model, gens, y.shape[1], n_samples).to(y.device)       # [R, n, K, B, D]
        parts = [elbo(model, y[:, i:i + chunk], eps[:, :, :, i:i + chunk]) for i in range(0, y.shape[1], chunk)]
        return torch.cat(parts, 1).mean(1)


class Trainer:
    """Adam on the negative ELBO for R replicas, one epoch at a time, with every
    piece of state needed to continue bitwise identically (`state` / `load_state`).

    Divergence policy per replica (config.on_divergence), decided before the
    optimizer step from the replica's loss and gradients:
      stop      freeze the replica at its last finite parameters; its siblings go on
      skip      drop this step for the replica (parameters and Adam moments unchanged)
      rollback  restore the replica's state at the start of the epoch and halve its learning rate
    skip and rollback act at most `max_retries` times per replica, then stop."""

    def __init__(self, model: VAE, y_train: np.ndarray, y_val: np.ndarray, config: TrainConfig,
                 seeds: list[int], generators: list[torch.Generator]):
        self.device = torch.device(config.device)
        self.model, self.config, self.seeds, self.generators = model.to(self.device), config, seeds, generators
        R = len(seeds)
        # y is [N] (one observed dimension, the paper's) or [N, D]
        self.data = _float32(y_train, self.device).reshape(len(y_train), -1)
        self.val = _float32(y_val, self.device).reshape(1, len(y_val), -1)
        self.optimizer = Adam(model.parameters(), lr=config.lr)    # torch's fused Adam (training/adam.py)
        # On a CPU a step runs its batch in chunks of about CHUNK_ROWS decoded points per replica,
        # forward and backward, so that its activations stay in cache (R drops out: a replica alone
        # or among others computes the same chunks). A GPU wants the whole batch at once.
        self.chunk = (max(1, CHUNK_ROWS // (model.posterior.k * config.n_samples)) if self.device.type == "cpu"
                      else config.batch_size)
        self.compiled = self._should_compile(R)
        self.loss = self._loss(self.compiled)
        self.schedule = _schedule(self.optimizer, config)
        self.active = torch.ones(R, dtype=torch.bool, device=self.device)
        self.lr_factor = torch.ones(R, dtype=torch.float64)
        self.retries = torch.zeros(R, dtype=torch.int64)
        self.history = History(divergence=[None] * R)
        self.epoch = self.step = 0

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def run_epoch(self) -> None:
        start = time.perf_counter()
        R, n, cfg = len(self.seeds), len(self.data), self.config
        order = torch.stack([torch.randperm(n, generator=g) for g in self.generators]).to(self.device)  # [R, N]
        losses = torch.zeros(R, device=self.device)
        snapshot = self._snapshot() if cfg.on_divergence == "rollback" else None
        for begin in range(0, n, cfg.batch_size):
            y = self.data[order[:, begin:begin + cfg.batch_size]]                                     # [R, B, 1]
            eps = draw_noise(self.model, self.generators, y.shape[1], cfg.n_samples).to(self.device)
            self.optimizer.zero_grad()
            loss = self._backward(y, eps)                                                             # [R]
            ok = torch.isfinite(loss) & _per_replica_finite_grads(self.model)
            bad = self.active & ~ok
            if bad.any():
                self._on_divergence(bad, loss, snapshot)
            self._optimizer_step(bad)
            losses += torch.where(self.active & ~bad, loss.detach(), torch.zeros_like(loss)) * y.shape[1]
            self.step += 1
        if self.schedule is not None:
            self.schedule.step()
        val_elbo = validation_elbo(self.model, self.val, self.seeds, cfg.n_samples)
        for r in (self.active & ~torch.isfinite(val_elbo)).nonzero().flatten().tolist():
            self._record(r, "non-finite validation ELBO", "stop")
        self.history.train_loss.append(_masked(losses / n, self.active))
        self.history.val_elbo.append(_masked(val_elbo, self.active))
        self.epoch += 1
        self.history.seconds += time.perf_counter() - start

    def _backward(self, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The objective's gradients into each parameter's .grad (stopped replicas
        contribute none); returns the loss per replica, [R]. A sampled bound runs in
        chunks through self.loss (compiled where that repays); any other objective
        (the exact oracle) computes its own gradients."""
        cfg, objective = self.config, OBJECTIVES[self.config.objective]

        def live(loss):
            return torch.where(self.active, loss, torch.zeros_like(loss)).sum()

        if not objective.sampled:
            return objective.backward(self.model, self.params, y, eps, cfg, live)
        B, loss = y.shape[1], torch.zeros(len(self.seeds), device=self.device)
        for i in range(0, B, self.chunk):
            part = self.loss(y[:, i:i + self.chunk], eps[:, :, :, i:i + self.chunk])   # mean over the chunk
            if self.chunk < B:
                part = part * (min(self.chunk, B - i) / B)
            live(part).backward()
            loss += part.detach()
        return loss

    def _sampled_loss(self, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The negative training bound per replica, [R]."""
        return -OBJECTIVES[self.config.objective].per_point(self.model, y, eps).mean(1)

    def _should_compile(self, replicas: int, threshold: float | None = None) -> bool:
        """Whether `train.compile` compiles this job's loss (mogvae.training.compiled; `threshold`: auto's
        saving to require, if not today's)."""
        cfg, n = self.config, len(self.data)
        steps = cfg.epochs * -(-n // cfg.batch_size)
        points = latent_points_per_step(replicas, self.model.posterior.k, min(cfg.batch_size, n), cfg.n_samples)
        return should_compile(cfg.compile, self.device.type, cfg.objective, steps, points, threshold)

    def _loss(self, compile: bool):
        if compile:
            return CompiledLoss(self._sampled_loss, min(self.config.batch_size, len(self.data), self.chunk))   # per chunk
        return self._sampled_loss

    def _on_divergence(self, bad: torch.Tensor, loss: torch.Tensor, snapshot) -> None:
        policy = self.config.on_divergence
        for r in bad.nonzero().flatten().tolist():
            what = "non-finite loss" if not torch.isfinite(loss[r]) else "non-finite gradient"
            action = policy if policy != "stop" and self.retries[r] < self.config.max_retries else "stop"
            self._record(r, what, action)
            if action == "rollback":
                self._restore(r, snapshot)
                self.lr_factor[r] *= 0.5
            if action != "stop":
                self.retries[r] += 1

    def _record(self, r: int, reason: str, action: str) -> None:
        event = Divergence(self.epoch, self.step, reason, action)
        self.history.events.append({"replica": r, **vars(event)})
        if action == "stop":
            self.history.divergence[r] = event
            self.active[r] = False

    def _optimizer_step(self, bad: torch.Tensor) -> None:
        """Adam step for the active replicas; `bad` replicas and stopped ones do not move."""
        frozen = ~self.active | bad
        keep = None
        if frozen.any():
            for p in self.params:
                p.grad[frozen] = 0.0
            # a zero gradient still moves a parameter through Adam's moments: put frozen slices back after the step
            keep = self._slices(frozen)
        scaled = (self.lr_factor != 1).any()
        before = [p.detach().clone() for p in self.params] if scaled else None
        self.optimizer.step()
        if scaled:
            with torch.no_grad():
                for p, b in zip(self.params, before):
                    f = self.lr_factor.to(p.dtype).reshape(-1, *[1] * (p.dim() - 1))
                    p.copy_(b + f * (p - b))
        if keep is not None:
            self._put_slices(frozen, keep)

    def _slices(self, mask):
        return [(p.detach()[mask].clone(), {k: v[mask].clone() for k, v in self.optimizer.state.get(p, {}).items()
                                            if k in ("exp_avg", "exp_avg_sq")}) for p in self.params]

    def _put_slices(self, mask, saved) -> None:
        with torch.no_grad():
            for p, (value, moments) in zip(self.params, saved):
                p[mask] = value
                for k, v in moments.items():
                    self.optimizer.state[p][k][mask] = v

    def _snapshot(self):
        return self._slices(torch.ones(len(self.seeds), dtype=torch.bool))

    def _restore(self, r: int, snapshot) -> None:
        mask = torch.zeros(len(self.seeds), dtype=torch.bool)
        mask[r] = True
        self._put_slices(mask, [(v[mask], {k: m[mask] for k, m in mo.items()}) for v, mo in snapshot])

    # -- state, for checkpoints: tensors (safetensors) and JSON, never a pickle --------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for i, p in enumerate(self.params):
            for k, v in self.optimizer.state.get(p, {}).items():
                tensors[f"optim.{i}.{k}"] = v
        for r, g in enumerate(self.generators):
            tensors[f"rng.{r}"] = g.get_state()
        tensors.update({"active": self.active.to(torch.uint8), "lr_factor": self.lr_factor, "retries": self.retries})
        meta = {"epoch": self.epoch, "step": self.step, "history": self.history.to_json(),
                "lr": [self.optimizer.lr], "compiled": self.compiled,
                "schedule": self.schedule.state_dict() if self.schedule is not None else None}
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for i, p in enumerate(self.params):
            state = {k.split(".", 2)[2]: v.to(self.device) for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
            if state:
                self.optimizer.state[p] = state
        for r, g in enumerate(self.generators):
            g.set_state(tensors[f"rng.{r}"])
        self.active = tensors["active"].to(torch.bool).to(self.device)
        self.lr_factor, self.retries = tensors["lr_factor"].clone(), tensors["retries"].clone()
        self.optimizer.lr, = meta["lr"]
        if self.schedule is not None:
            self.schedule.load_state_dict(meta["schedule"])
        self.epoch, self.step = meta["epoch"], meta["step"]
        self.history = History.from_json(meta["history"])
        chosen = meta.get("compiled")
        if chosen is None:      # a checkpoint from before the choice was recorded: the rule of those versions
            chosen = self._should_compile(len(self.seeds), LEGACY_THRESHOLD)
        if self.config.compile == "auto" and OBJECTIVES[self.config.objective].sampled and chosen != self.compiled:
            # what `auto` chose when the run began, though this version's rule would choose otherwise:
            # compiled and eager kernels round differently, and a resumed run must be the same run
            self.compiled, self.loss = chosen, self._loss(chosen)


def fit(model: VAE, y_train: np.ndarray, y_val: np.ndarray, config: TrainConfig,
        seeds: list[int], generators: list[torch.Generator], on_epoch=None) -> History:
    """Train the R replicas of `model` (R = len(seeds)) for config.epochs epochs."""
    trainer = Trainer(model, y_train, y_val, config, seeds, generators)
    while trainer.epoch < config.epochs:
        trainer.run_epoch()
        if on_epoch is not None:
            on_epoch(trainer.epoch - 1, trainer.history)
    return trainer.history


def _schedule(optimizer, config: TrainConfig):
    if config.lr_schedule == "constant":
        return None
    return CosineSchedule(optimizer, T_max=config.epochs, eta_min=config.lr * config.final_lr_factor)


def _float32(y, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y), dtype=torch.float32, device=device)


def _masked(values: torch.Tensor, active: torch.Tensor) -> list[float]:
    return [float(v) if a else math.nan for v, a in zip(values.tolist(), active.tolist())]
