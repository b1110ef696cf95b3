"""train.compile: the compiled loss trains the same model to float32 rounding, resumes bitwise,
falls back to eager in one line when compiling fails, and `auto` compiles only long CPU jobs."""
import pytest
import torch

import mogvae.training.compiled as compiled
from mogvae.config.schema import TrainConfig, preset
from mogvae.data.paper import PaperProcess, make_splits
from mogvae.model.vae import build_model
from mogvae.model.layers import initialize
from mogvae.training.trainer import Trainer

DATA = make_splits(PaperProcess(), {"train": 250, "val": 50}, 0)   # 100, 100, 50: a ragged last batch
SEEDS = [5, 6]


def trainer(compile_setting: str, epochs: int = 2) -> Trainer:
    model = build_model(preset("mog-posterior", hidden=(8, 8), n_components=3), replicas=len(SEEDS))
    gens = initialize(model, SEEDS)
    config = TrainConfig(epochs=epochs, batch_size=100, compile=compile_setting)
    return Trainer(model, DATA["train"], DATA["val"], config, SEEDS, gens)


def parameters(t: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.model.parameters()]


@pytest.fixture(scope="module")
def compiled_two_epochs():
    t = trainer("on")
    assert isinstance(t.loss, compiled.CompiledLoss)
    t.run_epoch()
    tensors, meta = t.state()
    tensors = {k: v.clone() for k, v in tensors.items()}   # state() shares storage with the live trainer
    t.run_epoch()
    return parameters(t), t.history, (tensors, meta)


def test_compiled_training_matches_eager_to_rounding(compiled_two_epochs):
    eager = trainer("off")
    assert not isinstance(eager.loss, compiled.CompiledLoss)
    eager.run_epoch()
    eager.run_epoch()
    params, history, _ = compiled_two_epochs
    for a, b in zip(params, parameters(eager)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)     # 20 Adam steps of a few 1e-7 each
    for a, b in zip(history.val_elbo[-1], eager.history.val_elbo[-1]):
        assert abs(a - b) < 1e-4


def test_a_compiled_run_resumes_bitwise(compiled_two_epochs):
    params, history, (tensors, meta) = compiled_two_epochs
    resumed = trainer("on")
    resumed.load_state(tensors, meta)
    resumed.run_epoch()
    for a, b in zip(params, parameters(resumed)):
        assert torch.equal(a, b)
    assert resumed.history.val_elbo == history.val_elbo


def test_a_resumed_run_keeps_what_auto_chose_when_it_began(monkeypatch):
    """A checkpoint records what train.compile = auto chose; a version whose rule would choose otherwise
    (here: auto's cold compile made 1e9 s dear, then free) resumes the run as it began, bitwise. A
    checkpoint from before the choice was recorded follows the rule of those versions (a saving of 60 s),
    not today's."""
    monkeypatch.setattr(compiled, "COMPILE_COST", 1e9)
    eager = trainer("auto")
    assert eager.compiled is False
    eager.run_epoch()
    tensors, meta = eager.state()
    tensors = {k: v.clone() for k, v in tensors.items()}
    assert meta["compiled"] is False
    eager.run_epoch()
    monkeypatch.setattr(compiled, "COMPILE_COST", 0.0)
    resumed = trainer("auto")
    assert resumed.compiled is True          # this rule would compile a new run
    resumed.load_state(tensors, meta)
    assert resumed.compiled is False and not isinstance(resumed.loss, compiled.CompiledLoss)
    resumed.run_epoch()
    for a, b in zip(parameters(eager), parameters(resumed)):
        assert torch.equal(a, b)
    older = {k: v for k, v in meta.items() if k != "compiled"}    # a checkpoint from before it was recorded
    fresh = trainer("auto")
    assert fresh.compiled is True
    fresh.load_state(tensors, older)
    assert fresh.compiled is False           # this toy job saves far less than 60 s


def test_a_failing_compile_says_so_once_and_trains_eagerly(monkeypatch, capsys):
    def broken(fn, **_):
        def call(*args):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return call
    monkeypatch.setattr(compiled.torch, "compile", broken)
    t, eager = trainer("on", epochs=1), trainer("off", epochs=1)
    t.run_epoch()
    eager.run_epoch()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mogvae: torch.compile failed (RuntimeError: no C++ compiler found); training eagerly"]
    for a, b in zip(parameters(t), parameters(eager)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("setting, device, objective, steps, points, expected", [
    ("off", "cpu", "elbo", 10**9, 10**6, False),
    ("on", "cpu", "elbo", 1, 1, True),
    ("on", "cpu", "exact", 10**9, 10**6, False),               # the oracle's quadrature is never compiled
    ("auto", "cpu", "elbo", 8000, 5 * 10 * 256, True),          # reproduce's mixture posterior: 31 s to save
    ("auto", "cpu", "elbo", 8000, 5 * 1 * 256, False),          # its Gaussian posteriors: 3 s
    ("auto", "cpu", "elbo", 8000, 10 * 10 * 256, True),         # the noise study's, R = 10: 61 s
    ("auto", "cuda", "elbo", 10**9, 10**6, False),
    ("auto", "cpu", "iwae", 10**9, 10**6, True),
])
def test_auto_compiles_only_what_repays_the_compile(setting, device, objective, steps, points, expected):
    assert compiled.should_compile(setting, device, objective, steps, points) is expected
