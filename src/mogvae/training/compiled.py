"""torch.compile of the training loss, where it repays its compile time.

Measured on a 2-core CPU, one thread, in separate processes against eager:
inductor fuses a step's element-wise work and took it 1.2x faster for a mixture
posterior at R = 5, 1.2-1.3x at R = 10, 1.3x for mfg at R = 5, for a compile of
5-30 s per process (about 2 s from its on-disk cache); re-measured for reproduce's
mixture posterior (R = 5, K = 10): 0.70 -> 0.52 s an epoch (1.35x), 17-18 s cold (about 30 s
when its two mixture runs compile at once), 1.6 s warm.
So `auto` compiles the jobs whose expected saving repays a cold compile: reproduce's
mixture runs (31 s to save), not its Gaussian-posterior ones (3 s). Compiled kernels round
differently from eager ones (parameters differ by 1e-7 to 1e-5 after a few epochs; reproduce's
metrics within 1.7e-7 nats of eager's, per seed), so the choice is part of the configuration
(`train.compile`), and a checkpoint records what `auto` chose: a run and its resumption use the
same one, and stay bitwise identical, even under a version whose rule would choose otherwise (a
checkpoint from before it was recorded resumes by that time's rule, LEGACY_THRESHOLD).
"""
from __future__ import annotations

import sys

import torch

from ..objectives import OBJECTIVES

SAVED_PER_POINT_STEP = 0.3e-6   # seconds saved per latent point per step (measured: 0.3-0.7 us)
COMPILE_COST = 20.0             # seconds for a cold compile (measured: 5-30 s; 17-18 s for reproduce's mixtures)
RECOMPILE_LIMIT = 64            # compiled graphs per process (architectures x batch sizes)
PAYBACK = 1.0                   # auto compiles when the expected saving is this many cold compiles
LEGACY_THRESHOLD = 60.0         # seconds: auto's rule when checkpoints did not yet record its choice (2 x 30 s)


def latent_points_per_step(replicas: int, strata: int, batch: int, n_samples: int) -> int:
    """Latent draws the decoder sees in one step: what the step's element-wise work scales with."""
    return replicas * strata * batch * n_samples


def should_compile(setting: str, device: str, objective: str, steps: int, points_per_step: int,
                   threshold: float | None = None) -> bool:
    """Whether to compile the loss: `on` and `off` say so; `auto` when, on a CPU, the job is long
    enough that the expected saving pays the compile cost PAYBACK times. Only a sampled bound is
    compiled (the exact objective's quadrature is already a few large tensor operations)."""
    if setting == "off" or not OBJECTIVES[objective].sampled:
        return False
    if setting == "on":
        return True
    saving = steps * points_per_step * SAVED_PER_POINT_STEP
    return device == "cpu" and saving >= (PAYBACK * COMPILE_COST if threshold is None else threshold)


class CompiledLoss:
    """`loss(y, eps)` compiled for the full batch shape; other shapes (the epoch's last, smaller
    batch) run eagerly, so a ragged batch costs no second compile. If compiling fails (no C++
    compiler, say), it says so in one line and runs eagerly from then on."""

    def __init__(self, loss, full_batch: int):
        # Trainers of one architecture share a compiled graph (parameters are its inputs); each new
        # architecture or batch size in a process adds one. Past dynamo's limit (8) it would run
        # eagerly without a word, so numbers would depend on what the process trained before:
        # allow many, and make hitting the limit an error that the fallback below reports.
        import torch._dynamo     # here, not at the top: a process that does not compile never loads the compiler
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        dynamo.fail_on_recompile_limit_hit = True
        self.eager, self.full_batch = loss, full_batch
        self.compiled = torch.compile(loss, dynamic=False)

    def __call__(self, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.compiled is None or y.shape[1] != self.full_batch:
            return self.eager(y, eps)
        try:
            return self.compiled(y, eps)
        except Exception as e:  # inductor raises many types (a missing compiler, a lowering gap)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            print(f"mogvae: torch.compile failed ({type(e).__name__}: {first}); training eagerly",
                  file=sys.stderr)
            self.compiled = None
            return self.eager(y, eps)
