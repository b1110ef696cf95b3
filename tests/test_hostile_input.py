"""Hostile and careless input stays inert: names that reach a report render as text
and run nothing, a run never trains on other data than it started on, sizes are
bounded before work starts, a folder's own files are read as carefully as
checkpoints, and a user's mistake is one line, never "a bug"."""
import base64
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_TOML
from mogvae.cli import main
from mogvae.data.paper import PaperProcess

TINY = TINY_TOML.replace("epochs = 3", "epochs = 2")
# Payloads for every string that reaches a report: a spec's file name (no "/" in a file name),
# a grid value (a data file's path: its folders carry the slashes), and what a saved file says.
NAME_PAYLOAD = "<img src=x onerror=document.title='pwned1'><svg onload=document.title='pwned2'>"
PATH_PAYLOAD = "<script>document.title='pwned3'</script>![leak](../../outside.png)[go](javascript:alert(1))"
OUTSIDE_PNG = b"\x89PNG\r\n\x1a\n someone else's picture"    # a file beside the folder, never embedded
SAVED_PAYLOAD = "<img src='http://example.invalid/beacon.png' onerror=\"document.title='pwned4'\">|**x**"


def one_line(capsys) -> list[str]:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mogvae: error:") and "bug" not in err[0], err
    return err


def write_data(path: Path, seed: int = 0, n: int = 400) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _, y = PaperProcess(0.1).sample(n, seed)
    path.write_text("\n".join(f"{v:.6f}" for v in y))
    return path


# --- 1. report.html runs no script ------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile_sweep(tmp_path_factory):
    """A finished sweep whose spec's file name and grid values are payloads; then its saved
    sweep.json and metrics.csv are edited to hold one too, and the report is rebuilt from them."""
    tmp = tmp_path_factory.mktemp("hostile")
    folder = tmp / "project"
    write_data(folder / PATH_PAYLOAD, 0)
    write_data(folder / "plain.csv", 1)
    (tmp.parent / "outside.png").write_bytes(OUTSIDE_PNG)    # where out/../../outside.png points
    spec = folder / f"{NAME_PAYLOAD}.toml"
    spec.write_text(TINY.replace("[data]\n", '[data]\nname = "file"\npath = "plain.csv"\n')
                    + f'\n[grid]\n"data.path" = [{json.dumps(PATH_PAYLOAD)}, "plain.csv"]\n')
    out = tmp / "out"
    proc = subprocess.run([sys.executable, "-m", "mogvae.cli", "sweep", str(spec), "--out", str(out), "--workers", "1"],
                          capture_output=True, text=True, timeout=300, cwd=folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first_html = (out / "report.html").read_text()
    record = json.loads((out / "sweep.json").read_text())
    record["title"] = SAVED_PAYLOAD
    record["cells"][0]["values"]["data.path"] = SAVED_PAYLOAD
    (out / "sweep.json").write_text(json.dumps(record))
    rows = list(csv.DictReader(open(out / "metrics.csv", newline="")))
    for row in rows:
        row["model"] = SAVED_PAYLOAD
    with open(out / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["report", str(out)]) == 0
    return out, first_html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium; .ci/run installs it)")
