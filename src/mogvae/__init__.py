"""mogvae: does a VAE gain more from a more expressive prior or posterior?

    import mogvae
    truth = mogvae.PaperProcess(sigma=0.1)
    z, y = truth.sample(1000, seed=0)
    model = mogvae.build_model(mogvae.preset("mog-prior"), replicas=5)

    run = mogvae.train("examples/run.toml", "runs/mog-prior")   # as `mogvae train`; -> mogvae.Run
    run = mogvae.load("runs/mog-prior")                         # a run folder -> Run, a sweep's -> Sweep
    run.metrics, run.log_prob(run.data("test"), replica=0)

The names below are imported on first use, so that `mogvae --version` and
refusals of bad input answer at once instead of after importing PyTorch.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PaperProcess": "data.paper", "load_data_file": "data.files", "make_splits": "data.paper",
    "VAE": "model.vae", "build_model": "model.vae",
    "preset": "config.schema", "ModelConfig": "config.schema", "TrainConfig": "config.schema",
    "EvalConfig": "config.schema", "ReproduceConfig": "config.schema",
    "elbo": "objectives.bounds", "iwae_bound": "objectives.bounds",
    "integrate": "estimators.quadrature", "latent_grid": "estimators.quadrature",
    "log_likelihood": "estimators.likelihood", "best_posterior": "estimators.gaps", "trained_model": "runs.run",
    "evaluate": "estimators.evaluate",
    "initialize": "model.layers", "replica_seed": "model.layers",
    "Trainer": "training.trainer", "fit": "training.trainer",
    "load": "runs.results", "train": "runs.train_api", "Run": "runs.results", "Sweep": "runs.results",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mogvae' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS])
