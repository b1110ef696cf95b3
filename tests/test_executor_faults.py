"""Faults around the executors (runs/executors.py), each made to happen at a chosen
point (storage/faults.py), never at a lucky moment: a bad --scheduler, a full disk in a
worker, the Dask scheduler killed mid-sweep, the driver killed by kill -9 (with
Dask and with local workers), and SIGTERM while a worker is inside a write.
Each ends in one line and a folder that a re-run completes to the same numbers."""
import csv
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY_TOML
from mogvae.cli import main

SPEC = TINY_TOML + '[grid]\npreset = ["mfg", "mog-prior"]\n'

# A Dask cluster in a process of its own (scheduler and threaded workers together),
# which a test can kill; it prints its address and lives until its stdin closes.
CLUSTER = """
import sys
from distributed import LocalCluster
cluster = LocalCluster(n_workers=int(sys.argv[1]), threads_per_worker=1, processes=False, host="127.0.0.1",
                       dashboard_address=None, protocol="tcp")
print(cluster.scheduler_address, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """metrics.csv rows of the uninterrupted sweep, in this process (no report: only metrics.csv is compared)."""
    tmp = tmp_path_factory.mktemp("ref")
    (tmp / "spec.toml").write_text(SPEC)
    assert main(["sweep", str(tmp / "spec.toml"), "--out", str(tmp / "out"), "--workers", "1", "--no-report"]) == 0
    return rows_but_wall_time(tmp / "out" / "metrics.csv")


def rows_but_wall_time(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k != "train_seconds"} for row in csv.DictReader(fh)]


def sweep_cmd(spec, out, *extra):
    return [sys.executable, "-m", "mogvae.cli", "sweep", str(spec), "--out", str(out), *extra]


def env_with(fault: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MOGVAE_FAULT"}
    return {**env, "MOGVAE_FAULT": fault} if fault else env


def said(stderr: str) -> list[str]:
    """The lines of stderr that are not the sweep's header or its progress."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith("sweep: ") and not re.match(r"mogvae: \d+ runs \(", line)]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def resumes_to_the_reference(spec, out, reference) -> None:
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1", "--no-report"]) == 0
    assert rows_but_wall_time(out / "metrics.csv") == reference


@contextmanager
def dask_cluster(workers: int, fault: str | None = None):
    """(address, process) of a fresh cluster; killed on the way out, whatever happened."""
    pytest.importorskip("distributed")
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER, str(workers)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env_with(fault),
                            start_new_session=True)
    try:
        assert select.select([proc.stdout], [], [], 120)[0], "the Dask cluster did not start"
        yield proc.stdout.readline().strip(), proc
    finally:
        proc.kill()
        proc.wait(timeout=60)


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:1", "foo://x", "tcp://[::1"])
def test_a_bad_scheduler_address_is_refused_before_the_folder_is_made(spec, tmp_path, capsys, address):
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--scheduler", address]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mogvae: error: --scheduler {address}: "), err
    assert not out.exists()


def test_a_full_disk_in_a_local_worker_is_the_disk_full_line_and_the_rerun_completes(spec, tmp_path, reference):
    out = tmp_path / "out"
    full = subprocess.run(sweep_cmd(spec, out, "--workers", "2"), capture_output=True, text=True, timeout=300,
                          env=env_with("epoch:2:ENOSPC"), start_new_session=True)
    assert full.returncode == 1, full.stderr
    lines = said(full.stderr)
    assert len(lines) == 1 and lines[0].startswith("mogvae: error: no space left on the device"), full.stderr
    assert "re-run the same command" in lines[0] and "bug" not in full.stderr and "Traceback" not in full.stderr
    resumes_to_the_reference(spec, out, reference)


def test_the_dask_scheduler_killed_mid_sweep_is_one_line_and_the_runs_resume(spec, tmp_path, reference):
    out, hold = tmp_path / "out", tmp_path / "hold"
    # the 2nd epoch a worker finishes waits there until `hold` is removed: the sweep cannot end before the kill
    with dask_cluster(2, fault=f"epoch:2:HOLD:{hold}") as (address, cluster):
        driver = subprocess.Popen(sweep_cmd(spec, out, "--scheduler", address), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, env=env_with(), start_new_session=True)
        try:
            wait_until(lambda: hold.exists() or driver.poll() is not None, 120, "a run to reach its 2nd epoch")
            assert hold.exists(), driver.communicate()[1]
            cluster.kill()
            _, stderr = driver.communicate(timeout=60)
        finally:
            driver.kill()
    assert driver.returncode == 1, stderr
    assert "Traceback" not in stderr
    lines = said(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"mogvae: error: the Dask scheduler at {address} went away") and \
        "the runs keep their checkpoints" in lines[0] and "run the same command again" in lines[0], lines
    resumes_to_the_reference(spec, out, reference)


