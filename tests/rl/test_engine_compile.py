"""The rollout engine and `generate` share the model's compiled decode step: their caches are laid out
differently (a slot cache sliced to the live rows vs generate's own), so Dynamo compiles separate graphs for
the same (batch, window). The step's budget must count those, or Dynamo's own recompile limit is hit first
and compiling is switched off for the whole process."""

from __future__ import annotations

import asyncio
import warnings

import pytest
import torch

from openk2.model import build_model, get_preset
from openk2.model import decode as decode_module
from openk2.model.decode import DecodeStep
from openk2.rl.engine import TorchEngine
from openk2.rl.types import SamplingParams


@pytest.fixture(autouse=True)
def _clean_compile_state():
    decode_module.reset_compile_failure()
    yield
    decode_module.reset_compile_failure()


@torch._dynamo.config.patch(recompile_limit=2)  # as tight as the step's budget
def test_engine_and_generate_graphs_count_against_the_budget():
    model = build_model(get_preset("tiny", vocab_size=256), seed=0).eval()
    step = DecodeStep(model, compile=True, max_graphs=2, backend="eager")
    model.__dict__.setdefault("_decode_steps", {})[True] = step
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    refs = [model.generate([p], 6, compile=False)[0, len(p):].tolist() for p in prompts]
    assert model.generate([prompts[0]], 6, compile=True)[0, 4:].tolist() == refs[0]  # graph 1: generate's cache
    engine = TorchEngine(model, max_batch=4, max_len=64, compile=True)

    async def both():
        return await asyncio.gather(*(engine.generate(p, greedy, f"b{i}") for i, p in enumerate(prompts)))

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            one = asyncio.run(engine.generate(prompts[0], greedy, "a"))  # graph 2: the slot cache, batch 1
            two = asyncio.run(both())  # batch 2: over the budget, so eager
    finally:
        engine.close()
    assert one.token_ids == refs[0] and [o.token_ids for o in two] == refs
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "torch.compile failed" in m], messages
    assert any("2 graphs compiled already" in m for m in messages)
    assert step.compiled and len(step._graphs) == 2 and step.eager_fallbacks > 0
    assert set(step.compile_seconds) == {(1, 64)}  # one (batch, window), two cache layouts


def test_dynamos_recompile_limit_keeps_that_shape_eager_not_the_process(monkeypatch):
    # As if a guard the budget does not model made Dynamo recompile past the limit the step set.
    monkeypatch.setattr(decode_module, "_apply_graph_limit", lambda: None)
    model = build_model(get_preset("tiny", vocab_size=256), seed=0).eval()
    cfg = model.config
    step = DecodeStep(model, compile=True, max_graphs=4, backend="eager")
    latent = torch.zeros(cfg.num_hidden_layers, 3, 64, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    valid_BS = torch.zeros(1, 64, dtype=torch.bool)
    valid_BS[0, :3] = True
    args = (valid_BS, torch.tensor([5]), torch.tensor([3]))
    torch._dynamo.reset()
    with torch.inference_mode(), torch._dynamo.config.patch(recompile_limit=1):  # (this thread's config)
        first = step(latent[:, :1].contiguous(), *args)
        assert first is not None
        # same (batch, window), other strides: a second Dynamo graph, which the limit of 1 refuses
        with pytest.warns(RuntimeWarning, match="recompile limit was reached"):
            assert step(latent[:, 1:2], *args) is None
        assert step(latent[:, 1:2], *args) is None  # remembered: no second attempt
        assert step.compiled and step.eager_fallbacks == 2
        torch.testing.assert_close(step(latent[:, :1].contiguous(), *args)[0], first[0])


def test_the_graph_limit_reaches_the_engine_thread():
    """Dynamo's config is per thread: the engine thread must get the budget's limit, not Dynamo's default."""
    import threading

    model = build_model(get_preset("tiny", vocab_size=256), seed=0).eval()
    DecodeStep(model, compile=True, max_graphs=16, backend="eager")
    seen = {}

    def engine_thread():
        decode_module._apply_graph_limit()
        seen["limit"] = torch._dynamo.config.recompile_limit

    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()
    assert seen["limit"] >= 16