@pytest.mark.parametrize("which", ["as the sweep wrote it", "rebuilt from edited saved files"])
def test_a_report_built_from_hostile_names_runs_no_script_and_requests_nothing(hostile_sweep, tmp_path, which):
    sync_api = pytest.importorskip("playwright.sync_api")
    out, first_html = hostile_sweep
    page_path = out / "report.html"
    if which == "as the sweep wrote it":
        page_path = tmp_path / "report.html"       # beside a figures/ link, as in the sweep folder
        page_path.write_text(first_html)
        (tmp_path / "figures").symlink_to(out / "figures")
    requests, dialogs = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        page.wait_for_timeout(300)                 # an onerror handler would have fired by now
        title = page.title()
        scripts = page.evaluate("() => document.scripts.length")
        handlers = page.evaluate("() => Array.from(document.querySelectorAll('*')).flatMap(e => "
                                 "Array.from(e.attributes).map(a => a.name)).filter(n => n.startsWith('on'))")
        sources = page.evaluate("() => Array.from(document.images).map(i => i.getAttribute('src').slice(0, 22))")
        hrefs = page.evaluate("() => Array.from(document.links).map(a => a.getAttribute('href'))")
        text = page.inner_text("body")
        browser.close()
    assert base64.b64encode(OUTSIDE_PNG).decode()[:24] not in page_path.read_text()   # not embedded either
    rebuilt = which != "as the sweep wrote it"
    assert title == (SAVED_PAYLOAD if rebuilt else f"mogvae sweep: {NAME_PAYLOAD}.toml"), title   # not 'pwnedN'
    assert scripts == 0 and handlers == [] and dialogs == []
    assert all(s == "data:image/png;base64," for s in sources), sources
    assert all(h.startswith("figures/") and h.endswith(".csv") for h in hrefs), hrefs
    assert requests == [page_path.as_uri()], requests           # nothing fetched, from the folder or beyond
    payload = SAVED_PAYLOAD if rebuilt else PATH_PAYLOAD
    assert payload in text                                       # shown as exactly its characters


def test_the_page_forbids_script_and_embeds_only_its_own_figures(tmp_path):
    from mogvae.report.html import render
    (tmp_path / "figures").mkdir()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(1, 1))
    fig.savefig(tmp_path / "outside.png")
    fig.savefig(tmp_path / "figures" / "mine.png")
    plt.close(fig)
    (tmp_path / "figures" / "linked.png").symlink_to(tmp_path / "outside.png")
    page = render("![a](figures/mine.png)\n\n![b](outside.png)\n\n![c](figures/../outside.png)\n\n"
                  "![d](figures/linked.png)\n\n![e](/etc/hostname)\n\n<script>alert(1)</script>", tmp_path, "t")
    assert page.count("data:image/png;base64,") == 1 and "<script>" not in page
    assert "script-src 'none'" in page and "default-src 'none'" in page and "img-src data:" in page


# --- 2. a resumed run trains on the data it started on ---------------------------------------------

def _file_config(tmp_path: Path, path: str = "y.csv") -> Path:
    config = tmp_path / "run.toml"
    config.write_text(TINY.replace("[data]\n", f'[data]\nname = "file"\npath = "{path}"\n')
                      .replace("epochs = 2", "epochs = 3"))
    return config


def test_a_relative_set_path_is_recorded_absolute_and_a_resume_elsewhere_is_refused(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_data(a / "y.csv", 0)
    write_data(b / "y.csv", 1)                                   # same relative name, other data
    config = _file_config(tmp_path, "unused.csv")
    out = tmp_path / "out"
    monkeypatch.chdir(a)
    monkeypatch.setenv("MOGVAE_FAULT", "epoch:1:TERM")
    assert main(["train", str(config), "--out", str(out), "--set", "data.path=y.csv"]) == 143
    monkeypatch.delenv("MOGVAE_FAULT")
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["path"] == str(a / "y.csv") == saved["data_record"]["path"]
    capsys.readouterr()
    monkeypatch.chdir(b)
    assert main(["train", str(config), "--out", str(out), "--set", "data.path=y.csv"]) == 2
    err = one_line(capsys)
    assert str(a / "y.csv") in err[0] and str(b / "y.csv") in err[0]
    monkeypatch.chdir(a)                                         # from its own folder it resumes
    assert main(["train", str(config), "--out", str(out), "--set", "data.path=y.csv"]) == 0


def test_a_resume_whose_data_changed_in_content_is_refused_naming_the_file(tmp_path, monkeypatch, capsys):
    data = write_data(tmp_path / "y.csv", 0)
    config, out = _file_config(tmp_path), tmp_path / "out"
    monkeypatch.setenv("MOGVAE_FAULT", "epoch:1:TERM")
    assert main(["train", str(config), "--out", str(out)]) == 143
    monkeypatch.delenv("MOGVAE_FAULT")
    record = json.loads((out / "config.json").read_text())["data_record"]
    splits = {s: np.load(out / "data" / f"{s}.npy") for s in ("train", "val", "test")}
    h = hashlib.sha256()                                        # independently: the saved splits' values
    for s in ("train", "val", "test"):
        h.update(f"{s}{splits[s].shape}".encode() + np.ascontiguousarray(splits[s], np.float64).tobytes())
    assert record == {"source": "file", "path": str(data), "sha256": h.hexdigest()}
    write_data(data, 1)                                          # the file edited in place
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(out)]) == 2
    err = one_line(capsys)
    assert str(data) in err[0] and "other data" in err[0]


