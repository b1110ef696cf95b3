"""The replica axis: R independent copies of a network trained as one.

Every parameter carries a leading replica axis, and a forward pass is a batched
matrix product (`torch.baddbmm`), so R seeds cost little more than one on a CPU
where small products are dominated by per-call overhead. A single model is R = 1.

Independence: each replica draws its initialization, data order and noise from
its own `torch.Generator`, seeded from its own seed only, so a replica's
trajectory is the same alone or among any other replicas.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU, "softplus": nn.Softplus}


def replica_seed(base_seed: int, replica: int) -> int:
    """The seed of replica `replica` of a study seeded with `base_seed`.
    Derived from both (never from execution order or from R)."""
    ss = np.random.SeedSequence(entropy=int(base_seed), spawn_key=(int(replica),))
    return int(ss.generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def randn_per_replica(generators: list[torch.Generator], shape, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise [R, *shape], replica r drawn from generators[r] alone."""
    return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in generators])


class BatchedLinear(nn.Module):
    """R affine maps at once: x [R, B, I] -> [R, B, O]."""

    def __init__(self, replicas: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(replicas, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(replicas, 1, out_features))

    def reset_replica(self, r: int, generator: torch.Generator) -> None:
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight[r].uniform_(-bound, bound, generator=generator)
            self.bias[r].uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_features == 1:  # a 1-D input (the paper's y and z): an outer product, not a matmul
            return torch.addcmul(self.bias, x, self.weight)  # [R, B, 1] * [R, 1, O]
        if self.out_features == 1:
            # A 1-D output (the paper's decoder mean): a batched matrix-vector product, which MKL's
            # bmm runs at a few GFLOP/s, forward and in both gradients (0.7-1.0 ms for 1.6 MFLOP);
            # a product and a sum over the features instead (docs/speed.md).
            return (x * self.weight.transpose(1, 2)).sum(-1, keepdim=True) + self.bias   # [R, B, 1]
        return torch.baddbmm(self.bias, x, self.weight)  # [R, B, O]


class MLP(nn.Module):
    """R independent multilayer perceptrons: [R, B, I] -> [R, B, O]."""

    def __init__(self, replicas: int, in_features: int, hidden: tuple[int, ...],
                 out_features: int, activation: str = "tanh"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        widths = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(BatchedLinear(replicas, a, b))
            if i < len(widths) - 2:
                layers.append(ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def initialize(module: nn.Module, seeds: list[int]) -> list[torch.Generator]:
    """Initialize replica r of every sub-module from seeds[r] alone, in module
    order, and return the generators positioned after initialization (they go on
    to draw that replica's data order and noise)."""
    generators = make_generators(seeds)
    for r, g in enumerate(generators):
        for m in module.modules():
            if hasattr(m, "reset_replica"):
                m.reset_replica(r, g)
    return generators


def replica_count(module: nn.Module) -> int:
    return next(iter(module.parameters())).shape[0]


def replica_subset(module: nn.Module, index: list[int]) -> nn.Module:
    """A copy of `module` holding only the replicas `index`, in that order (every parameter and buffer
    carries the replica axis first): evaluation's per-point refinement runs only the replicas that need it."""
    import copy
    sub = copy.deepcopy(module)
    with torch.no_grad():
        for m in sub.modules():
            for name, p in m._parameters.items():
                if p is not None:
                    m._parameters[name] = nn.Parameter(p[index].clone(), requires_grad=p.requires_grad)
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = b[index].clone()
    return sub
