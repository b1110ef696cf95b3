"""`mogvae train`: one configuration, R seeds, in a run directory that survives.

DIR/config.json        the resolved configuration (a resume must match it)
DIR/data/*.npy         the exact data
DIR/history.jsonl      one line per epoch, appended and fsynced (a torn last line is ignored)
DIR/checkpoints/       epoch-NNNNNN.safetensors, the newest two kept (see storage/checkpoints.py)
DIR/metrics.csv        the final exact evaluation, one row per seed; DIR/curves.npz its figure data;
DIR/pointwise.npz      its per-point values, with their bounds (estimators/evaluate.py's POINTWISE)
DIR/status.json        progress and wall time, training's and each evaluation phase's (the only file
                       that differs between identical runs)

Every file is written atomically; a second process on the same DIR is refused
(an flock, released by the kernel even after kill -9); re-running the same
command continues from the newest valid checkpoint, bitwise identically.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, ValidationError, model_validator

from .. import __version__
from ..config.files import ConfigError, absolute_path, apply_overrides, read_toml
from ..config.schema import PRESETS, DataConfig, EvalConfig, ModelConfig, Strict, TrainConfig, resolve_defaults
from ..data.paper import PaperSource
from ..data.files import DataError
from ..data.sources import SOURCES, load_source
from ..estimators.evaluate import check_evaluable, check_evaluation_memory, evaluate, metric_rows
from ..model.layers import initialize, replica_seed
from ..model.priors import PRIORS
from ..model.vae import build_model
from ..objectives import OBJECTIVES
from ..storage import faults
from ..storage.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from ..storage.files import (UnreadableFile, read_json, read_npy, read_text, write_csv, write_json, write_npy,
                             write_npz, write_text)
from ..storage.folders import Layout, OutputError, announce_holder, claim, remove_stale_temporaries, take_lock
from ..training.checkpoint_state import check_state, expected_tensors
from ..training.tensorboard import CurveLog
from ..training.trainer import Trainer

KEEP_CHECKPOINTS = 2
SPLITS = ("train", "val", "test")
CHECKPOINT_NAME = "epoch-[0-9][0-9][0-9][0-9][0-9][0-9].safetensors"  # only these are ours: others are never read or deleted
RUN_LAYOUT = Layout("run", files=("config.json", "history.jsonl", "metrics.csv", "curves.npz", "pointwise.npz",
                                  "status.json",
                                  "report.md", "report.html", *(f"data/{s}.npy" for s in SPLITS)),
                    patterns=(f"checkpoints/{CHECKPOINT_NAME}", "tensorboard/events.out.tfevents.*", "figures/*"))
RUN_NAMES = re.compile(r"config\.json|history\.jsonl|metrics\.csv|(curves|pointwise)\.npz|status\.json"
                       r"|data/(train|val|test)\.npy"
                       r"|report\.(md|html)|figures/\*"
                       r"|checkpoints/epoch-(\[0-9\]){6}\.safetensors|tensorboard/events\.out\.tfevents\.\*")


class RunError(Exception):
    """A refusal with a one-line reason (the CLI turns it into exit code 2)."""


class RunConfig(Strict):
    """What `mogvae train` runs. `preset` (if given) sets model.prior and model.posterior."""
    preset: str | None = Field(None, description="mfg | mog-prior | mog-posterior | mog-both: sets model.prior "
                                                  "and model.posterior")
    seeds: int = Field(5, ge=1, le=1000, description="replicas trained together, each from its own seed")
    base_seed: int = Field(0, ge=0, description="replica i is seeded from (base_seed, i) only")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    model: ModelConfig = Field(ModelConfig(), description="the VAE: prior, posterior, networks")
    data: DataConfig = Field(PaperSource(), description="the data source and its splits (data.name: paper, file, "
                             "folded or tabular)")
    train: TrainConfig = Field(TrainConfig(), description="the optimizer, schedule and divergence policy")
    eval: EvalConfig = Field(EvalConfig(), description="the exact evaluation (quadrature over z)")

    @model_validator(mode="before")
    @classmethod
    def _defaults_that_depend_on_the_data(cls, data):
        """model.learn_decoder_noise and eval.grid_size, where unset, follow the data source and
        the latent dimension (config.schema.resolve_defaults); the result is what config.json records."""
        if not isinstance(data, dict):
            return data
        source = data.get("data", {})
        name = source.get("name", "paper") if isinstance(source, dict) else getattr(source, "name", None)
        if not isinstance(name, str) or name not in SOURCES:
            return data                                # refused, with its message, by the data field
        model, eval_ = (_given(data.get(key, {})) for key in ("model", "eval"))
        if model is None or eval_ is None:
            return data
        resolved_model, resolved_eval = resolve_defaults(model, eval_, SOURCES[name].known_noise)
        return {**data, "model": _with(data.get("model", {}), resolved_model),
                "eval": _with(data.get("eval", {}), resolved_eval)}

    @model_validator(mode="after")
    def _known_preset(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {list(PRESETS)}")
        for key, value in PRESETS.get(self.preset, {}).items():
            # a preset sets these; one set to something else beside it (not its default) was silently
            # overruled: config.json said model.posterior = "flow" while a Gaussian posterior trained
            given = getattr(self.model, key)
            if given != value and given != ModelConfig.model_fields[key].default:
                raise ValueError(f"model.{key} = {given!r} contradicts preset = {self.preset!r}, which sets "
                                 f"model.{key} = {value!r}: give one of them")
        return self

    @model_validator(mode="after")
    def _pseudo_inputs_fit_the_data(self):
        m = self.resolved_model()
        n = self.data.n_train      # None for a file split by fractions: check_fits checks it once the file is read
        if getattr(PRIORS[m.prior], "uses_training_points", False) and n is not None and m.n_components > n:
            raise ValueError(f"model.n_components = {m.n_components} pseudo-inputs for a VampPrior, but data.n_train "
                             f"= {self.data.n_train}: pseudo-inputs stand in for training points, so use at most "
                             f"{self.data.n_train}")
        return self

    def resolved_model(self) -> ModelConfig:
        return self.model.model_copy(update=PRESETS[self.preset]) if self.preset else self.model

    @property
    def label(self) -> str:
        """The model's name in tables and figure files: the preset's, else prior+posterior."""
        return self.preset or f"{self.model.prior}+{self.model.posterior}"


def _given(section) -> dict | None:
    """What the user set in a section (a dict, or a validated section's set fields); None for
    anything else, which the section's own validation refuses."""
    if isinstance(section, dict):
        return section
    if isinstance(section, Strict):
        return {k: getattr(section, k) for k in section.model_fields_set}
    return None


def _with(section, resolved: dict):
    """The section (dict or validated) with the resolved defaults added."""
    if isinstance(section, dict):
        return resolved
    extra = {k: v for k, v in resolved.items() if k not in section.model_fields_set}
    return section.model_copy(update=extra) if extra else section


DATA_RECORD = "data_record"   # config.json's keys beyond the configuration: what the run trains on,
RESOLVED = "resolved_model"   # and the model a preset stands for (prior, posterior, sizes), for a reader


def stored_config(saved: dict) -> dict:
    """The configuration in a saved config.json, without its data record."""
    return {k: v for k, v in saved.items() if k not in (DATA_RECORD, RESOLVED)} if isinstance(saved, dict) else saved


def splits_digest(splits: dict[str, np.ndarray]) -> str:
    """SHA-256 of the train, val and test values (float64, with their shapes): the data's content."""
    h = hashlib.sha256()
    for name in SPLITS:
        y = np.ascontiguousarray(splits[name], dtype=np.float64)
        h.update(f"{name}{y.shape}".encode())
        h.update(y.tobytes())
    return h.hexdigest()


def data_record(data, splits: dict[str, np.ndarray]) -> dict:
    """What a run trains on, for config.json: the source, a file's absolute path, the content's hash."""
    path = getattr(data, "path", None)
    return {"source": data.name, "path": os.path.normpath(Path(path).absolute()) if path else None,
            "sha256": splits_digest(splits)}


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """A relative data.path made absolute against the current directory, once, before it is
    recorded: a resume from another folder must not read another file (config/files.py's rule)."""
    path = getattr(config.data, "path", None)
    absolute = absolute_path(path, Path.cwd())
    if absolute == path:
        return config
    return config.model_copy(update={"data": config.data.model_copy(update={"path": absolute})})


def upgraded(old: dict) -> dict:
    """A configuration recorded by an earlier version, with the fields added since at
    their defaults. A field is only ever added with a default that does what the
    code did before it existed (model.flow_bins means nothing to a mixture), so a
    folder written before a field existed is still the same configuration. Anything
    the current schema refuses is returned as it was (and then differs)."""
    try:
        return RunConfig(**old).model_dump(mode="json")
    except (ValidationError, TypeError):
        return old


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ, with both values."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name} ({a!r} -> {b!r})")
    return out


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self._lock = None

    def lock(self, wait: bool = False) -> None:
        """Claim the folder (new, empty, or already a run folder: anything else is
        refused untouched), take its lock (with `wait`, once its holder is done),
        and remove the temporaries of our own interrupted writes, and nothing else."""
        try:
            claim(self.path, RUN_LAYOUT, RUN_NAMES, resume=True)
            self._lock = take_lock(self.path, "process", wait=wait, announce=False)
        except OutputError as e:
            raise RunError(str(e)) from None
        remove_stale_temporaries(self.path, RUN_LAYOUT)

    def release(self) -> None:
        """Give the lock up now (a process that keeps the RunDir, a notebook, need not hold the folder)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def announce(self) -> None:
        """Write this process into the lock it holds (left unwritten until there is work to do)."""
        announce_holder(self._lock)

    def claim(self, config: RunConfig, record: dict | None = None) -> None:
        """Record the configuration and what it trains on (`record`, see data_record), or
        check that a resume asks for the same configuration (and, given a record, the same data)."""
        resolved = config.model_dump(mode="json")
        self.config_hash = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()
        saved = self.path / "config.json"
        if not saved.exists():
            facts = {RESOLVED: config.resolved_model().model_dump(mode="json"), **({DATA_RECORD: record} if record else {})}
            write_json(saved, {**resolved, **facts})
            return
        try:
            old = read_json(saved)
        except UnreadableFile as e:
            raise RunError(str(e)) from None
        old_record, old = (old.get(DATA_RECORD), stored_config(old)) if isinstance(old, dict) else (None, old)
        diff = differences(upgraded(old), resolved)
        if diff:
            raise RunError(f"{self.path}: was started with a different configuration: " + ", ".join(diff))
        if record:
            try:
                self._check_same_data(old_record, record)
            except UnreadableFile as e:
                raise RunError(str(e)) from None
        # the checkpoints of a folder written by an earlier version carry the hash of its config.json
        self.config_hash = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()

    def _check_same_data(self, old: dict | None, new: dict) -> None:
        """A resume trains on the data the run started on, or is refused naming both. A folder
        written before runs recorded their data is checked against its saved data/*.npy."""
        if not isinstance(old, dict):
            saved = [self.path / "data" / f"{s}.npy" for s in SPLITS]
            if not all(p.exists() for p in saved):
                return
            old = {"path": f"{self.path / 'data'}/*.npy", "sha256": splits_digest(
                {s: read_npy(p) for s, p in zip(SPLITS, saved)})}
        if old.get("sha256") != new["sha256"]:
            then, now = old.get("path") or f"the {old.get('source', 'original')} data", new["path"] or "the data"
            raise RunError(f"{self.path}: this run started on {then} (sha256 {str(old.get('sha256'))[:12]}), but "
                           f"{now} now holds other data (sha256 {new['sha256'][:12]}); restore those data, or train "
                           "into a new folder")

    def newest_checkpoint(self, trainer: Trainer, warn) -> tuple[dict, dict] | None:
        """The newest checkpoint that verifies and that this trainer can resume
        exactly; older ones are fallbacks. If there are checkpoints and none
        verifies, refuse rather than silently start over."""
        errors = []
        for path in sorted(self.checkpoints.glob(CHECKPOINT_NAME), reverse=True):
            try:
                state = load_checkpoint(path, max_bytes=_checkpoint_bytes(trainer))
                check_state(trainer, *state)
            except CheckpointError as e:
                errors.append(str(e))
                continue
            except ValueError as e:
                errors.append(f"{path}: not a checkpoint of this run ({e})")
                continue
            if state[1].get("config_sha256") != self.config_hash:
                errors.append(f"{path}: written for another configuration (config hash differs)")
                continue
            for e in errors:  # said only when an older checkpoint is used instead
                warn(f"skipping {e}")
            return state
        if errors:
            raise RunError(errors[0])
        return None

    def save_checkpoint(self, trainer: Trainer) -> None:
        tensors, meta = trainer.state()
        meta |= {"config_sha256": self.config_hash, "versions": {"mogvae": __version__, "torch": torch.__version__}}
        params = [v for k, v in tensors.items() if k.startswith("model.")]
        if not all(bool(torch.isfinite(p).all()) for p in params if p.is_floating_point()):
            raise RunError("refusing to checkpoint non-finite parameters")  # unreachable by design: a guard
        save_checkpoint(self.checkpoints / f"epoch-{trainer.epoch:06d}.safetensors", tensors, meta)
        for old in sorted(self.checkpoints.glob(CHECKPOINT_NAME))[:-KEEP_CHECKPOINTS]:
            old.unlink()

    def rewrite_history(self, trainer: Trainer) -> None:
        lines = [_history_line(trainer, e) for e in range(trainer.epoch)]
        write_text(self.path / "history.jsonl", "".join(lines))

    def is_complete(self, epochs: int) -> bool:
        """Trained to the end and evaluated: status says so and the metrics exist."""
        status = self._status()
        return (status.get("done") is True and status.get("epoch") == epochs
                and (self.path / "metrics.csv").is_file())

    def _status(self) -> dict:
        """status.json, or {} before the first epoch; one that is not what mogvae wrote (a link,
        a FIFO, damaged) is refused in one line rather than read or silently replaced."""
        path = self.path / "status.json"
        if not os.path.lexists(path):
            return {}
        try:
            status = read_json(path)
        except UnreadableFile as e:
            raise RunError(f"{e}; delete it to resume from the newest checkpoint") from None
        return status if isinstance(status, dict) else {}

    def train_seconds(self) -> float:
        """Training wall time of earlier sessions of this run (status.json), 0 for a new run."""
        seconds = self._status().get("train_seconds", 0.0)
        return float(seconds) if isinstance(seconds, (int, float)) and seconds >= 0 else 0.0

    def append_history(self, trainer: Trainer) -> None:
        with open(self.path / "history.jsonl", "a") as fh:
            fh.write(_history_line(trainer, trainer.epoch - 1))
            fh.flush()
            os.fsync(fh.fileno())


def _checkpoint_bytes(trainer: Trainer) -> int:
    """An upper bound on the size of a checkpoint of this run: its tensors, plus a
    JSON header of a few hundred bytes per replica and epoch (the history)."""
    tensors = sum(torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
                  for shape, dtype in expected_tensors(trainer).values())
    R, epochs = len(trainer.seeds), trainer.config.epochs
    return tensors + 2**20 + 256 * R * (epochs + trainer.config.max_retries + 1)


def _history_line(trainer: Trainer, epoch: int) -> str:
    h = trainer.history
    return json.dumps({"epoch": epoch + 1, "train_loss": h.train_loss[epoch], "val_elbo": h.val_elbo[epoch]}) + "\n"


def read_history(path: Path) -> list[dict]:
    """The epochs of a history.jsonl; a torn last line (a crash mid-append) is ignored, and a line
    nested deeper than any mogvae writes is damage (UnreadableFile)."""
    out = []
    for line in read_text(path).splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
        except RecursionError:
            raise UnreadableFile(f"{path}: damaged (a line nested deeper than mogvae ever writes)") from None
    return out


class RunSession:
    """A locked run folder with its trainer at the newest valid checkpoint.
    Everything that can be refused is checked on opening, before any training."""

    def __init__(self, config: RunConfig, out: Path, log=print, wait_for_lock: bool = False):
        config = recorded_file_counts(with_absolute_paths(config), Path(out))
        self.config, self.run = config, RunDir(out)
        try:
            check_evaluable(config.resolved_model(), config.eval, config.train, config.data, config.seeds)
        except ValueError as e:
            raise RunError(str(e)) from None
        try:  # a user's data is checked before anything is written
            source = load_source(config.data)
        except DataError as e:
            raise RunError(str(e)) from None
        self.data, self.process, self.data_dim = source.splits, source.truth, source.data_dim
        check_fits(config, source)
        self.run.lock(wait=wait_for_lock)
        try:
            self._open(config, source, out, log)
        except BaseException:        # a refusal, a full disk, Ctrl-C: the folder is not left locked by this process
            self.run.release()
            raise

    def _open(self, config: RunConfig, source, out: Path, log) -> None:
        self.run.claim(config, data_record(config.data, source.splits))
        self.seeds = [replica_seed(config.base_seed, i) for i in range(config.seeds)]
        self.model = build_model(config.resolved_model(), replicas=len(self.seeds), data_dim=self.data_dim,
                                 noise=config.data.sigma)
        self.trainer = Trainer(self.model, self.data["train"], self.data["val"], config.train, self.seeds,
                               initialize(self.model, self.seeds))
        self.complete = self.run.is_complete(config.train.epochs)
        if self.complete:
            return
        self.run.announce()          # there is work to do: a second process's refusal may now name this one
        state = self.run.newest_checkpoint(self.trainer, log)
        if state is not None:
            self.trainer.load_state(*state)
            log(f"resuming {out} at epoch {self.trainer.epoch}")

    def train(self, on_epoch=None, tensorboard: bool = False) -> Path:
        """Train to the configured epoch, checkpointing, then evaluate; `tensorboard`
        also writes the per-replica curves for TensorBoard (training/tensorboard.py)."""
        run, trainer, config = self.run, self.trainer, self.config
        if self.complete:
            return run.path / "metrics.csv"
        curves = CurveLog(run.path) if tensorboard else None
        for name, y in self.data.items():
            if not (run.path / "data" / f"{name}.npy").exists():
                write_npy(run.path / "data" / f"{name}.npy", y)
        run.rewrite_history(trainer)  # exactly the checkpoint's epochs: none duplicated, none missing
        earlier, start = self.run.train_seconds(), time.perf_counter()
        while trainer.epoch < config.train.epochs:
            trainer.run_epoch()
            run.append_history(trainer)
            faults.point("epoch")
            if trainer.epoch % config.checkpoint_every == 0 or trainer.epoch == config.train.epochs:
                run.save_checkpoint(trainer)
            write_json(run.path / "status.json", {"epoch": trainer.epoch, "of": config.train.epochs, "done": False,
                                                  "train_seconds": earlier + time.perf_counter() - start})
            if curves is not None:
                curves.epoch(trainer.epoch, trainer.history.train_loss[-1], trainer.history.val_elbo[-1])
            if on_epoch is not None:
                on_epoch(trainer.epoch)
        if curves is not None:
            curves.close()
        return self._evaluate(earlier + time.perf_counter() - start, on_epoch)

    def _evaluate(self, train_seconds: float, on_phase=None) -> Path:
        """Evaluate the trained replicas and write metrics.csv, curves.npz and pointwise.npz; `on_phase` (the
        training progress callback) also takes evaluation's phase lines, as text."""
        history, run = self.trainer.history, self.run
        train = self.config.train
        evaluation = evaluate(self.model, self.process, self.data["test"], self.config.eval, self.seeds,
                              history.diverged, OBJECTIVES[train.objective].training_grid(train), report=on_phase)
        # wall time is the one number that differs between identical runs: it sits last, per seed
        rows = [{**row, "train_seconds": train_seconds / len(self.seeds)} for row in metric_rows(evaluation, history)]
        write_csv(run.path / "metrics.csv", rows)
        write_npz(run.path / "curves.npz", evaluation.curves)
        write_npz(run.path / "pointwise.npz", evaluation.pointwise)
        write_json(run.path / "status.json", {"epoch": self.trainer.epoch, "of": self.config.train.epochs,
                                              "done": True, "diverged": sum(history.diverged),
                                              "events": history.events, "train_seconds": train_seconds,
                                              "evaluation_seconds": evaluation.seconds})
        return run.path / "metrics.csv"


FILE_COUNTS = ("n_train", "n_val", "n_test")


def recorded_file_counts(config: RunConfig, out: Path) -> RunConfig:
    """A file split left to its fractions, resuming a folder whose config.json recorded the three
    counts (a run begun before fractions existed, when counts were the only way), takes those
    counts: the same cut the run began on, not a refusal for asking the same thing."""
    d = config.data
    path = out / "config.json"
    if d.name != "file" or any(getattr(d, k) is not None for k in FILE_COUNTS) or not path.is_file():
        return config
    try:
        old = stored_config(read_json(path))
    except (UnreadableFile, TypeError, KeyError):
        return config             # claim() refuses a damaged record in its own words
    data = old.get("data") if isinstance(old, dict) else None
    if not isinstance(data, dict) or data.get("name") != "file" or any(k in data for k in ("val_fraction", "test_fraction")):
        return config
    counts = {k: data.get(k) for k in FILE_COUNTS}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts.values()):
        return config
    return config.model_copy(update={"data": d.model_copy(update=counts)})


def check_fits(config: RunConfig, source) -> None:
    """What only the loaded data can refuse: a VampPrior's pseudo-inputs stand in for training points,
    and evaluation's memory grows with the data's dimension (a file's D is known once it is read)."""
    m, n = config.resolved_model(), len(source.splits["train"])
    if getattr(PRIORS[m.prior], "uses_training_points", False) and m.n_components > n:
        raise RunError(f"model.n_components = {m.n_components} pseudo-inputs for a VampPrior, but the training split "
                       f"has {n} points: use at most {n}")
    try:
        check_evaluation_memory(m, config.eval, source.data_dim, config.seeds)
    except ValueError as e:
        raise RunError(str(e)) from None


def trained_model(run: Path):
    """(model, config, seeds) of a finished run folder, read-only: the newest
    checkpoint's weights in the model its config.json and saved data describe."""
    config = RunConfig(**stored_config(read_json(Path(run) / "config.json")))
    seeds = [replica_seed(config.base_seed, i) for i in range(config.seeds)]
    test = read_npy(Path(run) / "data" / "test.npy")
    model = build_model(config.resolved_model(), replicas=len(seeds), data_dim=1 if test.ndim == 1 else test.shape[1],
                        noise=config.data.sigma)
    newest = sorted((Path(run) / "checkpoints").glob(CHECKPOINT_NAME))[-1]
    tensors, _ = load_checkpoint(newest)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return model.eval(), config, seeds


def load_run_config(path: Path, overrides: list[str]) -> RunConfig:
    """A TOML file plus `key=value` overrides (see config/files.py)."""
    try:
        return RunConfig(**apply_overrides(read_toml(path), overrides))
    except ConfigError as e:
        raise RunError(str(e)) from None
