"""The notebook API: finished folders as objects, and `mogvae train` from Python.

    import mogvae
    run = mogvae.load("out/run")                 # a run folder -> Run
    run.metrics                                  # metrics.csv as a DataFrame, one row per replica
    y = run.data("test")
    log_p = run.log_prob(y, replica=0)           # exactly as evaluation computes it
    sweep = mogvae.load("reproduce-out")         # a sweep, study or reproduce folder -> Sweep
    sweep.run("mog-prior").metrics

Nothing here trains or evaluates in a second way: `train` (train_api.py) opens a
RunSession as `mogvae train` does, and the densities are the estimators evaluation calls, with
the run's own evaluation settings. Loading only reads (storage/files.py's careful
reads): a folder is never written into, so a notebook can look at a run while a
sweep trains it.
"""
from __future__ import annotations

import contextlib
import io
import operator
import os
from pathlib import Path

import numpy as np
import torch

from ..storage.files import UnreadableFile, read_csv, read_json, read_npy, read_npz, read_text
from .run import SPLITS, RunConfig, RunDir, RunError, stored_config

# mogvae.train lives in train_api.py: it trains a folder, then load()s it (an import of this module, not back)
__all__ = ["LoadError", "Run", "Sweep", "UnknownRun", "load"]


class LoadError(ValueError):
    """A folder, or a file in it, that cannot be read as a finished mogvae output: one line
    saying what is missing and, where it applies, which command finishes it."""


class UnknownRun(KeyError):
    """`Sweep.run` with a name the sweep has no run for; the message lists the names it has."""

    def __str__(self) -> str:       # KeyError's own str() would quote the whole sentence
        return str(self.args[0])


@contextlib.contextmanager
def _one_line():
    """A damaged or foreign file of the folder (each already a one-line refusal) as a LoadError."""
    try:
        yield
    except (UnreadableFile, RunError, ValueError) as e:
        if isinstance(e, LoadError):
            raise
        raise LoadError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def _read_table(path: Path):
    """A metrics.csv as a DataFrame with typed columns (numbers, booleans; "" and "nan" are NaN),
    read as carefully as every file mogvae reads back (a link, FIFO, damage: LoadError)."""
    import pandas as pd
    with _one_line():
        read_csv(path)                       # refuses a damaged file (rows of another width) before pandas sees it
        text = read_text(path)
    return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=["", "nan", "NaN"])


def _with_replica_seeds(table, base_seed):
    """metrics.csv's table with `replica_seed` after `seed` (the replica index): the seed each
    replica trained from, model.layers.replica_seed(base_seed(row), index)."""
    from ..model.layers import replica_seed
    seeds = [replica_seed(base_seed(row), int(row["seed"])) for _, row in table.iterrows()]
    table.insert(list(table.columns).index("seed") + 1, "replica_seed", seeds)
    return table


# -- runs --------------------------------------------------------------------------------------

