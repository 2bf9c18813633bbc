import os

import pytest
import torch

# Most tests generate a few tokens, where compiling the decode step would cost far more than it saves:
# `compile="auto"` decodes eagerly in the suite (tests/model/test_decode.py compiles on purpose).
os.environ.setdefault("OPENK2_COMPILE", "0")


# The thread count is process-wide and changes fp32 reduction order: a test or fixture that sets it must not leak
# it into later tests (the kill-and-resume test compares an in-process run with a subprocess bit for bit).
_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
    torch.set_num_threads(_THREADS)
