"""`TorchEngine`: batched rollouts with behaviour log-probs, pause/abort, partial rollouts, weight updates."""

from __future__ import annotations

import asyncio
import copy
import math

import pytest
import torch

from openk2.model import build_model, get_preset
from openk2.rl.engine import TorchEngine
from openk2.rl.logprobs import token_logprobs
from openk2.rl.types import RolloutEngine, SamplingParams

V = 320


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny", vocab_size=V), seed=0).eval()


@pytest.fixture
def engine(model):
    eng = TorchEngine(copy.deepcopy(model), max_batch=8, max_len=128)
    yield eng
    eng.close()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def _run(coro):
    return asyncio.run(coro)


def test_torch_engine_is_a_rollout_engine(engine):
    assert isinstance(engine, RolloutEngine)


def test_greedy_batch_equals_model_generate_and_logprobs_match_the_trainer(model, engine):
    prompts = _prompts([5, 9, 3, 12])
    params = SamplingParams(max_new_tokens=10, temperature=0.0)

    async def go():
        return await asyncio.gather(*(engine.generate(p, params, f"r{i}") for i, p in enumerate(prompts)))

    outs = _run(go())
    stats = engine.engine.stats
    assert stats.batch_size_sum / stats.decode_steps > 2  # the four requests were decoded together
    for p, out in zip(prompts, outs, strict=True):
        ref = model.generate(torch.tensor([p]), 10, temperature=0.0)[0, len(p):].tolist()
        assert out.token_ids == ref
        assert out.finish_reason == "length" and out.version == 0
    with torch.no_grad():
        logp_BR = token_logprobs(model, [p + o.token_ids for p, o in zip(prompts, outs, strict=True)],
                                 [len(p) for p in prompts])
    for b, out in enumerate(outs):
        torch.testing.assert_close(logp_BR[b, : len(out.logprobs)], torch.tensor(out.logprobs), atol=1e-4, rtol=0)


def test_sampled_logprobs_are_at_the_sampling_temperature_and_seeds_reproduce(model, engine):
    prompt = _prompts([6])[0]
    params = SamplingParams(max_new_tokens=12, temperature=0.7, seed=123)
    a = _run(engine.generate(prompt, params, "a"))
    b = _run(engine.generate(prompt, params, "b"))
    assert a.token_ids == b.token_ids
    with torch.no_grad():
        at_T = token_logprobs(model, [prompt + a.token_ids], [len(prompt)], temperature=0.7)[0]
        at_1 = token_logprobs(model, [prompt + a.token_ids], [len(prompt)])[0]
    torch.testing.assert_close(at_T, torch.tensor(a.logprobs), atol=1e-4, rtol=0)
    assert not torch.allclose(at_1, at_T, atol=1e-3)
    raw = TorchEngine(copy.deepcopy(model), max_batch=2, max_len=64, logprobs="raw")
    try:
        r = _run(raw.generate(prompt, params, "raw"))
    finally:
        raw.close()
    assert r.token_ids == a.token_ids
    torch.testing.assert_close(at_1, torch.tensor(r.logprobs), atol=1e-4, rtol=0)


def test_stop_token_is_included_with_its_logprob(model, engine):
    prompt = _prompts([7])[0]
    free = _run(engine.generate(prompt, SamplingParams(max_new_tokens=8, temperature=0.0), "free"))
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    out = _run(engine.generate(prompt, SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=(stop,)),
                               "stopped"))
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.logprobs == pytest.approx(free.logprobs[: first + 1], abs=1e-5)


async def _generate_until(engine, prompt, params, request_id, n_tokens):
    """Start a request and pause+abort the engine once it has produced at least n_tokens."""
    task = asyncio.create_task(engine.generate(prompt, params, request_id))
    gen = None
    while gen is None:
        await asyncio.sleep(0)
        gen = engine._in_flight.get(request_id)
    while engine.engine.stats.decode_tokens < n_tokens:
        await asyncio.sleep(0.001)
    engine.pause()
    assert engine.abort() == [request_id]
    return await task


