"""`OpenAIEngine` against a real `openk2 serve` subprocess: token ids in and out, logprobs that match the
trainer's `token_logprobs` of the same weights, stop tokens, abort with the partial response."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from openk2.llm import LLMError
from openk2.model import build_model, get_preset
from openk2.model_dir import load_model_dir
from openk2.rl.logprobs import token_logprobs
from openk2.rl.openai_engine import OpenAIEngine
from openk2.rl.types import RolloutEngine, SamplingParams
from openk2.serve.testing import make_model_dir, serve_subprocess, toy_tokenizer

MAX_LEN = 128


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai_engine")
    tok = toy_tokenizer(vocab_size=320)
    model_dir = make_model_dir(tmp / "model", build_model(get_preset("tiny", vocab_size=tok.vocab_size), seed=0),
                               tok)
    model = load_model_dir(model_dir, device="cpu").model
    with serve_subprocess(model_dir, "--threads", "1", "--max-batch", "4", "--max-len", str(MAX_LEN),
                          "--device", "cpu", "--compile", "off", log_path=tmp / "server.log") as (url, _):
        yield url, model, "model"


def _engine(served):
    url, _, name = served
    return OpenAIEngine(url, name, max_concurrency=4)


def _prompts(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def test_greedy_token_ids_round_trip_and_logprobs_match_token_logprobs(served):
    _, model, _ = served
    prompts = _prompts(model, [5, 11, 3])

    async def go():
        engine = _engine(served)
        assert isinstance(engine, RolloutEngine)
        try:
            return await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=12, temperature=0.0),
                                                          f"g{i}") for i, p in enumerate(prompts)))
        finally:
            await engine.aclose()

    outs = asyncio.run(go())
    with torch.no_grad():
        logp_BR = token_logprobs(model, [p + o.token_ids for p, o in zip(prompts, outs, strict=True)],
                                 [len(p) for p in prompts])
    for b, (p, out) in enumerate(zip(prompts, outs, strict=True)):
        ref = model.generate(torch.tensor([p]), 12, temperature=0.0)[0, len(p):].tolist()
        assert out.token_ids == ref and out.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(out.logprobs), logp_BR[b, :12], atol=1e-4, rtol=0)


def test_sampled_stop_token_and_seed(served):
    _, model, _ = served
    prompt = _prompts(model, [6], seed=1)[0]

    async def go():
        engine = _engine(served)
        try:
            a = await engine.generate(prompt, SamplingParams(max_new_tokens=16, temperature=1.0, seed=7), "a")
            stop = a.token_ids[4]
            b = await engine.generate(prompt, SamplingParams(max_new_tokens=16, temperature=1.0, seed=7,
                                                             stop_token_ids=(stop,)), "b")
            return a, b, stop
        finally:
            await engine.aclose()

    a, b, stop = asyncio.run(go())
    cut = a.token_ids.index(stop) + 1
    assert b.finish_reason == "stop" and b.token_ids == a.token_ids[:cut]
    with torch.no_grad():
        ref = token_logprobs(model, [prompt + b.token_ids], [len(prompt)])[0]
    torch.testing.assert_close(torch.tensor(b.logprobs), ref, atol=1e-4, rtol=0)


def test_abort_returns_the_partial_response_and_pause_holds_new_requests(served):
    _, model, _ = served
    prompt = _prompts(model, [4], seed=2)[0]
    params = SamplingParams(max_new_tokens=MAX_LEN - 4, temperature=0.0)

    async def go():
        engine = _engine(served)
        try:
            task = asyncio.create_task(engine.generate(prompt, params, "long"))
            while not engine._in_flight.get("long") or len(engine._in_flight["long"].token_ids) < 3:
                await asyncio.sleep(0.01)
            engine.pause()
            held = asyncio.create_task(engine.generate(prompt, params, "held"))
            await asyncio.sleep(0.05)
            assert sorted(engine.abort()) == ["held", "long"]
            part, held_out = await task, await held
            engine.resume()
            rest = await engine.generate(prompt + part.token_ids,
                                         SamplingParams(max_new_tokens=8, temperature=0.0), "rest")
            return part, held_out, rest
        finally:
            await engine.aclose()

    part, held_out, rest = asyncio.run(go())
    health = httpx.get(served[0].removesuffix("/v1") + "/health", timeout=10).json()
    assert health["active"] == 0 and health["cancelled"] >= 1  # the server dropped the aborted request
    assert part.finish_reason == "abort" and 3 <= len(part.token_ids) < MAX_LEN - 4
    assert held_out.finish_reason == "abort" and held_out.token_ids == []
    full = model.generate(torch.tensor([prompt]), len(part.token_ids) + 8, temperature=0.0)[0, len(prompt):].tolist()
    assert part.token_ids + rest.token_ids == full


def test_a_prompt_beyond_the_servers_context_is_refused_and_update_weights_explains(served):
    async def go():
        engine = _engine(served)
        try:
            await engine.generate([1] * (MAX_LEN + 5), SamplingParams(max_new_tokens=4), "too-long")
        finally:
            await engine.aclose()

    with pytest.raises(LLMError, match="context"):
        asyncio.run(go())
    with pytest.raises(NotImplementedError, match="checkpoint-engine"):
        _engine(served).update_weights([], 1)


def test_completions_return_token_ids_streamed_and_not(served):
    """The server side: vLLM's return_token_ids / return_tokens_as_token_ids / stop_token_ids on /v1/completions."""
    import json

    url, model, name = served
    prompt = _prompts(model, [5], seed=3)[0]
    body = {"model": name, "prompt": prompt, "max_tokens": 6, "temperature": 0.0, "logprobs": 0,
            "return_token_ids": True, "return_tokens_as_token_ids": True, "ignore_eos": True}
    plain = httpx.post(f"{url}/completions", json=body, timeout=60).json()["choices"][0]
    assert plain["prompt_token_ids"] == prompt and len(plain["token_ids"]) == 6
    assert plain["logprobs"]["tokens"] == [f"token_id:{t}" for t in plain["token_ids"]]
    stop = plain["token_ids"][2]
    chunks = []
    with httpx.stream("POST", f"{url}/completions", json={**body, "stream": True, "stop_token_ids": [stop]},
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += json.loads(line[6:])["choices"]
    assert chunks[0]["prompt_token_ids"] == prompt
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    ids = [t for c in chunks for t in c["token_ids"]]
    lps = [x for c in chunks if c["logprobs"] for x in c["logprobs"]["token_logprobs"]]
    cut = plain["token_ids"].index(stop) + 1
    assert ids == plain["token_ids"][:cut] and chunks[-1]["finish_reason"] == "stop"
    assert lps == pytest.approx(plain["logprobs"]["token_logprobs"][:cut], abs=1e-5)
    bad = httpx.post(f"{url}/completions", json={**body, "stop_token_ids": [10**6]}, timeout=60)
    assert bad.status_code == 400 and "stop_token_ids" in bad.text
