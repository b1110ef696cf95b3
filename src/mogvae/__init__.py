"""mogvae: does a VAE gain more from a more expressive prior or posterior?

    import mogvae
    run = mogvae.train("examples/run.toml", "runs/mog-prior")   # as `mogvae train` -> mogvae.Run
    run = mogvae.load("runs/mog-prior")        # a run folder -> Run; a sweep's, a study's -> Sweep
    run.metrics                                 # pandas, one row per replica
    run.log_prob(run.data("test"), replica=0)   # exact log p(y) per point
    run.sample(1000, replica=0, seed=0)         # from p_theta(y)

help(mogvae.Run) and help(mogvae.Sweep) show what a folder gives. The building blocks
are here too (PaperProcess, build_model, preset, ModelConfig, elbo, integrate,
log_likelihood, best_posterior, evaluate, Trainer, fit, ...); every name and its
documentation: docs/reference/api.md. They are imported on first use, so that
`mogvae --version` and refusals of bad input answer before PyTorch is imported.
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
__all__ = ["load", "train"]   # the front door: help(mogvae) fits on a screen; _EXPORTS has the rest


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mogvae' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS])