class Run:
    """A run folder written by `mogvae train` (or a cell of a sweep): its configuration, metrics,
    data and trained replicas. Made by `mogvae.load` or `mogvae.train`; reading never writes.

        run = mogvae.load("out/run")
        run.replicas                             # 5
        run.metrics[["seed", "test_log_likelihood"]]
        y = run.sample(1000, replica=2, seed=0)  # [1000, D]

    `path`, `config` and `replicas` are there as soon as the run has started; `metrics`,
    `model`, `log_prob`, `elbo` and `sample` need the run finished (trained and evaluated),
    and otherwise say what is missing and which command finishes it.
    """

    path: Path
    """The run folder, as given.

        (run.path / "history.jsonl").read_text()
    """
    config: RunConfig
    """The configuration the run trains (config.json, a RunConfig): run.config.train.epochs,
    run.config.resolved_model().prior, ...; `mogvae.train(run.config, run.path)` resumes it.

        run.config.model_dump()      # every field, as a dict
    """

    def __init__(self, path: str | os.PathLike):
        self._open(path, None, None)

    @classmethod
    def _of_sweep(cls, path: Path, finish: str, config: dict) -> Run:
        """A sweep's run: `finish` is the sweep's command, and `config` its cell's configuration
        in sweep.json, which stands in for a run that has not started (no config.json yet)."""
        run = cls.__new__(cls)
        run._open(path, finish, config)
        return run

    def _open(self, path, finish: str | None, config: dict | None) -> None:
        self.path = Path(path)
        self._finish = finish or (f"re-run the `mogvae train` command that started it (same configuration), or "
                                  f"mogvae.train(run.config, {str(self.path)!r})")
        self._model = None       # the R-replica model, read once; never handed out (see `model`)
        self.config = self._read_config(config)

    def _read_config(self, fallback: dict | None) -> RunConfig:
        saved = self.path / "config.json"
        if not os.path.lexists(saved):
            if fallback is None:
                raise LoadError(f"{self.path}: not a run folder (no config.json)")
            raw = fallback       # a sweep's cell that has not started: its configuration is in sweep.json
        else:
            with _one_line():
                raw = stored_config(read_json(saved))
        try:
            return RunConfig(**raw)
        except (TypeError, ValueError) as e:     # pydantic's ValidationError is a ValueError
            from ..config.schema import describe_error
            why = describe_error(e) if hasattr(e, "errors") else str(e)
            raise LoadError(f"{saved}: not a configuration this mogvae reads ({why})") from None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, model={self.config.label!r}, replicas={self.replicas}, complete={self.complete})"

    @property
    def replicas(self) -> int:
        """The number of replicas (seeds) the run trains together, R.

            [run.model(replica=r) for r in range(run.replicas)]
        """
        return self.config.seeds

    @property
    def complete(self) -> bool:
        """Whether the run is trained to its last epoch and evaluated (its metrics.csv written).

            if not run.complete: mogvae.train(run.config, run.path)   # resumes it
        """
        with _one_line():
            return RunDir(self.path).is_complete(self.config.train.epochs)

    def _require_complete(self) -> None:
        if self.complete:
            return
        with _one_line():
            status = read_json(self.path / "status.json") if (self.path / "status.json").is_file() else {}
        done = status.get("epoch") if isinstance(status, dict) else None
        what = (f"trained {done} of {self.config.train.epochs} epochs" if isinstance(done, int)
                else "not started" if not (self.path / "config.json").exists() else "no epoch finished")
        raise LoadError(f"{self.path}: the run is unfinished ({what}; no evaluated metrics.csv): {self._finish}")

    @property
    def metrics(self):
        """metrics.csv, the final evaluation, as a pandas DataFrame: one row per replica, named as
        everywhere by `seed`, the replica index (0 .. R-1, the `replica=` of every method), and
        `replica_seed`, the seed derived from it and base_seed that replica trained from
        (model.layers.replica_seed); then one column per metric (estimators/evaluate.py's METRICS),
        diverged, diverged_epoch, final_val_elbo and train_seconds.

            run.metrics["test_log_likelihood"].mean()
        """
        self._require_complete()
        return _with_replica_seeds(_read_table(self.path / "metrics.csv"), lambda _: self.config.base_seed)

    @property
    def pointwise(self) -> dict[str, np.ndarray]:
        """pointwise.npz: evaluation's per-point values behind metrics.csv's means, with their
        bounds (estimators/evaluate.py's POINTWISE: log_p, log_p_error, elbo, elbo_error,
        true_log_p and true_log_p_error, and on the gap points elbo_star and q_star_raw). Runs evaluated before it
        existed have none (LoadError).

            pw = run.pointwise
            pw["log_p"].mean(1)                   # test_log_likelihood, per replica
        """
        self._require_complete()
        path = self.path / "pointwise.npz"
        if not os.path.lexists(path):
            raise LoadError(f"{path}: missing: the run was evaluated before per-point values were saved")
        with _one_line():
            return read_npz(path)

    def data(self, split: str) -> np.ndarray:
        """The split the run trained (or is evaluated) on, as saved: "train", "val" or "test";
        [N] for one-dimensional data, else [N, D].

            y_test = run.data("test")
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
        path = self.path / "data" / f"{split}.npy"
        if not os.path.lexists(path):
            raise LoadError(f"{path}: missing (a run saves its data when training starts): {self._finish}")
        with _one_line():
            return read_npy(path)

    def _replica(self, replica) -> int:
        """replica as an index into the run's replicas, or a one-line IndexError."""
        try:
            r = operator.index(replica)
        except TypeError:
            raise TypeError(f"replica: expected an integer index, got {replica!r}") from None
        if isinstance(replica, bool) or not 0 <= r < self.replicas:
            raise IndexError(f"replica {replica!r}: this run has {self.replicas} replicas (0 to {self.replicas - 1})")
        return r

    def _trained(self):
        """The run's R-replica model from its newest checkpoint (runs.run.trained_model), read once."""
        if self._model is None:
            from ..storage.checkpoints import CheckpointError
            from .run import trained_model
            self._require_complete()
            try:
                self._model = trained_model(self.path)[0]
            except (CheckpointError, UnreadableFile, IndexError) as e:   # IndexError: no checkpoint left
                raise LoadError(f"{self.path}: cannot read its newest checkpoint ({e or 'none found'})") from None
        return self._model

    def model(self, replica: int = 0):
        """The trained VAE of one replica (R = 1), in eval mode, with the newest checkpoint's
        parameters; a fresh copy each call, so changing it never changes the run's numbers.

            vae = run.model(replica=1)
            z = torch.zeros(1, 5, 1, vae.latent_dim)      # [R, S, B, D]
            vae.decoder.mean(z)                            # f(z): [1, 5, 1, D]
        """
        from ..model.vae import build_model
        r = self._replica(replica)
        full = self._trained()
        one = build_model(self.config.resolved_model(), replicas=1, data_dim=self._data_dim(),
                          noise=self.config.data.sigma)
        # every parameter and buffer carries the replica axis first (model/layers.py): row r is replica r
        one.load_state_dict({k: v[r:r + 1].clone() for k, v in full.state_dict().items()})
        return one.eval()

    def _data_dim(self) -> int:
        return int(self._trained().decoder.shape[-1])

    def _points(self, y) -> np.ndarray:
        """y (numpy or torch), [N] or [N, D], as float64 numpy, checked against the model's D."""
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        y = np.asarray(y, dtype=np.float64)
        D = self._data_dim()
        if not (y.ndim == 2 and y.shape[1] == D or y.ndim == 1 and D == 1):
            want = "[N] or [N, 1]" if D == 1 else f"[N, {D}]"
            raise ValueError(f"y: shape {list(y.shape)}, but this run's data has D = {D}: expected {want}")
        if not np.all(np.isfinite(y)):
            raise ValueError("y: holds NaN or infinite values")
        return y

    def _seed(self, r: int) -> int:
        from ..model.layers import replica_seed
        return replica_seed(self.config.base_seed, r)

    def log_prob(self, y, replica: int = 0) -> np.ndarray:
        """log p(y) of each point under one replica, [N], as evaluation computes it: the
        trapezoid rule over z on the run's eval.grid_size and eval.grid_span when latent_dim
        <= 2 (exact to its reported quadrature_error), else importance sampling with
        eval.n_importance draws from that replica's evaluation seed.
        On the test split its mean is metrics.csv's test_log_likelihood for that replica.

            lp = run.log_prob(run.data("test"), replica=0)      # [N]
            lp.mean()                                            # test_log_likelihood of replica 0
        """
        from ..estimators.likelihood import importance_log_likelihood
        return self._per_point(y, replica, importance_log_likelihood, elbo=False)

    def _per_point(self, y, replica: int, sampler, elbo: bool) -> np.ndarray:
        """One replica's values per point, [N], by evaluation's choice of estimator: quadrature (log p, or
        the ELBO where `elbo`), or `sampler` (importance_log_likelihood, monte_carlo_elbo_with_error) drawing
        them from that replica's evaluation seed, each point on its own stream, and drawing again where
        evaluation would (likelihood.sampled): on the test split, the numbers evaluation wrote."""
        from ..estimators.likelihood import IMPORTANCE_OFFSET, choose, sampled
        r = self._replica(replica)
        model, y, ev = self.model(r), self._points(y), self.config.eval
        if len(y) == 0:
            return np.empty(0)
        with torch.no_grad():
            if choose("auto", model.latent_dim, ev.grid_size).exact:     # evaluation's choice
                return self._quadrature(model, r, y, elbo=elbo)[0].numpy()                     # [N]
            seeds = [self._seed(r) + IMPORTANCE_OFFSET]
            return sampled(model, y, sampler, ev.n_importance, seeds, ev.sampling_tolerance)[0][0].numpy()   # [N]

    def _quadrature(self, model, r: int, y: np.ndarray, elbo: bool) -> torch.Tensor:
        """log p (or the ELBO) [1, N] of replica r's model as evaluation computes it: on the nodes evaluation
        gave replica r for these y, each point's window following its posterior, refined to eval.tolerance
        where the grid's bound misses it. The nodes depend on every replica (a 1-D grid widens to the widest
        q at one spacing), and on a prior with kinks (a VampPrior of flows) another grid moves log p by up to
        its quadrature error (measured 1e-4): on the same nodes the test split's mean is evaluation's to
        float32 precision, or, at a point evaluation refined for another replica, to within its bound."""
        from ..estimators.quadrature import _refined_elbo, _refined_log_p, follow_posteriors, integrate, latent_grid
        ev = self.config.eval
        grid = _replica_grid(latent_grid(self._trained(), ev.grid_size, ev.grid_span, y=y), r)   # all R: [R, G, D]
        exact = follow_posteriors(model, y, grid, integrate(model, y, grid, elbo=elbo), ev.grid_size, ev.grid_span)
        return (_refined_elbo if elbo else _refined_log_p)(model, y, grid, exact, ev.tolerance)[0]

    def elbo(self, y, replica: int = 0) -> np.ndarray:
        """The ELBO of each point under one replica's encoder, [N], as evaluation computes it:
        by quadrature when latent_dim <= 2, else by Monte Carlo from q with eval.n_importance
        draws. On the test split its mean is metrics.csv's test_elbo; it is at most log_prob.

            gap = run.log_prob(y) - run.elbo(y)     # KL(q(z|y) || p(z|y)) per point, >= 0
        """
        from ..estimators.likelihood import monte_carlo_elbo_with_error
        return self._per_point(y, replica, monte_carlo_elbo_with_error, elbo=True)

    def sample(self, n: int, replica: int = 0, seed: int = 0) -> np.ndarray:
        """n draws y ~ p(y) from one replica, [n, D]: z from its prior, then y from its
        decoder's Gaussian; the same seed gives the same draws.

            y = run.sample(10_000, replica=0, seed=1)
            np.histogram(y[:, 0], bins=80, density=True)
        """
        from ..model.layers import make_generators
        n = operator.index(n)
        if n < 1:
            raise ValueError(f"n: expected a positive number of samples, got {n}")
        model = self.model(replica)
        _, y = model.generate(make_generators([operator.index(seed)]), n)                # y: [1, n, D]
        return y[0].double().numpy()


