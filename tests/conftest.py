import os

import pytest
import torch

# Most tests generate a few tokens, where compiling the decode step would cost far more than it saves:
# `compile="auto"` decodes eagerly in the suite (tests/model/test_decode.py compiles on purpose).
os.environ.setdefault("OPENK2_COMPILE", "0")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
