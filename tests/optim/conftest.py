import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The optimizer tests use tiny tensors: intra-op threads only add OpenMP sync cost, which explodes when the
    shared CPU is oversubscribed (seconds instead of milliseconds per step)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
