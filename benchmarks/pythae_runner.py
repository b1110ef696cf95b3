"""pythae 0.1.2's own trainer on the paper's data, with the same MLPs (64-64,
SiLU), batch size, learning rate and epochs as the other rows. Its VAE uses an
MSE reconstruction term and VAMP a pseudo-input prior: the same work per step
as mfg and mog-prior, not the same objective -- this row measures speed only."""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile

import numpy as np
import torch
from torch import nn


def train_pythae(kind: str, y: np.ndarray, seed: int, epochs: int) -> None:
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE, VAEConfig, VAMP, VAMPConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("pythae"):
            logging.getLogger(name).setLevel(logging.ERROR)

    def mlp(i, o):
        return nn.Sequential(nn.Linear(i, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, o))

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = mlp(1, 2)

        def forward(self, x):
            h = self.net(x.reshape(len(x), 1))
            return ModelOutput(embedding=h[:, :1], log_covariance=h[:, 1:])

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = mlp(1, 1)

        def forward(self, z):
            return ModelOutput(reconstruction=self.net(z))

    torch.manual_seed(seed)
    if kind == "vae":
        config = VAEConfig(input_dim=(1,), latent_dim=1, reconstruction_loss="mse")
        model = VAE(config, encoder=Encoder(), decoder=Decoder())
    else:
        config = VAMPConfig(input_dim=(1,), latent_dim=1, reconstruction_loss="mse", number_components=10)
        model = VAMP(config, encoder=Encoder(), decoder=Decoder())
    with tempfile.TemporaryDirectory() as out:
        trainer_config = BaseTrainerConfig(output_dir=out, num_epochs=epochs, learning_rate=1e-3,
                                           per_device_train_batch_size=256, no_cuda=True, seed=seed % 2**32)
        data = torch.as_tensor(y, dtype=torch.float32)[:, None]
        trainer = BaseTrainer(model=model, train_dataset=BaseDataset(data, torch.zeros(len(data))),
                              training_config=trainer_config)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer.train()  # pythae prints its configuration and a progress bar per epoch
