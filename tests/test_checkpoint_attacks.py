"""Crafted checkpoints: the checksum is valid (the attacker recomputed it) but the
content is wrong. Each is refused in one line, exit 2, naming the file, before
anything is loaded or trained; and files that are not regular files are never read."""
import math
import os
from pathlib import Path

import pytest
import torch

from mogvae.storage.checkpoints import load_checkpoint, save_checkpoint
from mogvae.cli import main

CONFIG = """
preset = "mog-both"
seeds = 2
[model]
hidden = [8]
n_components = 3
[data]
n_train = 300
n_val = 50
n_test = 50
[train]
epochs = 4
[eval]
grid_size = 401
n_generated = 200
"""


@pytest.fixture
def interrupted_run(tmp_path, monkeypatch, capsys):
    """A run stopped (SIGINT at a chosen point) after epoch 3 of 4, left with one
    checkpoint, epoch 2's: the one each test tampers with."""
    config, out = tmp_path / "run.toml", tmp_path / "out"
    config.write_text(CONFIG)
    with monkeypatch.context() as m:
        m.setenv("MOGVAE_FAULT", "epoch:3:INT")
        assert main(["train", str(config), "--out", str(out)]) == 130
    (out / "checkpoints" / "epoch-000001.safetensors").unlink()
    capsys.readouterr()
    return config, out, out / "checkpoints" / "epoch-000002.safetensors"


def _pad_history(meta, epochs):
    h = meta["history"]
    while len(h["train_loss"]) < epochs:
        h["train_loss"].append(h["train_loss"][-1])
        h["val_elbo"].append(h["val_elbo"][-1])


def _set(tensors, name, fn):
    tensors[name] = fn(tensors[name].clone())


CRAFTED = {  # name -> (change to (tensors, meta), words the refusal must contain)
    "missing rng.1": (lambda t, m: t.pop("rng.1"), "rng.1"),
    "epoch as a string": (lambda t, m: m.update(epoch="2"), "epoch"),
    "epoch -3": (lambda t, m: m.update(epoch=-3), "epoch"),
    "epoch 99, padded history": (lambda t, m: (m.update(epoch=99, step=99 * 2), _pad_history(m, 99)), "epoch 99"),
    "history longer than epoch": (lambda t, m: _pad_history(m, 5), "history"),
    "step does not match": (lambda t, m: m.update(step=5), "step"),
    "extra tensor": (lambda t, m: t.update(evil=torch.zeros(3)), "evil"),
    "no Adam state": (lambda t, m: [t.pop(k) for k in [k for k in t if k.startswith("optim.")]], "optim."),
    "wrong shape": (lambda t, m: t.update({"model.prior.loc": torch.zeros(2, 4, 1)}), "model.prior.loc"),
    "float64 parameters": (lambda t, m: _set(t, "model.prior.loc", lambda v: v.double()), "float64"),
    "NaN parameters": (lambda t, m: _set(t, "model.prior.loc", lambda v: v.fill_(math.nan)), "non-finite"),
    "NaN Adam moment": (lambda t, m: _set(t, "optim.0.exp_avg", lambda v: v.fill_(math.nan)), "non-finite"),
    "infinite Adam moment": (lambda t, m: _set(t, "optim.1.exp_avg_sq", lambda v: v.fill_(math.inf)), "non-finite"),
    "negative second moment": (lambda t, m: _set(t, "optim.1.exp_avg_sq", lambda v: v.fill_(-1.0)), "negative"),
    "Adam step count": (lambda t, m: _set(t, "optim.0.step", lambda v: v.fill_(7.0)), "step count"),
    "NaN lr": (lambda t, m: m.update(lr=[math.nan]), "lr"),
    "infinite lr": (lambda t, m: m.update(lr=[math.inf]), "lr"),
    "huge lr": (lambda t, m: m.update(lr=[10.0]), "lr"),
    "NaN lr_factor": (lambda t, m: _set(t, "lr_factor", lambda v: v.fill_(math.nan)), "lr_factor"),
    "infinite lr_factor": (lambda t, m: _set(t, "lr_factor", lambda v: v.fill_(math.inf)), "lr_factor"),
    "active = 2": (lambda t, m: _set(t, "active", lambda v: v.fill_(2)), "active"),
    "negative retries": (lambda t, m: _set(t, "retries", lambda v: v.fill_(-1)), "retries"),
    "schedule elsewhere": (lambda t, m: m["schedule"].update(last_epoch=1), "schedule"),
    "schedule base lr": (lambda t, m: m["schedule"].update(base_lrs=[math.nan]), "schedule"),
    "unknown metadata key": (lambda t, m: m.update(surprise=1), "surprise"),
    "divergence list too short": (lambda t, m: m["history"].update(divergence=[None]), "divergence"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_checkpoint_with_a_valid_checksum_is_refused(interrupted_run, capsys, case):
    config, out, ckpt = interrupted_run
    tensors, meta = load_checkpoint(ckpt)
    change, words = CRAFTED[case]
    change(tensors, meta)
    save_checkpoint(ckpt, tensors, meta)                 # a fresh, valid checksum over the crafted content
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["train", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mogvae: error:") and ckpt.name in err[0], err
    assert words in err[0], err
    assert sorted(p.name for p in out.rglob("*")) == before   # nothing trained, nothing written


def test_metadata_that_is_a_list_is_refused(interrupted_run, capsys):
    config, out, ckpt = interrupted_run
    tensors, meta = load_checkpoint(ckpt)
    save_checkpoint(ckpt, tensors, [meta])
    assert main(["train", str(config), "--out", str(out)]) == 2
    assert "not an object" in capsys.readouterr().err


def _replace(ckpt: Path, kind: str, tmp_path: Path) -> None:
    ckpt.unlink()
    if kind == "symlink to /dev/zero":
        ckpt.symlink_to("/dev/zero")
    elif kind == "symlink to a valid checkpoint":
        copy = tmp_path / "elsewhere.safetensors"
        copy.write_bytes(b"")
        ckpt.symlink_to(copy)
    elif kind == "FIFO":
        os.mkfifo(ckpt)
    elif kind == "folder":
        ckpt.mkdir()
    elif kind == "larger than the run can hold":
        with open(ckpt, "wb") as fh:
            fh.truncate(3 * 2**30)                       # sparse: costs no disk, would cost 3 GiB to read


@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "symlink to a valid checkpoint", "FIFO", "folder",
                                  "larger than the run can hold"])
def test_what_is_not_a_regular_checkpoint_file_is_never_read(interrupted_run, capsys, tmp_path, kind):
    config, out, ckpt = interrupted_run
    _replace(ckpt, kind, tmp_path)
    assert main(["train", str(config), "--out", str(out)]) == 2  # returns at once: a FIFO would block a read
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ckpt.name in err[0], err
