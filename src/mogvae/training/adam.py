"""Adam and its cosine schedule: torch's own update, with the state held here.

torch.optim.Adam's constructor imports torch._dynamo (its parameter groups pass through
torch._disable_dynamo), whether or not anything compiles: measured 1.2 s of CPU in every process that
trains, and in every sweep's fork server, which preloaded it so that its workers would not each pay it
(the server's imports 1.9 s without it, 3.1 s with). So the step is torch's functional Adam,
`torch.optim.adam.adam`, with the fused kernel that `torch.optim.Adam(fused=True)` calls, on state of
the same names and types; and the learning rate follows CosineAnnealingLR's own recursion, the same
float operations in the same order. Trained numbers are bitwise what the torch classes give
(tests/test_train.py holds them side by side), and checkpoints keep their keys: a run checkpointed by
either resumes with the other.
"""
from __future__ import annotations

import math

import torch
from torch.optim.adam import adam


class Adam:
    """Adam with torch's defaults (betas 0.9 and 0.999, eps 1e-8, no weight decay) and its fused kernel
    over `params`, at learning rate `lr`. `state[p]` holds step, exp_avg and exp_avg_sq, as
    torch.optim.Adam's state does, and as there from a parameter's first step on: before it a snapshot
    holds no moments (a rollback in the first epoch then restores parameters only, as it did)."""

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(self, params, lr: float):
        self.params = list(params)
        self.lr = lr
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _fresh(p: torch.Tensor) -> dict[str, torch.Tensor]:
        # the fused kernel keeps its step count as a float32 scalar on the parameter's device
        return {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def zero_grad(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        live = [p for p in self.params if p.grad is not None]
        for p in live:
            if p not in self.state:          # a parameter's first step: its moments begin here, as torch's do
                self.state[p] = self._fresh(p)
        states = [self.state[p] for p in live]
        adam(live, [p.grad for p in live], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
             [s["step"] for s in states], foreach=None, capturable=False, differentiable=False, fused=True,
             grad_scale=None, found_inf=None, has_complex=False, decoupled_weight_decay=False, amsgrad=False,
             beta1=self.BETAS[0], beta2=self.BETAS[1], lr=self.lr, weight_decay=0.0, eps=self.EPS, maximize=False)


class CosineSchedule:
    """torch.optim.lr_scheduler.CosineAnnealingLR for one Adam, stepped once per epoch: from `lr` down to
    eta_min over T_max epochs by the scheduler's recursion, lr_e = (1 + cos(pi e / T)) / (1 + cos(pi (e - 1)
    / T)) (lr_(e-1) - eta_min) + eta_min, which rounds otherwise than its closed form; state_dict has the
    scheduler's keys."""

    def __init__(self, optimizer: Adam, T_max: int, eta_min: float):
        self.optimizer, self.T_max, self.eta_min = optimizer, T_max, eta_min
        self.base_lr, self.last_epoch, self._step_count = optimizer.lr, 0, 1

    def step(self) -> None:
        self.last_epoch += 1
        self._step_count += 1
        e, T, lr = self.last_epoch, self.T_max, self.optimizer.lr
        if (e - 1 - T) % (2 * T) == 0:      # the scheduler's branch for a restart past T_max
            self.optimizer.lr = lr + (self.base_lr - self.eta_min) * (1 - math.cos(math.pi / T)) / 2
        else:
            self.optimizer.lr = ((1 + math.cos(math.pi * e / T)) / (1 + math.cos(math.pi * (e - 1) / T))
                                 * (lr - self.eta_min) + self.eta_min)

    def state_dict(self) -> dict:
        return {"T_max": self.T_max, "eta_min": self.eta_min, "base_lrs": [self.base_lr],
                "last_epoch": self.last_epoch, "_step_count": self._step_count, "_is_initial": False,
                "_get_lr_called_within_step": False, "_last_lr": [self.optimizer.lr]}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch, self._step_count = state["last_epoch"], state["_step_count"]
