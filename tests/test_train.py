"""Training: it learns, and a diverging replica is caught, frozen and recorded
while its siblings go on exactly as if nothing had happened."""
import dataclasses
import math

import numpy as np
import pytest
import torch

import mogvae.training.trainer as train_module
from mogvae.config.schema import TrainConfig, preset
from mogvae.data.paper import PaperProcess, make_splits
from mogvae.model.vae import build_model
from mogvae.model.layers import initialize
from mogvae.objectives import OBJECTIVES
from mogvae.training.trainer import fit

DATA = make_splits(PaperProcess(), {"train": 600, "val": 100}, 0)
SEEDS = [11, 22, 33]


def run(name, epochs, inject=None, monkeypatch=None):
    model = build_model(preset(name, hidden=(16, 16)), replicas=len(SEEDS))
    gens = initialize(model, SEEDS)
    if inject is not None:
        step_to_poison, replica, value = inject
        calls = {"n": 0}
        real = OBJECTIVES["elbo"].per_point

        def poisoned(model, y, eps):
            out = real(model, y, eps)
            if torch.is_grad_enabled():  # a training step, not validation
                if calls["n"] == step_to_poison:
                    out = out.clone()
                    out[replica] = value
                calls["n"] += 1
            return out
        monkeypatch.setitem(OBJECTIVES, "elbo", dataclasses.replace(OBJECTIVES["elbo"], per_point=poisoned))
    history = fit(model, DATA["train"], DATA["val"], TrainConfig(epochs=epochs, batch_size=100), SEEDS, gens)
    return model, history


def test_training_improves_the_validation_elbo():
    _, history = run("mfg", 12)
    first, last = np.array(history.val_elbo[0]), np.array(history.val_elbo[-1])
    assert (last > first + 0.03).all(), (first, last)


