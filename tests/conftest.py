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