def _replica_grid(grid, r: int):
    """Replica r's rows of a latent grid (quadrature's Grid: nodes, log_w, log_w_coarse and the axes
    carry the replica axis first; the coarse indices and the core are shared), for a model of R = 1."""
    import dataclasses
    return dataclasses.replace(grid, nodes=grid.nodes[r:r + 1], log_w=grid.log_w[r:r + 1],
                               log_w_coarse=grid.log_w_coarse[r:r + 1], axes=tuple(a[r:r + 1] for a in grid.axes))


# -- sweeps --------------------------------------------------------------------------------------

class Sweep:
    """A folder of `mogvae sweep`, `mogvae study NAME` or `mogvae reproduce` (anything with a
    sweep.json): its top-level metrics and its run folders. Made by `mogvae.load`.

        sweep = mogvae.load("reproduce-out")
        sweep.metrics.groupby("model")["test_log_likelihood"].mean()
        sweep.run("mog-prior").log_prob(sweep.run("mog-prior").data("test"))
    """

    path: Path
    """The sweep folder, as given; its runs are path / "runs" / NAME.

        sorted(p.name for p in (sweep.path / "runs").iterdir())
    """

    def __init__(self, path: str | os.PathLike):
        from .sweep import read_record
        self.path = Path(path)
        with _one_line():
            self._record = read_record(self.path)
        self._finish = self._finishing_command()

    def _finishing_command(self) -> str:
        """The command that finishes (or resumes) this folder, for the unfinished-run message."""
        from ..storage.folders import read_manifest
        where, record = str(self.path), self._record
        layout = read_manifest(self.path)
        if layout is not None and layout.kind == "reproduce":
            return f"re-run `mogvae reproduce --out {where}` with the options it started with"
        if record.get("study"):
            quick = " --quick" if str(record.get("title", "")).endswith("(quick)") else ""
            return f"re-run `mogvae study {record['study']}{quick} --out {where}`"
        spec = str(record.get("title", "")).partition(": ")[2] or "SPEC.toml"
        return f"re-run `mogvae sweep {spec} --out {where}` (the same spec)"

    def __repr__(self) -> str:
        return f"Sweep({str(self.path)!r}, runs={len(self._record['cells'])})"

    @property
    def metrics(self):
        """The folder's metrics.csv as a pandas DataFrame: one row per (run, replica), with the
        grid's columns by their dotted keys, then run, model, seed (the replica index),
        replica_seed (its derived seed, as in Run.metrics) and every metric.

            sweep.metrics.pivot_table(index="model", columns="data.sigma", values="kl_to_truth")
        """
        path = self.path / "metrics.csv"
        if not os.path.lexists(path):
            raise LoadError(f"{path}: missing (written when every run has finished): {self._finish}")
        base = {c["name"]: c["config"].get("base_seed", 0) for c in self._record["cells"]}
        return _with_replica_seeds(_read_table(path), lambda row: base.get(row["run"], 0))

    @property
    def runs(self) -> dict[str, Run]:
        """Every cell's Run, by cell name, in the grid's order (a run not yet finished is there too;
        its metrics say what finishes it).

            {name: run.metrics["test_log_likelihood"].mean() for name, run in sweep.runs.items()}
        """
        return {c["name"]: Run._of_sweep(self.path / "runs" / c["name"], self._finish, c["config"])
                for c in self._record["cells"]}

    def run(self, name: str) -> Run:
        """One Run by its cell name ("preset=mfg__data.sigma=0.1"), or by its preset's name
        ("mog-prior") where exactly one cell has that preset (a reproduce folder's runs).

            sweep.run("mog-prior").model(replica=0)
        """
        cells = {c["name"]: c for c in self._record["cells"]}     # only the named run is opened: a damaged
        if name not in cells:                                     # neighbour does not make it unreadable
            matches = [c["name"] for c in cells.values() if c["values"].get("preset") == name]
            if len(matches) > 1:
                raise UnknownRun(f"{name!r} is the preset of {len(matches)} runs in {self.path}: name one of "
                                 f"{', '.join(matches)}")
            if not matches:
                raise UnknownRun(f"no run named {name!r} in {self.path}; its runs: {', '.join(cells) or 'none'}")
            name = matches[0]
        return Run._of_sweep(self.path / "runs" / name, self._finish, cells[name]["config"])


