"""User data files: refused before training with one line naming file and row; good ones train."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mogvae.cli import main
from mogvae.data.files import DataError, load_data_file
from mogvae.data.paper import PaperProcess

CONFIG = """
preset = "mfg"
seeds = 1
[model]
hidden = [8]
[data]
name = "file"
path = "{path}"
n_train = 150
n_val = 20
n_test = 30
[train]
epochs = 2
[eval]
grid_size = 401
n_generated = 200
"""


def run(tmp_path, data_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(path=data_path))
    code = main(["train", str(cfg), "--out", str(tmp_path / "out")])
    return code, capsys.readouterr().err.strip().splitlines()


GOOD = PaperProcess().sample(200, 0)[1]


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content, allow_pickle=True)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("name,content,needle", [
    ("nan.txt", "0.1\n0.2\nnan\n0.3\n", "row 3"),
    ("inf.csv", "0.1\n-inf\n", "row 2"),
    ("text.txt", "0.1\nhello\n", "row 2: not a number"),
    ("ragged.csv", "0.1,0.2\n0.3,0.4,0.5\n", "row 2: 3 values, but the first row has 2"),
    ("word_in_a_column.csv", "0.1,0.2\n0.3,abc\n", "row 2, column 2: not a number"),
    ("nan_in_a_column.csv", "0.1 0.2\n0.3 nan\n", "row 2: nan is not finite"),
    ("empty.txt", "", "no data"),
    ("comments_only.txt", "# nothing\n", "no data"),
    ("cube.npy", np.zeros((10, 3, 2)), "shape (10, 3, 2)"),
    ("wide.npy", np.zeros((10, 1001)), "shape (10, 1001)"),
    ("nan_column.npy", np.array([[0.1, 0.2], [0.3, np.nan]]), "row 2"),
    ("nan.npy", np.array([0.1, np.nan, 0.2]), "row 2"),
    ("strings.npy", np.array(["a", "b"]), "dtype"),
    ("short.txt", "\n".join(map(str, GOOD[:50])), "ask for 200"),
    ("huge.npy", np.array([0.1, 1e308, 0.2]), "row 2: 1e+308 is beyond"),
    ("big.txt", "0.1\n0.2\n1e30\n", "row 3: 1e+30 is beyond"),
    ("zero_bytes.npy", b"", "not a readable .npy"),
    ("nul_bytes.csv", b"\0" * 20_000, "row 1: longer than"),
])
def test_bad_data_files_are_refused_before_training(tmp_path, capsys, name, content, needle):
    path = write(tmp_path, name, content)
    code, err = run(tmp_path, path, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("mogvae: error:"), err
    assert name in err[0] and needle in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_pickled_npy_is_refused_without_unpickling(tmp_path, capsys):
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))
    path = tmp_path / "evil.npy"
    np.save(path, np.array([Exploit()], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="evil.npy"):
        load_data_file(path)
    assert not sentinel.exists()


def test_a_good_file_trains_and_reports_unknown_truth(tmp_path, capsys):
    path = tmp_path / "y.csv"
    path.write_text("# y values\n" + "\n".join(f"{float(v)!r}," for v in GOOD))
    code, err = run(tmp_path, path, capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    assert np.isfinite(float(rows[0]["test_log_likelihood"]))
    assert np.isnan(float(rows[0]["kl_to_truth"]))           # no truth for a user's data
    np.testing.assert_array_equal(np.sort(np.concatenate(
        [np.load(tmp_path / "out" / "data" / f"{s}.npy") for s in ("train", "val", "test")])), np.sort(GOOD))


def _special(tmp_path, kind):
    path = tmp_path / f"{kind}.csv"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)                       # reading would block forever
    elif kind == "oversized":
        with open(path, "wb") as fh:
            fh.truncate(2 * 2**30)            # sparse: refused by its size, never read
    return path


@pytest.mark.parametrize("kind,needle", [("folder", "is a folder"), ("fifo", "not a regular file"),
                                         ("oversized", "limited to")])
def test_what_is_not_a_data_file_is_named_as_such_and_never_read(tmp_path, capsys, kind, needle):
    code, err = run(tmp_path, _special(tmp_path, kind), capsys)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_device_is_not_a_data_file(tmp_path, capsys):
    code, err = run(tmp_path, "/dev/zero", capsys)
    assert code == 2 and "not a regular file" in err[0], err


def test_a_relative_data_path_is_found_beside_the_configuration_file(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "y.csv").write_text("\n".join(map(str, GOOD)))
    (folder / "c.toml").write_text(CONFIG.format(path="y.csv"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                    # the cwd has no y.csv
    assert main(["train", str(folder / "c.toml"), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    used = json.loads((tmp_path / "out" / "config.json").read_text())["data"]["path"]
    assert Path(used) == folder / "y.csv"


def test_a_file_splits_by_fractions_unless_counts_are_set(tmp_path):
    """Issue 22's case, 7,500 rows of 2-D data: no counts needed. Unset, the splits are the two fractions
    (0.15, 0.2) and the rest, a seeded shuffle of every row; set (as every run written before fractions
    existed did), they are exactly the old cut: the first n_train, n_val, n_test rows of the same shuffle."""
    from mogvae.data.files import FileSource, load_file
    y = np.random.default_rng(3).normal(size=(7500, 2))
    path = tmp_path / "ring.npy"
    np.save(path, y)
    splits = load_file(FileSource(path=str(path), seed=4)).splits
    assert {k: len(v) for k, v in splits.items()} == {"train": 7500 - 1125 - 1500, "val": 1125, "test": 1500}
    together = np.concatenate([splits[k] for k in ("train", "val", "test")])
    np.testing.assert_array_equal(np.sort(together, 0), np.sort(y, 0))                  # every row once
    counted = load_file(FileSource(path=str(path), seed=4, n_train=5000, n_val=300, n_test=700)).splits
    order = np.random.default_rng(4).permutation(7500)                                  # the old cut, by hand
    for name, (a, b) in {"train": (0, 5000), "val": (5000, 5300), "test": (5300, 6000)}.items():
        np.testing.assert_array_equal(counted[name], y[order[a:b]])
    with pytest.raises(DataError, match="leave them unset to split every row"):
        load_file(FileSource(path=str(path), n_train=7000))
    with pytest.raises(DataError, match="leave the val split empty"):
        np.save(path, y[:3])
        load_file(FileSource(path=str(path)))


def test_a_file_run_begun_with_counts_resumes_from_a_configuration_without_them(tmp_path, capsys):
    """A run written before fractions existed recorded all three counts (they were required); its
    configuration file, which never set them, still resumes it: on the same cut, not a refusal."""
    data = tmp_path / "y.npy"
    np.save(data, GOOD)
    with_counts = tmp_path / "old.toml"
    with_counts.write_text(CONFIG.format(path=data))
    out = tmp_path / "out"
    assert main(["train", str(with_counts), "--out", str(out), "--set", "train.epochs=1"]) == 0
    saved = json.loads((out / "config.json").read_text())
    for key in ("val_fraction", "test_fraction"):              # what the earlier version wrote
        del saved["data"][key]
    (out / "config.json").write_text(json.dumps(saved))
    without = tmp_path / "new.toml"
    without.write_text(CONFIG.format(path=data).replace("n_train = 150\nn_val = 20\nn_test = 30\n", ""))
    capsys.readouterr()
    assert main(["train", str(without), "--out", str(out), "--set", "train.epochs=1"]) == 0
    assert "run complete" in capsys.readouterr().err
    fresh = tmp_path / "fresh"                                 # a new folder splits by the fractions
    assert main(["train", str(without), "--out", str(fresh), "--set", "train.epochs=1"]) == 0
    assert len(np.load(fresh / "data" / "test.npy")) == round(0.2 * len(GOOD))
