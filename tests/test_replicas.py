"""The replica axis: batched layers against per-replica autograd, and independence."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mogvae.config.schema import TrainConfig, preset
from mogvae.data.paper import PaperProcess, make_splits
from mogvae.model.vae import build_model
from mogvae.model.layers import MLP, BatchedLinear, initialize, randn_per_replica, make_generators, replica_seed
from mogvae.training.trainer import fit


@pytest.mark.parametrize("I, O", [(3, 5), (1, 5), (3, 1), (1, 1)])   # the matmul, outer-product and dot paths
def test_batched_linear_gradients_match_per_replica_autograd(I, O):
    R, B = 4, 7
    layer = BatchedLinear(R, I, O).double()
    initialize(layer, list(range(R)))
    x = torch.randn(R, B, I, dtype=torch.float64)
    c = torch.randn(R, B, O, dtype=torch.float64)
    (layer(x) * c).pow(2).sum().backward()
    for r in range(R):
        w = layer.weight[r].detach().clone().requires_grad_()
        b = layer.bias[r, 0].detach().clone().requires_grad_()
        (F.linear(x[r], w.T, b) * c[r]).pow(2).sum().backward()
        torch.testing.assert_close(layer.weight.grad[r], w.grad)
        torch.testing.assert_close(layer.bias.grad[r, 0], b.grad)


def test_batched_mlp_gradient_matches_finite_differences():
    mlp = MLP(2, 1, (4, 4), 2, "silu").double()
    initialize(mlp, [0, 1])
    x = torch.randn(2, 3, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: mlp(inp), (x,))
    w = mlp.net[0].weight
    assert torch.autograd.gradcheck(lambda weight: torch.func.functional_call(
        mlp, {"net.0.weight": weight}, (x.detach(),)), (w.detach().clone().requires_grad_(),))


def test_single_replica_is_the_unbatched_network():
    mlp = MLP(1, 1, (8, 8), 2, "tanh").double()
    initialize(mlp, [3])
    linears = [m for m in mlp.net if isinstance(m, BatchedLinear)]
    x = torch.randn(10, 1, dtype=torch.float64)
    h = x
    for i, lin in enumerate(linears):
        h = F.linear(h, lin.weight[0].T, lin.bias[0, 0])
        if i < len(linears) - 1:
            h = torch.tanh(h)
    torch.testing.assert_close(mlp(x[None])[0], h, rtol=1e-13, atol=1e-13)


def test_replica_initialization_depends_only_on_its_own_seed():
    a = build_model(preset("mog-both"), replicas=3)
    b = build_model(preset("mog-both"), replicas=1)
    initialize(a, [10, 20, 30])
    initialize(b, [20])
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa[1], pb[0]), name


def test_noise_of_a_replica_is_the_same_alone_or_among_others():
    among = randn_per_replica(make_generators([1, 2, 3]), (4, 5))
    alone = randn_per_replica(make_generators([2]), (4, 5))
    assert torch.equal(among[1], alone[0])


@pytest.mark.parametrize("name,objective", [("mfg", "elbo"), ("mog-posterior", "elbo"), ("mog-both", "iwae"),
                                            ("mog-prior", "exact"), ("mfg+flow", "elbo")])
def test_a_replica_trains_the_same_alone_or_among_others(name, objective):
    data = make_splits(PaperProcess(), {"train": 600, "val": 100}, 0)
    cfg = TrainConfig(epochs=3, batch_size=64, objective=objective, n_samples=3 if objective == "iwae" else 1,
                      exact_grid=401)
    seeds = [replica_seed(0, i) for i in range(3)]
    results = []
    for replica_seeds in (seeds, seeds[1:2]):
        base, _, posterior = name.partition("+")          # "mfg+flow": that preset with a flow posterior
        model = build_model(preset(base, hidden=(16, 16), **({"posterior": posterior} if posterior else {})),
                            replicas=len(replica_seeds))
        gens = initialize(model, replica_seeds)
        history = fit(model, data["train"], data["val"], cfg, replica_seeds, gens)
        results.append((model, history))
    (many, h_many), (one, h_one) = results
    for (key, p_many), p_one in zip(many.named_parameters(), one.parameters()):
        torch.testing.assert_close(p_many[1], p_one[0], rtol=1e-4, atol=1e-5, msg=key)
    # float32 sums over the validation set: relative 1e-5, and absolute 1e-6 where an ELBO is near 0
    np.testing.assert_allclose([v[1] for v in h_many.val_elbo], [v[0] for v in h_one.val_elbo], rtol=1e-5, atol=1e-6)


PINNED_SEEDS = [8668861027912758289, 4881901421217228719, 7229315352737646090]  # replica_seed(0, 0..2) since 0.1.0


def test_replica_seeds_come_from_base_seed_and_index_only():
    import subprocess
    import sys
    # the same in a fresh interpreter (another hash seed, nothing else computed first), and in any order
    code = "from mogvae.model.layers import replica_seed; print([replica_seed(7, i) for i in (5, 0, 3)])"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": "123"}).stdout
    assert eval(fresh) == [replica_seed(7, i) for i in (5, 0, 3)]
    # pinned: a change of derivation would silently change every published number
    assert [replica_seed(0, i) for i in range(3)] == PINNED_SEEDS
    assert len({replica_seed(0, i) for i in range(100)}) == 100
    assert replica_seed(1, 0) != replica_seed(0, 1)
