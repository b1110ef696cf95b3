"""mogvae: does a VAE gain more from a more expressive prior or posterior?

    import mogvae
    truth = mogvae.PaperProcess(sigma=0.1)
    z, y = truth.sample(1000, seed=0)
    model = mogvae.build_model(mogvae.preset("mog-prior"), replicas=5)
"""
__version__ = "0.1.0"

from .config import EvalConfig, ModelConfig, StudyConfig, TrainConfig, preset  # noqa: E402
from .data import PaperProcess, load_data_file, make_splits  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .model import VAE, build_model  # noqa: E402
from .objectives import elbo, iwae_bound  # noqa: E402
from .quadrature import integrate, latent_grid  # noqa: E402
from .replicas import initialize, replica_seed  # noqa: E402
from .train import Trainer, fit  # noqa: E402

__all__ = ["PaperProcess", "load_data_file", "make_splits", "VAE", "build_model", "preset", "ModelConfig",
           "TrainConfig", "EvalConfig", "StudyConfig", "elbo", "iwae_bound", "integrate", "latent_grid",
           "evaluate", "initialize", "replica_seed", "Trainer", "fit"]
