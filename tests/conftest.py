import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_fault_counters():
    """faults.py counts passes per process; each test starts from zero."""
    from mogvae import faults
    faults._passes.clear()


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One `mogvae reproduce --quick`, shared by the tests that read its output."""
    out = tmp_path_factory.mktemp("study") / "out"
    proc = subprocess.run([sys.executable, "-m", "mogvae.cli", "reproduce", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


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
"""


@pytest.fixture
def tiny(tmp_path):
    """A `mogvae train` configuration that trains and evaluates in about a second."""
    path = tmp_path / "run.toml"
    path.write_text(TINY_TOML)
    return path
