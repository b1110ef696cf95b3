"""Training curves for TensorBoard (optional: `pip install 'mogvae[tensorboard]'`).

`--tensorboard` writes each replica's training loss and validation ELBO, per
epoch, into the run folder's `tensorboard/` (view with `tensorboard --logdir
DIR`). These files are a view: history.jsonl stays the record. A resumed run
adds a new event file; epochs redone after a crash appear twice, at the same step.
"""
from __future__ import annotations

import math
from pathlib import Path

FOLDER = "tensorboard"


class CurveLogUnavailable(RuntimeError):
    """TensorBoard is not installed: said before any training starts."""


def check_available() -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise CurveLogUnavailable("--tensorboard needs the tensorboard package: "
                                  "pip install 'mogvae[tensorboard]'") from None


class CurveLog:
    def __init__(self, run_path: Path):
        check_available()
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(Path(run_path) / FOLDER))

    def epoch(self, epoch: int, train_loss: list[float], val_elbo: list[float]) -> None:
        for r, (loss, val) in enumerate(zip(train_loss, val_elbo)):
            if math.isfinite(loss):  # a stopped replica has no curve from then on
                self.writer.add_scalar(f"train_loss/replica_{r}", loss, epoch)
            if math.isfinite(val):
                self.writer.add_scalar(f"val_elbo/replica_{r}", val, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