# -- entry points ----------------------------------------------------------------------------------

def load(path: str | os.PathLike) -> Run | Sweep:
    """A finished (or running) mogvae folder: a Sweep where it holds sweep.json (`mogvae sweep`,
    `mogvae study`, `mogvae reproduce`), a Run where it holds config.json (`mogvae train`, or one
    of a sweep's runs/NAME). Reads only; anything else is a one-line LoadError.

        run = mogvae.load("out/run")
        sweep = mogvae.load("reproduce-out")
        sweep.run("mog-prior").metrics
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such folder")
    if not path.is_dir():
        raise LoadError(f"{path}: not a folder (a run or sweep folder is one)")
    if os.path.lexists(path / "sweep.json"):
        return Sweep(path)
    if os.path.lexists(path / "config.json"):
        finish = _sweep_of(path)
        return Run._of_sweep(path, finish, None) if finish else Run(path)
    raise LoadError(f"{path}: neither a run folder (config.json, from `mogvae train`) nor a sweep folder "
                    "(sweep.json, from `mogvae sweep`, `mogvae study` or `mogvae reproduce`)")


def _sweep_of(run: Path) -> str | None:
    """The command that finishes the sweep whose runs/NAME `run` is (None for a run of its own):
    its unfinished message then names that command, not `mogvae train`."""
    root = run.parent.parent
    if run.parent.name != "runs" or not os.path.lexists(root / "sweep.json"):
        return None
    try:
        return Sweep(root)._finish
    except LoadError:          # a damaged sweep.json: the run alone is still readable
        return None
