"""Fixtures: a tiny K2 model overfit on a tool-call dialog, saved as a model directory, and a live server."""

from __future__ import annotations

import contextlib

import pytest
import torch

from openk2.serve.model_dir import load_model_dir
from openk2.serve.server import ServerThread, build_service
from openk2.serve.testing import make_model_dir, toy_tokenizer, train_tool_model

API_KEY = "test-key"


@contextlib.contextmanager
def one_torch_thread():
    # The CI box has 2 cores shared with other jobs: OpenMP with 2 threads spins when a core is taken and runs
    # up to ~100x slower than 1 thread, so the serving tests pin torch to one thread (and restore it after).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    with one_torch_thread():  # session fixtures are set up before the module-scoped pin
        tok = toy_tokenizer()
        model = train_tool_model(tok)
    return make_model_dir(tmp_path_factory.mktemp("toolmodel") / "toy-k2", model, tok)


@pytest.fixture(scope="session")
def bundle(model_dir):
    return load_model_dir(model_dir, device="cpu")


@pytest.fixture(scope="session")
def server(bundle):
    service = build_service(bundle, max_batch=8, max_len=512)
    with ServerThread(service, api_key=API_KEY) as srv:
        srv.api_key = API_KEY
        yield srv


@pytest.fixture()
def client(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c