def test_a_grid_path_is_read_from_the_spec_folder_like_the_specs_own(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    write_data(project / "y.csv", 0)
    spec = project / "spec.toml"
    spec.write_text(TINY.replace("[data]\n", '[data]\nname = "file"\npath = "y.csv"\n')
                    + '\n[grid]\n"data.path" = ["y.csv"]\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                                 # no y.csv here
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0, capsys.readouterr().err
    cell = json.loads((tmp_path / "out" / "sweep.json").read_text())["cells"][0]
    assert cell["config"]["data"]["path"] == str(project / "y.csv") and cell["values"]["data.path"] == "y.csv"


# --- 3. sizes bounded before work starts ------------------------------------------------------------

def test_a_grid_above_the_cell_limit_is_refused_before_anything_is_written(tmp_path, capsys):
    from mogvae.runs.sweep import MAX_CELLS
    spec = tmp_path / "spec.toml"
    side = int(MAX_CELLS ** 0.5) + 1
    spec.write_text(TINY + f"\n[grid]\n\"train.lr\" = {[round(1e-4 * (i + 1), 6) for i in range(side)]}\n"
                    f"\"data.seed\" = {list(range(side))}\n")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert f"{side * side:,} cells" in one_line(capsys)[0]
    assert not (tmp_path / "out").exists()


def test_cell_names_too_long_for_the_file_system_are_refused_before_sweep_json(tmp_path, capsys):
    """A name of 243 bytes makes its run folder, but not its figure's atomic temporary
    (.NAME.png.XXXXXXXX.tmp, 261 bytes): today that fails after every run trained."""
    from mogvae.runs.sweep import cell_name
    values = {"train.lr": 0.00123456789012345, "train.final_lr_factor": 0.0123456789012345,
              "data.sigma": 0.123456789012345, "model.hidden": [1000, 1000, 1000, 1000, 8, 8, 8, 8],
              "eval.grid_span": 8.12345678901234, "train.batch_size": 255, "data.seed": 1234567890123456789,
              "train.n_samples": 1}
    assert 237 < len(cell_name(values)) <= 255
    spec = tmp_path / "spec.toml"
    spec.write_text(TINY + "\n[grid]\n" + "".join(f'"{k}" = [{json.dumps(v)}]\n' for k, v in values.items()))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert "255-byte" in one_line(capsys)[0]
    assert not (tmp_path / "out").exists()


# --- 4. a sweep folder's own files are read as carefully as checkpoints ----------------------------

SWEEP = TINY + '\n[grid]\npreset = ["mfg", "mog-prior"]\n'


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    (tmp / "spec.toml").write_text(SWEEP)
    assert main(["sweep", str(tmp / "spec.toml"), "--out", str(tmp / "out"), "--workers", "1"]) == 0
    return tmp / "spec.toml", tmp / "out"


def _copy(finished_sweep, tmp_path) -> tuple[Path, Path]:
    spec, out = finished_sweep
    shutil.copytree(out, tmp_path / "out", symlinks=True)
    return spec, tmp_path / "out"


FIRST_RUN = "runs/preset=mfg"


REPORT, RERUN = "report", "sweep re-run"
READ_BACK = [("metrics.csv", "fifo", REPORT), (f"{FIRST_RUN}/history.jsonl", "link to /dev/zero", REPORT),
             (f"{FIRST_RUN}/curves.npz", "fifo", REPORT), ("sweep.json", "fifo", REPORT),
             (f"{FIRST_RUN}/status.json", "fifo", RERUN), ("sweep.json", "link to /dev/zero", RERUN)]


@pytest.mark.parametrize("file, kind, command", READ_BACK)
def test_a_fifo_or_endless_link_in_place_of_a_folders_file_is_refused_in_one_line(finished_sweep, tmp_path, file,
                                                                                  kind, command):
    """Each file in place of which a FIFO (blocks forever) or a link to /dev/zero (never ends)
    made the command that reads it back hang or exhaust memory."""
    spec, out = _copy(finished_sweep, tmp_path)
    (out / file).unlink()
    os.mkfifo(out / file) if kind == "fifo" else (out / file).symlink_to("/dev/zero")
    args = ["report", str(out)] if command == REPORT else ["sweep", str(spec), "--out", str(out), "--workers", "1"]
    proc = subprocess.run([sys.executable, "-m", "mogvae.cli", *args], capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mogvae: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert file.split("/")[-1] in errors[0] and "bug" not in errors[0], errors


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_a_runs_metrics_that_are_not_a_file_are_evaluated_anew_never_read(finished_sweep, tmp_path, capsys, kind):
    """A run is finished when its metrics.csv is a regular file: in place of a FIFO or a link the
    re-run evaluates it again from its last checkpoint and replaces the entry (never writes through it)."""
    spec, out = _copy(finished_sweep, tmp_path)
    metrics = out / FIRST_RUN / "metrics.csv"
    expected = metrics.read_text()
    metrics.unlink()
    os.mkfifo(metrics) if kind == "fifo" else metrics.symlink_to("/dev/zero")
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1"]) == 0, capsys.readouterr().err
    assert not metrics.is_symlink() and metrics.is_file()
    assert [r.split(",")[:-1] for r in metrics.read_text().splitlines()] == \
        [r.split(",")[:-1] for r in expected.splitlines()]          # the same numbers but the wall time


@pytest.mark.parametrize("damage", ["truncated", "cells not a list", "a name that climbs out", "nested deep"])
def test_a_damaged_sweep_json_is_refused_in_one_line(finished_sweep, tmp_path, capsys, damage):
    spec, out = _copy(finished_sweep, tmp_path)
    text = (out / "sweep.json").read_text()
    record = json.loads(text)
    if damage == "truncated":
        text = text[:len(text) // 2]
    elif damage == "cells not a list":
        text = json.dumps({**record, "cells": 5})
    elif damage == "a name that climbs out":
        record["cells"][0]["name"] = "../../../elsewhere"
        text = json.dumps(record)
    else:
        text = "[" * 200_000 + "]" * 200_000
    (out / "sweep.json").write_text(text)
    for command in (["report", str(out)], ["sweep", str(spec), "--out", str(out), "--workers", "1"]):
        assert main(command) == 2, command
        assert "sweep.json" in one_line(capsys)[0]
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("damage", ["no run column", "ragged row", "text for a number"])
def test_a_damaged_metrics_csv_is_refused_in_one_line_and_a_rerun_rebuilds_it(finished_sweep, tmp_path, capsys,
                                                                              damage):
    spec, out = _copy(finished_sweep, tmp_path)
    lines = (out / "metrics.csv").read_text().splitlines()
    if damage == "no run column":
        lines[0] = lines[0].replace("run,", "RUN,")
    elif damage == "ragged row":
        lines[1] += ",extra"
    else:
        lines[1] = lines[1].replace("False", "False", 1).rsplit(",", 1)[0] + ",fast"
    (out / "metrics.csv").write_text("\n".join(lines) + "\n")
    assert main(["report", str(out)]) == 2
    assert "metrics.csv" in one_line(capsys)[0]
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1"]) == 0   # gathered anew from the runs
    assert main(["report", str(out)]) == 0


# --- 5. a user's mistake is one line, exit 2, before any folder --------------------------------------

@pytest.mark.parametrize("device", ["tpu", "meta", "", "cuda", "cuda:7"])
def test_a_sweep_on_a_device_this_machine_lacks_is_refused_before_its_folder(tmp_path, capsys, device):
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    spec = tmp_path / "spec.toml"
    spec.write_text(SWEEP.replace("[train]\n", f'[train]\ndevice = "{device}"\n'))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert "train.device" in one_line(capsys)[0]
    assert not (tmp_path / "out").exists()


def test_tabular_fractions_that_empty_a_split_are_refused_without_warnings(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(TINY.replace("[data]\n", '[data]\nname = "tabular"\nval_fraction = 0.4999\n'
                                               'test_fraction = 0.4999\n'))
    proc = subprocess.run([sys.executable, "-W", "default", "-m", "mogvae.cli", "train", str(config), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "data.val_fraction" in err[0], err
    assert not (tmp_path / "out").exists()


def test_report_on_a_full_disk_names_the_folder(finished_sweep, tmp_path, capsys, monkeypatch):
    import errno

    import mogvae.report.sweep
    _, out = _copy(finished_sweep, tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(mogvae.report.sweep, "write_text", full)
    assert main(["report", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no space left on the device (writing {out})" in err[0], err


def test_report_while_the_sweep_runs_is_refused_and_an_unfinished_sweep_reports_what_finished(
        finished_sweep, tmp_path, capsys):
    from mogvae.runs.sweep import SweepDir
    _, out = _copy(finished_sweep, tmp_path)
    holder = SweepDir(out)                                          # a sweep (or --extend) running
    assert main(["report", str(out)]) == 2
    assert "in use by another mogvae sweep" in one_line(capsys)[0]
    del holder
    record = json.loads((out / "sweep.json").read_text())
    record["cells"].append({**record["cells"][0], "name": "preset=mog-both", "values": {"preset": "mog-both"}})
    (out / "sweep.json").write_text(json.dumps(record))              # as --extend records before training
    assert main(["report", str(out)]) == 0
    assert "1 of 3 runs have not finished" in (out / "report.md").read_text()


def test_a_checkpoint_header_nested_200k_deep_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load, save

    from mogvae.storage.checkpoints import _digest
    config = tmp_path / "run.toml"
    config.write_text(TINY.replace("epochs = 2", "epochs = 3"))
    out = tmp_path / "out"
    monkeypatch.setenv("MOGVAE_FAULT", "epoch:2:TERM")
    assert main(["train", str(config), "--out", str(out)]) == 143
    monkeypatch.delenv("MOGVAE_FAULT")
    for ckpt in (out / "checkpoints").glob("*.safetensors"):
        tensors = load(ckpt.read_bytes())
        header = {"format": "mogvae-checkpoint-1", "meta": "[" * 200_000 + "]" * 200_000, "sha256": _digest(tensors)}
        ckpt.write_bytes(save(tensors, metadata=header))
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(out)]) == 2
    one_line(capsys)


# --- 7. no leftovers ---------------------------------------------------------------------------------

def test_report_and_a_rerun_remove_the_sweeps_own_stale_temporaries_only(finished_sweep, tmp_path):
    spec, out = _copy(finished_sweep, tmp_path)
    ours = [out / ".report.md.abcdefgh.tmp", out / "figures" / ".training.png.a1b2c3d4.tmp"]
    for path in ours:
        path.write_text("half a write")
    assert main(["report", str(out)]) == 0
    assert not any(p.exists() for p in ours)
    ours[1].write_text("again")
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1"]) == 0
    assert not ours[1].exists()


def test_a_sweep_folders_own_subfolder_replaced_by_a_link_is_never_written_through(finished_sweep, tmp_path, capsys):
    spec, out = _copy(finished_sweep, tmp_path)
    mine = tmp_path / "my-figures"
    mine.mkdir()
    (mine / "thesis.png").write_bytes(b"mine")
    shutil.rmtree(out / "figures")
    (out / "figures").symlink_to(mine)
    for command in (["report", str(out)], ["sweep", str(spec), "--out", str(out), "--workers", "1"]):
        assert main(command) == 2
        assert "figures is a link" in one_line(capsys)[0]
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.png"]


def test_a_folded_truth_that_cannot_be_evaluated_in_time_is_refused_before_training(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(TINY.replace("[data]\n", '[data]\nname = "folded"\ndata_dim = 1000\nlatent_dim = 2\n'
                                               'sigma = 0.01\n').replace("n_test = 50", "n_test = 100000"))
    assert main(["train", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "data.n_test" in one_line(capsys)[0]
    assert not (tmp_path / "out").exists()


# --- what a second outside attack found --------------------------------------------------------------

def test_a_reproduce_folders_model_names_never_become_paths_outside_it(quick_run, tmp_path, capsys):
    out = tmp_path / "rep"
    shutil.copytree(quick_run[0], out, symlinks=True)
    decoy = tmp_path / "decoy" / "important.csv"
    decoy.parent.mkdir()
    decoy.write_text("user,data\n")
    shutil.copytree(out / "runs" / "preset=mfg", out / "runs" / "decoy" / "important")
    record = json.loads((out / "config.json").read_text())
    record["study"]["models"] = ["mfg", "../../decoy/important"]
    (out / "config.json").write_text(json.dumps(record))
    assert main(["report", str(out)]) == 2
    assert "config.json" in one_line(capsys)[0]
    assert decoy.read_text() == "user,data\n" and sorted(p.name for p in decoy.parent.iterdir()) == ["important.csv"]


def test_every_image_the_renderer_makes_is_dropped_unless_it_is_our_figure(tmp_path):
    from mogvae.report.html import render
    page = render('![t](http://evil.example/p.png "title")\n\n![r][ref]\n\n[ref]: http://evil.example/r.png\n\n'
                  "![s](data:image/svg+xml,<svg/onload=alert(1)>)", tmp_path, "t")
    assert "<img" not in page and page.count("not embedded") == 3


def test_deeply_nested_history_or_spec_is_one_line(finished_sweep, tmp_path, capsys):
    spec, out = _copy(finished_sweep, tmp_path)
    (out / FIRST_RUN / "history.jsonl").write_text("[" * 200_000 + "]" * 200_000 + "\n")
    assert main(["report", str(out)]) == 2
    assert "history.jsonl" in one_line(capsys)[0]
    deep = tmp_path / "deep.toml"
    deep.write_text("preset = " + "[" * 5000 + "]" * 5000 + "\n")
    assert main(["sweep", str(deep), "--out", str(tmp_path / "o")]) == 2
    one_line(capsys)
    assert not (tmp_path / "o").exists()


def test_a_data_file_that_grows_while_read_is_read_as_it_was(tmp_path):
    """A writer appending mid-read once broke the reader's array sized by the line count."""
    from mogvae.data.files import _open_regular
    path = write_data(tmp_path / "y.csv", 0, n=300)
    original = path.read_bytes()
    with _open_regular(path) as fh:
        head = fh.read(100)
        with open(path, "a") as writer:
            writer.write("\n" + "\n".join(["1.5"] * 5000))
        assert head + fh.read() == original
        fh.seek(0)
        assert fh.read() == original


def test_more_data_than_memory_holds_and_odd_paths_are_one_line(tmp_path, capsys, monkeypatch):
    config = tmp_path / "run.toml"
    config.write_text(TINY)
    assert main(["train", str(config), "--out", str(tmp_path / "a"), "--set", "data.name=folded", "--set",
                 "data.data_dim=1000", "--set", "data.n_train=1000000"]) == 2
    assert "data.n_train <=" in one_line(capsys)[0]
    assert main(["train", str(config), "--out", str(tmp_path / "b"), "--set", "data.n_test=1000000000000"]) == 2
    assert "data.n_test" in one_line(capsys)[0]
    assert main(["sweep", str(config), "--out", str(tmp_path / "c"), "--scheduler", ""]) == 2
    assert "--scheduler" in one_line(capsys)[0]
    write_data(tmp_path / "sub" / "y.csv")
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(config), "--out", str(tmp_path / "d"), "--set", "data.name=file", "--set",
                 "data.path=other/../sub/./y.csv"]) == 0
    assert json.loads((tmp_path / "d" / "config.json").read_text())["data"]["path"] == str(tmp_path / "sub" / "y.csv")
    (tmp_path / "flat.csv").write_text("\n".join(["1.0"] * 400))
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(tmp_path / "e"), "--set", "data.name=file", "--set",
                 "data.path=flat.csv"]) == 2
    assert "column 1 holds one value" in one_line(capsys)[0]
    assert not any((tmp_path / x).exists() for x in "abce")
