"""A random-weight tiny model served on a loopback port (the llm layer only needs something to talk to)."""

from __future__ import annotations

import pytest
import torch

from openk2.model import build_model, get_preset
from openk2.serve.model_dir import load_model_dir
from openk2.serve.server import ServerThread, build_service
from openk2.serve.testing import make_model_dir, toy_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # 2 shared cores: 2 OpenMP threads spin when the other core is busy (see tests/serve/conftest.py).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def llm_model_dir(tmp_path_factory):
    tok = toy_tokenizer()
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=512), seed=0)
    return make_model_dir(tmp_path_factory.mktemp("llm") / "tiny-random", model, tok)


@pytest.fixture(scope="session")
def llm_service(llm_model_dir):
    return build_service(load_model_dir(llm_model_dir, device="cpu"), max_batch=8)


@pytest.fixture(scope="session")
def llm_server(llm_service):
    with ServerThread(llm_service, api_key="secret") as srv:
        yield srv
