"""mogvae: does a VAE gain more from a more expressive prior or posterior?

    import mogvae
    truth = mogvae.PaperProcess(sigma=0.1)
    z, y = truth.sample(1000, seed=0)
    model = mogvae.build_model(mogvae.preset("mog-prior"), replicas=5)

The names below are imported on first use, so that `mogvae --version` and
refusals of bad input answer at once instead of after importing PyTorch.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PaperProcess": "data", "load_data_file": "data", "make_splits": "data",
    "VAE": "model", "build_model": "model",
    "preset": "config", "ModelConfig": "config", "TrainConfig": "config", "EvalConfig": "config",
    "StudyConfig": "config",
    "elbo": "objectives", "iwae_bound": "objectives",
    "integrate": "quadrature", "latent_grid": "quadrature",
    "log_likelihood": "likelihood", "best_posterior": "gaps", "trained_model": "runs",
    "evaluate": "evaluate",
    "initialize": "replicas", "replica_seed": "replicas",
    "Trainer": "train", "fit": "train",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mogvae' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS])
