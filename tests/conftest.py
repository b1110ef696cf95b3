import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)


# The two test workers take whole files (--dist loadfile), in collection order (--no-loadscope-reorder:
# xdist's own order is by number of tests, which put the one-test study files, among the longest, last,
# and one worker ran them alone at the end). Longest first, so that the workers finish together: the
# files' seconds as a suite run measured them (largest first), the rest after them as collected.
# test_compiled is placed by its cost on a fresh machine (inductor's cache cold: about 25 s; 2 s warm).
LONGEST_FIRST = ("test_oracle_and_gaps.py", "test_docs.py", "test_sweep.py", "test_faults.py",
                 "test_hostile_input.py", "test_families.py", "test_cli_usability.py", "test_executor_faults.py",
                 "test_studies.py", "test_bounded_memory.py", "test_study_tabular.py", "test_compiled.py",
                 "test_folded.py", "test_study_dimension.py", "test_tolerance.py", "test_runs.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: a file's own order kept


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_fault_counters():
    """storage/faults.py counts passes per process; each test starts from zero. SIGINT gets
    Python's own handler: a shell without job control starts background commands
    with SIGINT ignored, and the Ctrl-C trials would then never be interrupted."""
    import signal

    from mogvae.storage import faults
    faults._passes.clear()
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory, worker_id):
    """One `mogvae reproduce --quick`, shared by the tests that read its output, and
    by both test worker processes (pytest-xdist): the first to arrive makes it."""
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    out, log = root / "quick-reproduce", root / "quick-reproduce.stdout"
    with FileLock(str(root / "quick-reproduce.lock")):
        if not (out / "report.html").exists():
            proc = subprocess.run([sys.executable, "-m", "mogvae.cli", "reproduce", "--quick", "--out", str(out)],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            log.write_text(proc.stdout)
    return out, subprocess.CompletedProcess([], 0, stdout=log.read_text(), stderr="")


TINY_TOML = """
preset = "mfg"
seeds = 1
[model]
hidden = [8]
[data]
n_train = 200
n_val = 50
n_test = 50
[train]
epochs = 3
[eval]
grid_size = 401
n_generated = 200
gap_points = 5
gap_steps = 50
"""


@pytest.fixture
def tiny(tmp_path):
    """A `mogvae train` configuration that trains and evaluates in about a second."""
    path = tmp_path / "run.toml"
    path.write_text(TINY_TOML)
    return path
