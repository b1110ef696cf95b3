"""A user's folder is sacred: commands that write refuse folders holding anything
they did not write, and delete only files they name themselves. Each test runs
against a folder of someone else's files and checks every byte afterwards."""
import json
import os
from pathlib import Path

import pytest

from mogvae.cli import main
from mogvae.config.schema import ReproduceConfig
from mogvae.storage.folders import LOCK, MANIFEST, read_manifest
from mogvae.runs.reproduce import claim_output, output_layout

def users_files(root: Path) -> None:
    """What a user may keep in a folder: hidden files, *.tmp files (also ones shaped
    like mogvae's temporaries of names it does not own), subfolders, and stray
    files with the names mogvae writes."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "thesis.tex": "\\documentclass{article}", ".hidden": "secret", ".draft.tmp": "draft",
        "notes.tmp": "n", "src/model.py": "print(1)", "sub/.cache.tmp": "c", "config.json": '{"mine": true}',
        "metrics.csv": "a,b\n1,2\n", "history.jsonl": "{}\n", ".thesis.tex.abcdefgh.tmp": "looks like ours",
        "figures/plot.png": "png", "data/train.npy": "not numpy",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "empty_dir").mkdir(exist_ok=True)


def snapshot(root: Path) -> dict:
    """Every entry under root (hidden included), with bytes and mode."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[p.relative_to(root).as_posix()] = (st.st_mode, None if p.is_dir() else p.read_bytes())
    return out


def one_line_error(args, capsys) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mogvae: error:"), err
    return err[0]


@pytest.fixture
def user_folder(tmp_path):
    root = tmp_path / "mine"
    users_files(root)
    return root, snapshot(root)


@pytest.mark.parametrize("overwrite", [False, True])
def test_reproduce_never_touches_a_folder_of_user_files(user_folder, capsys, overwrite):
    root, before = user_folder
    err = one_line_error(["reproduce", "--quick", "--out", root, *(["--overwrite"] if overwrite else [])], capsys)
    assert "not a mogvae reproduce folder" in err
    assert snapshot(root) == before


def test_reproduce_refuses_the_current_directory_even_when_it_is_a_mogvae_output(tmp_path, capsys, monkeypatch):
    config = ReproduceConfig(models=("mfg",))
    claim_output(tmp_path, config, overwrite=False)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    err = one_line_error(["reproduce", "--quick", "--models", "mfg", "--out", ".", "--overwrite"], capsys)
    assert "current directory" in err
    err = one_line_error(["reproduce", "--quick", "--models", "mfg", "--out", tmp_path.parent, "--overwrite"], capsys)
    assert "not a mogvae reproduce folder" in err or "current directory" in err
    assert snapshot(tmp_path) == before


def test_reproduce_refuses_root_and_home(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for folder in ("/", str(Path.home())):
        before = sorted(os.listdir(folder))
        err = one_line_error(["reproduce", "--quick", "--out", folder, "--overwrite"], capsys)
        assert "--out" in err
        assert sorted(os.listdir(folder)) == before


def fake_reproduce_output(root: Path, models=("mfg",)) -> ReproduceConfig:
    """An earlier reproduce output: the manifest and every file it names."""
    config = ReproduceConfig(models=models)
    claim_output(root, config, overwrite=False)
    for name in output_layout(config).files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("old")
    return config


def test_overwrite_deletes_exactly_the_manifest_files(tmp_path):
    root = tmp_path / "out"
    config = fake_reproduce_output(root, models=("mfg", "mog-prior"))
    (root / "figures" / ".mfg.png.k2j4h5g6.tmp").write_text("a temporary of ours")
    claim_output(root, ReproduceConfig(models=("mfg",)), overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == [LOCK, MANIFEST]  # every old file, and its folders, gone
    assert read_manifest(root).files == output_layout(ReproduceConfig(models=("mfg",))).files
    assert config.models == ("mfg", "mog-prior")


@pytest.mark.parametrize("stranger", ["thesis.tex", ".hidden", "figures/mine.png", "runs/preset=mfg/notes.txt", "runs/preset=mfg/checkpoints/x.tmp",
                                      "data/.draft.tmp", "src/"])
def test_overwrite_refuses_an_output_holding_one_foreign_entry(tmp_path, capsys, stranger):
    root = tmp_path / "out"
    fake_reproduce_output(root)
    path = root / stranger
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if stranger.endswith("/") else path.write_text("user's")
    before = snapshot(root)
    err = one_line_error(["reproduce", "--quick", "--models", "mfg", "--out", root, "--overwrite"], capsys)
    assert "did not write" in err and stranger.rstrip("/") in err
    assert snapshot(root) == before


def test_a_crafted_manifest_naming_user_files_is_not_trusted(tmp_path, capsys):
    root = tmp_path / "out"
    root.mkdir()
    (root / "thesis.tex").write_text("years of work")
    (root / MANIFEST).write_text(json.dumps({"written_by": "mogvae", "kind": "reproduce", "files": ["thesis.tex"]}))
    before = snapshot(root)
    assert "not trusted" in one_line_error(["reproduce", "--quick", "--out", root, "--overwrite"], capsys)
    assert snapshot(root) == before


def test_train_refuses_a_folder_of_user_files_and_the_current_directory(user_folder, tiny, capsys, monkeypatch):
    root, before = user_folder
    config = tiny
    err = one_line_error(["train", config, "--out", root], capsys)
    assert "not a mogvae run folder" in err
    monkeypatch.chdir(root)
    err = one_line_error(["train", config, "--out", "."], capsys)
    assert "not a mogvae run folder" in err
    assert snapshot(root) == before


def test_train_refuses_an_existing_file_as_out(tiny, tmp_path, capsys):
    config, target = tiny, tmp_path / "results.txt"
    target.write_text("keep")
    assert "not a folder" in one_line_error(["train", config, "--out", target], capsys)
    assert target.read_text() == "keep"


def test_a_resumed_run_removes_only_its_own_temporaries_and_prunes_only_its_checkpoints(tiny, tmp_path, capsys):
    config, out = tiny, tmp_path / "out"
    assert main(["train", str(config), "--out", str(out)]) == 0
    (out / "status.json").unlink()                                       # not complete: the next run reopens it
    ours = [out / ".config.json.abcdefgh.tmp", out / "checkpoints" / ".epoch-000002.safetensors.a1b2c3d4.tmp"]
    theirs = [out / "notes.txt", out / ".draft.tmp", out / "sub" / ".cache.tmp", out / "checkpoints" / "mine.tmp",
              out / ".thesis.tex.abcdefgh.tmp", out / "checkpoints" / "epoch-notes.safetensors",
              out / "checkpoints" / "epoch-1.safetensors"]     # not our names: neither read, pruned nor deleted
    for p in ours + theirs:
        p.parent.mkdir(exist_ok=True)
        p.write_text("x")
    assert main(["train", str(config), "--out", str(out)]) == 0
    assert not any(p.exists() for p in ours)
    assert all(p.read_text() == "x" for p in theirs)