def _lock_waited_for(lock: Path) -> bool:
    """Whether some process blocks in flock() on `lock` (Linux: a '->' line of /proc/locks)."""
    try:
        inode = lock.stat().st_ino
    except FileNotFoundError:
        return False
    return any("->" in line.split() and any(field.endswith(f":{inode}") for field in line.split())
               for line in Path("/proc/locks").read_text().splitlines())


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_a_dask_driver_killed_by_kill_9_is_rerun_at_once_to_the_same_numbers(tmp_path, reference):
    """The killed driver's task goes on training (Dask cannot stop a running task);
    the re-run's task for the same run waits for it instead of refusing the folder.
    One cell on four workers: the scheduler hands the re-run's task (and each of
    its two retries) to the next idle worker, never the one still training it, so
    a task that refuses a held folder fails all three times."""
    (tmp_path / "spec.toml").write_text(SPEC.replace('["mfg", "mog-prior"]', '["mfg"]'))
    hold = tmp_path / "hold"
    lock = tmp_path / "out" / "runs" / "preset=mfg" / ".lock"
    # a relative --out: the workers run in another folder, and must still write into this one
    command = sweep_cmd("spec.toml", "out", "--scheduler")
    with dask_cluster(4, fault=f"epoch:2:HOLD:{hold}") as (address, _):
        first = subprocess.Popen(command + [address], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, env=env_with(), start_new_session=True)
        wait_until(lambda: hold.exists() or first.poll() is not None, 120, "the run to reach its 2nd epoch")
        first.kill()
        assert first.wait(timeout=60) == -signal.SIGKILL, first.communicate()[1]
        second = subprocess.Popen(command + [address], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, env=env_with(), start_new_session=True)
        try:
            wait_until(lambda: _lock_waited_for(lock) or second.poll() is not None, 120,
                       "the re-run's task to wait for the run's lock")
            hold.unlink()                        # the abandoned task goes on, finishes, and lets go of the run
            _, stderr = second.communicate(timeout=120)
        finally:
            second.kill()
    assert second.returncode == 0, stderr
    assert rows_but_wall_time(tmp_path / "out" / "metrics.csv") == [r for r in reference if r["run"] == "preset=mfg"]


def test_a_local_driver_killed_by_kill_9_leaks_no_semaphores_and_resumes(spec, tmp_path, reference):
    out = tmp_path / "out"
    # capture_output reads until every holder of stderr is gone: the workers (killed with
    # their parent) and Python's resource tracker, which warns of leaks as it exits
    # where multiprocessing puts the fork server's socket (pymp-*): short, as a socket's path must be
    temporary = Path(tempfile.mkdtemp(prefix="mv", dir="/tmp"))
    try:
        killed = subprocess.run(sweep_cmd(spec, out, "--workers", "2"), capture_output=True, text=True, timeout=300,
                                env={**env_with("progress:2:KILL"), "TMPDIR": str(temporary)}, start_new_session=True)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert "leaked" not in killed.stderr and "resource_tracker" not in killed.stderr, killed.stderr
        deadline = time.monotonic() + 30       # the fork server exits once its driver is gone, and tidies up
        while list(temporary.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(temporary.iterdir()) == []
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    resumes_to_the_reference(spec, out, reference)


def test_a_temporary_folder_too_deep_for_a_socket_spawns_the_workers_instead(monkeypatch, tmp_path):
    """A Unix socket's path holds 107 bytes: under a deep TMPDIR the fork server could not start
    ("AF_UNIX path too long", met in this suite); then workers are spawned, as before the fork server."""
    import tempfile as tf

    from mogvae.runs import executors
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tf, "tempdir", str(deep))
    assert executors._worker_context().get_start_method() == "spawn"
    monkeypatch.setattr(tf, "tempdir", "/tmp")
    assert executors._worker_context().get_start_method() == "forkserver"


def test_sigterm_while_a_worker_writes_leaves_no_temporary(spec, tmp_path, reference):
    out, once = tmp_path / "out", tmp_path / "once"
    # one worker, its checkpoint's temporary complete and not yet renamed, sends the
    # driver SIGTERM and waits there for whatever the driver does to it
    stopped = subprocess.run(sweep_cmd(spec, out, "--workers", "2"), capture_output=True, text=True, timeout=300,
                             env=env_with(f"checkpoint:1:TERM-PARENT:{once}"), start_new_session=True)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert once.exists()
    assert list(out.rglob(".*.tmp")) == []
    assert said(stopped.stderr) == [f"mogvae: stopped by SIGTERM; {out} keeps every finished epoch: "
                                    "re-run the same command to resume"], stopped.stderr
    resumes_to_the_reference(spec, out, reference)


def test_a_worker_killed_inside_a_figures_write_is_one_line_and_the_rerun_draws_it_whole(spec, tmp_path, reference):
    """Each worker draws its finished run's figures (report.sweep.figure_drawers): kill -9 with a figure's
    temporary complete and not yet renamed. The run itself is finished; the re-run finds it so, leaves no
    temporary, and its report draws the figure whole."""
    out = tmp_path / "out"
    killed = subprocess.run(sweep_cmd(spec, out, "--workers", "2"), capture_output=True, text=True, timeout=300,
                            env=env_with("figure:1:KILL"), start_new_session=True)
    assert killed.returncode == 1, killed.stderr
    last = killed.stderr.strip().splitlines()[-1]
    assert "a worker died (killed by SIGKILL)" in last and "re-run" in last and "Traceback" not in killed.stderr, last
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1"]) == 0
    assert rows_but_wall_time(out / "metrics.csv") == reference
    assert list(out.rglob(".*.tmp")) == []
    from mogvae.report.figures import already_drawn
    for png in (out / "figures").glob("preset=*.png"):
        with Image.open(png) as image:
            image.load()                                      # whole
        assert already_drawn(png, Image.open(png).text["mogvae-inputs"])


def test_a_sigterm_inside_a_callback_still_stops_the_worker_quietly():
    """Seen once in the suite: the driver's SIGTERM reached a worker inside a weakref callback
    of an import, where Python cannot raise; it printed 'Exception ignored ... _Stop' and the
    worker went on. The worker's unraisablehook delivers the stop again, where it can raise."""
    code = """if True:
        import signal, sys, time, weakref
        from mogvae.runs import executors
        signal.signal(signal.SIGTERM, executors._on_sigterm)
        sys.unraisablehook = executors._stop_where_it_can_raise
        class Thing: pass
        def callback(ref):
            raise executors._Stop(143)          # as the handler does when the signal lands here
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing                               # the callback's exception is 'unraisable'
        time.sleep(5)
        print("went on")
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143 and "went on" not in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
