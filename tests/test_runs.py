"""`mogvae train`: checkpoints, refusals, safe loading (kills and resumes: test_faults.py)."""
import os
import pickle
from pathlib import Path

import pytest
import torch

from mogvae.storage.checkpoints import CheckpointError, load_checkpoint
from mogvae.cli import main
from mogvae.runs.run import RunDir

SMALL = """
preset = "mog-both"
seeds = 2
checkpoint_every = 1
[model]
hidden = [16, 16]
n_components = 3
[data]
n_train = 2000
n_val = 200
n_test = 500
[train]
epochs = {epochs}
[eval]
grid_size = 801
n_generated = 1000
gap_points = 20
gap_steps = 50
"""


def write_config(tmp_path, epochs=30) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(SMALL.format(epochs=epochs))
    return path


def one_line_error(args, capsys) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("mogvae: error:") and "Traceback" not in err[0], err
    return err[0]


def short_run(tmp_path, capsys, monkeypatch) -> tuple[Path, Path]:
    """A run interrupted (SIGINT, at a chosen point) after epoch 3 of 4, before that
    epoch's checkpoint: checkpoints of epochs 1 and 2 remain, and a re-run resumes."""
    config, out = write_config(tmp_path, epochs=4), tmp_path / "out"
    with monkeypatch.context() as m:
        m.setenv("MOGVAE_FAULT", "epoch:3:INT")
        assert main(["train", str(config), "--out", str(out)]) == 130
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "epoch-000001.safetensors", "epoch-000002.safetensors"]
    capsys.readouterr()
    return config, out


def test_resume_with_another_configuration_is_refused_naming_fields(tmp_path, capsys, monkeypatch):
    config, out = short_run(tmp_path, capsys, monkeypatch)
    err = one_line_error(["train", config, "--out", out, "--set", "train.lr=0.01", "--set", "seeds=3"], capsys)
    assert "train.lr" in err and "seeds" in err


def test_a_second_process_on_the_same_folder_is_refused(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path)
    holder = RunDir(tmp_path / "out")
    holder.lock()
    assert "in use" in one_line_error(["train", config, "--out", tmp_path / "out"], capsys)


class Exploit:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def only_checkpoint(out: Path) -> Path:
    ckpts = sorted((out / "checkpoints").glob("*.safetensors"))
    for c in ckpts[:-1]:
        c.unlink()
    return ckpts[-1]


def test_a_malicious_pickle_checkpoint_is_refused_without_running(tmp_path, capsys, monkeypatch):
    config, out = short_run(tmp_path, capsys, monkeypatch)
    sentinel = tmp_path / "pwned"
    ckpt = only_checkpoint(out)
    ckpt.write_bytes(pickle.dumps({"state": Exploit(sentinel)}))
    torch.save({"x": Exploit(sentinel)}, ckpt.with_name("epoch-000099.safetensors"))  # torch's zip-pickle format too
    os.remove(ckpt)
    assert "not a valid mogvae checkpoint" in one_line_error(["train", config, "--out", out], capsys)
    assert not sentinel.exists()


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "empty", "header"])
def test_damaged_checkpoints_give_a_clean_one_line_error(tmp_path, capsys, monkeypatch, damage):
    config, out = short_run(tmp_path, capsys, monkeypatch)
    ckpt = only_checkpoint(out)
    data = bytearray(ckpt.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "bitflip":
        data[-7] ^= 0x10                  # inside the tensor payload: only the checksum can tell
    elif damage == "empty":
        data = bytearray()
    else:
        data[10] ^= 0xFF                  # inside the JSON header
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)
    err = one_line_error(["train", config, "--out", out], capsys)
    assert str(ckpt.name) in err


def test_an_older_valid_checkpoint_is_used_when_the_newest_is_damaged(tmp_path, capsys, monkeypatch):
    config, out = short_run(tmp_path, capsys, monkeypatch)
    newest = sorted((out / "checkpoints").glob("*.safetensors"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    assert main(["train", str(config), "--out", str(out)]) == 0
    assert "skipping" in capsys.readouterr().err


def test_the_package_never_unpickles():
    src = Path(__file__).parents[1] / "src" / "mogvae"
    for path in src.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            assert "pickle.load" not in code, f"{path}:{n}"
            if "torch.load(" in code:
                assert "weights_only=True" in code, f"{path}:{n}"
            assert "allow_pickle=True" not in code, f"{path}:{n}"


def test_checkpoints_carry_the_config_hash_and_versions(tmp_path, capsys, monkeypatch):
    config, out = short_run(tmp_path, capsys, monkeypatch)
    _, meta = load_checkpoint(sorted((out / "checkpoints").glob("*.safetensors"))[-1])
    assert len(meta["config_sha256"]) == 64 and meta["versions"]["torch"] == torch.__version__
    assert {"epoch", "step", "history", "lr", "schedule"} <= set(meta)


def test_the_documented_example_configuration_is_valid():
    from mogvae.runs.run import load_run_config
    config = load_run_config(Path(__file__).parents[1] / "examples" / "run.toml", ["train.epochs=3"])
    assert config.preset == "mog-prior" and config.train.on_divergence == "rollback" and config.train.epochs == 3


def test_a_session_that_fails_after_taking_the_lock_gives_it_back(tmp_path, monkeypatch):
    """Any failure while opening (here, building the trainer) releases the folder: the same process,
    still holding the exception (a notebook's last traceback), can open the run again."""
    import mogvae.runs.run as run_module
    from mogvae.runs.run import RunSession, load_run_config
    config = load_run_config(write_config(tmp_path, epochs=1), [])
    real = run_module.Trainer

    def broken(*a, **k):
        raise RuntimeError("no trainer")
    monkeypatch.setattr(run_module, "Trainer", broken)
    with pytest.raises(RuntimeError) as held:
        RunSession(config, tmp_path / "out", log=lambda m: None)
    monkeypatch.setattr(run_module, "Trainer", real)
    session = RunSession(config, tmp_path / "out", log=lambda m: None)   # not "in use by another mogvae process"
    assert held.value is not None and session.trainer.epoch == 0


def test_a_preset_and_a_model_family_that_contradicts_it_are_refused_in_one_line(tmp_path, capsys):
    """preset = "mog-both" with model.posterior = "flow" trained a mixture posterior while config.json said
    flow: now refused before anything is written, naming both; the preset's own value beside it is fine."""
    out = tmp_path / "out"
    config = str(write_config(tmp_path, epochs=1))
    assert main(["train", config, "--out", str(out), "--set", "model.posterior=flow"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.posterior = 'flow'" in err and "'mog-both'" in err, err
    assert not out.exists()
    assert main(["train", config, "--out", str(out), "--set", "model.posterior=mog"]) == 0


def test_config_json_says_which_model_a_preset_trained(tmp_path):
    """config.json keeps the configuration as given (preset plus its [model] defaults, what a resume
    compares) and says beside it what ran: the preset's resolved prior, posterior and sizes (issue 22)."""
    import json

    from mogvae.config.schema import PRESETS
    out = tmp_path / "out"
    assert main(["train", str(write_config(tmp_path, epochs=1)), "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["preset"] == "mog-both" and saved["model"]["prior"] == "normal"       # as given: the default
    assert {k: saved["resolved_model"][k] for k in PRESETS["mog-both"]} == PRESETS["mog-both"]
    assert saved["resolved_model"]["n_components"] == 3                               # SMALL's own size
    assert main(["train", str(write_config(tmp_path, epochs=1)), "--out", str(out)]) == 0   # it still resumes