def test_partial_rollout_resumed_equals_the_uninterrupted_greedy_run(engine):
    prompt = _prompts([8], seed=3)[0]
    full = _run(engine.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0.0), "full"))
    before = engine.engine.stats.decode_tokens
    part = _run(_generate_until(engine, prompt, SamplingParams(max_new_tokens=40, temperature=0.0), "p1",
                                before + 5))
    assert part.finish_reason == "abort"
    assert 0 < len(part.token_ids) < 40
    assert part.token_ids == full.token_ids[: len(part.token_ids)]
    assert part.logprobs == pytest.approx(full.logprobs[: len(part.logprobs)], abs=1e-4)
    # generate after abort works after resume(); the rest continues exactly
    engine.resume()
    rest = _run(engine.generate(prompt + part.token_ids,
                                SamplingParams(max_new_tokens=40 - len(part.token_ids), temperature=0.0), "p2"))
    assert part.token_ids + rest.token_ids == full.token_ids
    assert part.logprobs + rest.logprobs == pytest.approx(full.logprobs, abs=1e-4)


def test_pause_holds_requests_and_resume_continues_them(engine):
    prompt = _prompts([5])[0]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    ref = _run(engine.generate(prompt, params, "ref"))

    async def go():
        engine.pause()
        task = asyncio.create_task(engine.generate(prompt, params, "held"))
        await asyncio.sleep(0.2)
        assert not task.done()
        assert engine.engine.stats.decode_tokens == decoded
        engine.resume()
        return await task

    decoded = engine.engine.stats.decode_tokens
    out = _run(go())
    assert out.token_ids == ref.token_ids and out.finish_reason == "length"


def test_update_weights_changes_outputs_and_bumps_the_version(model, engine):
    prompt = _prompts([6])[0]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    before = _run(engine.generate(prompt, params, "v0"))
    other = build_model(get_preset("tiny", vocab_size=V), seed=1)
    engine.pause()
    engine.update_weights(other.state_dict().items(), version=3)
    engine.resume()
    after = _run(engine.generate(prompt, params, "v3"))
    assert engine.version == 3 and after.version == 3 and before.version == 0
    ref = other.generate(torch.tensor([prompt]), 8, temperature=0.0)[0, len(prompt):].tolist()
    assert after.token_ids == ref != before.token_ids


def test_update_weights_is_refused_mid_generation_and_names_unknown_tensors(engine):
    prompt = _prompts([6])[0]

    async def go():
        task = asyncio.create_task(engine.generate(prompt, SamplingParams(max_new_tokens=100, temperature=0.0),
                                                   "long"))
        while engine.engine.n_active == 0:
            await asyncio.sleep(0.001)
        engine.pause()
        with pytest.raises(RuntimeError, match="abort"):
            engine.update_weights([], version=1)
        engine.abort()
        out = await task
        engine.update_weights([], version=1)
        engine.resume()
        return out

    out = _run(go())
    assert out.finish_reason == "abort" and engine.version == 1
    with pytest.raises(KeyError, match="no_such"):
        engine.update_weights([("no_such.weight", torch.zeros(1))], version=2)


def test_prompt_longer_than_the_context_is_refused_naming_the_limit(engine):
    with pytest.raises(ValueError, match=r"context is 128 tokens \(max_len\)"):
        _run(engine.generate([1] * 130, SamplingParams(max_new_tokens=4), "long"))
    # a budget past the context is cut to it
    out = _run(engine.generate([1] * 120, SamplingParams(max_new_tokens=50, temperature=0.0), "cut"))
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    assert all(math.isfinite(x) for x in out.logprobs)


def test_a_closed_engine_says_so(model):
    eng = TorchEngine(copy.deepcopy(model), max_batch=2, max_len=32)
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        _run(eng.generate([1, 2], SamplingParams(max_new_tokens=2), "x"))