@pytest.mark.parametrize("name", ["mfg", "mog-prior", "mog-posterior", "mog-both"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_diverging_replica_is_frozen_and_its_siblings_are_untouched(name, value, monkeypatch):
    clean_1, _ = run(name, 1)                      # 6 steps: the state before the poisoned step
    clean_3, clean_history = run(name, 3)
    poisoned, history = run(name, 3, inject=(6, 1, value), monkeypatch=monkeypatch)
    assert history.diverged == [False, True, False]
    d = history.divergence[1]
    assert (d.epoch, d.step) == (1, 6) and "non-finite loss" in d.reason
    for p_clean1, p_clean3, p_bad in zip(clean_1.parameters(), clean_3.parameters(), poisoned.parameters()):
        assert torch.equal(p_bad[1], p_clean1[1])             # frozen at its last finite state
        assert torch.equal(p_bad[0], p_clean3[0]) and torch.equal(p_bad[2], p_clean3[2])
        assert torch.isfinite(p_bad).all()
    assert math.isnan(history.val_elbo[-1][1])
    assert history.val_elbo[-1][0] == clean_history.val_elbo[-1][0]


def test_non_finite_gradients_are_caught_even_when_the_loss_is_finite():
    model = build_model(preset("mfg", hidden=(16, 16)), replicas=2)
    gens = initialize(model, [1, 2])
    hook = model.decoder.net.net[0].weight.register_hook(
        lambda g: torch.where(torch.arange(2)[:, None, None] == 0, g * math.inf, g))
    history = fit(model, DATA["train"], DATA["val"], TrainConfig(epochs=1, batch_size=100), [1, 2], gens)
    hook.remove()
    assert history.diverged == [True, False]
    assert history.divergence[0].reason == "non-finite gradient"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def run_policy(name, policy, poison_steps, replica=1, max_retries=3, monkeypatch=None, epochs=3):
    model = build_model(preset(name, hidden=(16, 16)), replicas=len(SEEDS))
    gens = initialize(model, SEEDS)
    if poison_steps:
        calls = {"n": 0}
        real = OBJECTIVES["elbo"].per_point

        def poisoned(model, y, eps):
            out = real(model, y, eps)
            if torch.is_grad_enabled():
                if calls["n"] in poison_steps:
                    out = out.clone()
                    out[replica] = math.nan
                calls["n"] += 1
            return out
        monkeypatch.setitem(OBJECTIVES, "elbo", dataclasses.replace(OBJECTIVES["elbo"], per_point=poisoned))
    cfg = TrainConfig(epochs=epochs, batch_size=100, on_divergence=policy, max_retries=max_retries)
    return model, fit(model, DATA["train"], DATA["val"], cfg, SEEDS, gens)


@pytest.mark.parametrize("policy", ["skip", "rollback"])
@pytest.mark.parametrize("name", ["mfg", "mog-both"])
def test_skip_and_rollback_recover_and_leave_siblings_untouched(name, policy, monkeypatch):
    clean, _ = run_policy(name, policy, set())
    hit, history = run_policy(name, policy, {8}, monkeypatch=monkeypatch)
    assert history.diverged == [False, False, False]
    assert history.events == [{"replica": 1, "epoch": 1, "step": 8, "reason": "non-finite loss", "action": policy}]
    for p_clean, p_hit in zip(clean.parameters(), hit.parameters()):
        assert torch.equal(p_hit[0], p_clean[0]) and torch.equal(p_hit[2], p_clean[2])
        assert torch.isfinite(p_hit[1]).all() and not torch.equal(p_hit[1], p_clean[1])
    assert all(math.isfinite(v) for v in history.val_elbo[-1])


def test_a_skipped_step_leaves_the_replica_exactly_where_it_was(monkeypatch):
    # poison the last step of epoch 1: after it the replica equals a clean run stopped one step earlier,
    # which is a clean one-epoch run whose last step is dropped -- compare with policy "stop" at that step
    stop, _ = run_policy("mfg", "stop", {5}, monkeypatch=monkeypatch, epochs=1)
    monkeypatch.undo()
    skip, h = run_policy("mfg", "skip", {5}, monkeypatch=monkeypatch, epochs=1)
    assert h.events[0]["action"] == "skip"
    for p_stop, p_skip in zip(stop.parameters(), skip.parameters()):
        assert torch.equal(p_stop[1], p_skip[1])


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_retries_are_bounded_then_the_replica_stops(policy, monkeypatch):
    _, history = run_policy("mfg", policy, set(range(1000)), max_retries=2, monkeypatch=monkeypatch)
    actions = [e["action"] for e in history.events]
    assert actions == [policy, policy, "stop"]
    assert history.diverged == [False, True, False]


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_a_step_in_chunks_gives_the_whole_batch_gradient(objective):
    """The step runs its batch in chunks (training.trainer.CHUNK_ROWS); the loss and every gradient must
    be the whole batch's, to float32 rounding, including a ragged last chunk."""
    grads = {}
    for chunk in (100, 30):                                      # whole, and 30 + 30 + 30 + 10
        model = build_model(preset("mog-posterior", hidden=(16, 16), n_components=3), replicas=len(SEEDS))
        gens = initialize(model, SEEDS)
        config = TrainConfig(epochs=1, batch_size=100, objective=objective, n_samples=2)
        trainer = train_module.Trainer(model, DATA["train"], DATA["val"], config, SEEDS, gens)
        trainer.chunk = chunk
        y = trainer.data[torch.arange(100)].expand(len(SEEDS), 100, 1)
        eps = train_module.draw_noise(model, train_module.make_generators([7, 8, 9]), 100, 2)
        loss = trainer._backward(y, eps)
        grads[chunk] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads[30][0], grads[100][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(grads[30][1], grads[100][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert a.abs().max() > 0


@pytest.mark.parametrize("name", ["mfg", "mog-posterior"])
def test_multidimensional_observations_train_through_the_same_loop(name):
    """y [N, D]: the folded process with D = 6 observed dimensions and a 1-D latent. The trainer
    learns: every replica's validation ELBO rises, none diverges."""
    from mogvae.data.folded import FoldedProcess
    process = FoldedProcess(6, 1, 2, 0.1)
    _, y_train = process.sample(600, 1)
    _, y_val = process.sample(100, 2)
    model = build_model(preset(name, hidden=(16, 16)), replicas=len(SEEDS), data_dim=6)
    gens = initialize(model, SEEDS)
    history = fit(model, y_train, y_val, TrainConfig(epochs=15, batch_size=100), SEEDS, gens)
    first, last = np.array(history.val_elbo[0]), np.array(history.val_elbo[-1])
    assert (last > first + 0.5).all(), (first, last)
    assert not any(history.diverged)


def test_adam_and_its_schedule_are_bitwise_torchs_classes_and_share_their_checkpoints():
    """training/adam.py holds torch's fused Adam without torch.optim.Adam (whose constructor imports the
    compiler): against torch.optim.Adam(fused=True) with CosineAnnealingLR, the same gradients for 12
    epochs of 3 steps give bitwise the same parameters, moments, step counts and learning rates, and each
    side resumes from the other's state (half way, as a checkpoint does) to the same end."""
    from mogvae.training.adam import Adam, CosineSchedule

    def gradients(epoch, step, shapes):
        g = torch.Generator().manual_seed(100 * epoch + step)
        return [torch.randn(s, generator=g) * 10.0 ** (epoch % 3 - 1) for s in shapes]

    shapes = [(3, 4, 5), (3, 5), (3, 1)]
    start = [torch.randn(s) for s in shapes]

    def train(use_torch, epochs, state=None):
        params = [p.clone().requires_grad_(True) for p in (state["params"] if state else start)]
        if use_torch:
            opt = torch.optim.Adam(params, lr=3e-3, fused=True)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12, eta_min=3e-5)
        else:
            opt = Adam(params, lr=3e-3)
            sched = CosineSchedule(opt, T_max=12, eta_min=3e-5)
        if state:
            for p, s in zip(params, state["moments"]):
                opt.state[p] = {k: v.clone() for k, v in s.items()}
            if use_torch:
                opt.param_groups[0]["lr"] = state["lr"]
            else:
                opt.lr = state["lr"]
            sched.load_state_dict(state["schedule"])
        if not state:
            assert not opt.state            # no moments before the first step, as a first epoch's snapshot sees
        lrs = []
        for epoch in range(sched.last_epoch, epochs):
            for step in range(3):
                for p, g in zip(params, gradients(epoch, step, shapes)):
                    p.grad = g
                opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"] if use_torch else opt.lr)
        return {"params": [p.detach() for p in params], "moments": [opt.state[p] for p in params], "lrs": lrs,
                "lr": lrs[-1], "schedule": sched.state_dict()}

    def same(a, b):
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a["moments"], b["moments"]) for k in x)
        assert a["lrs"] == b["lrs"] and a["schedule"] == b["schedule"]

    theirs, ours = train(True, 12), train(False, 12)
    same(theirs, ours)
    assert ours["lr"] == 3e-5 and ours["lrs"][0] < 3e-3 and not torch.equal(ours["params"][0], start[0])
    for first, then in ((True, False), (False, True)):
        resumed = train(then, 12, train(first, 6))
        assert resumed["lrs"] == ours["lrs"][6:]
        same(resumed | {"lrs": ours["lrs"]}, ours)
