"""The real server on a loopback port, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch

from openk2.data.chat import render_chat_ids
from openk2.serve.testing import HELLO_DIALOG, TOOL_DIALOG, WEATHER_TOOL

openai = pytest.importorskip("openai")
MODEL = "toy-k2"
TOOL_PROMPT = TOOL_DIALOG[:2]
HELLO_PROMPT = HELLO_DIALOG[:2]


def _health(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=10).json()


def _wait_idle(server, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = _health(server)
        if h["active"] == 0 and h["waiting"] == 0:
            return h
        assert time.monotonic() < deadline, f"server not idle: {h}"
        time.sleep(0.02)


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    h = _health(server)
    assert h["status"] == "ok" and h["model"] == MODEL and h["max_model_len"] == 512


def test_tool_call_round_trip(client, bundle):
    first = client.chat.completions.create(model=MODEL, messages=TOOL_PROMPT, tools=[WEATHER_TOOL], temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "functions.get_weather:0", "get_weather", {"city": "Paris"})
    # The client renames ids as it likes; the server renumbers them back to K2's form when rendering.
    assistant = choice.message.model_dump(exclude_none=True)
    assistant["tool_calls"][0]["id"] = "call_abc123"
    dialog = [*TOOL_PROMPT, assistant, {"role": "tool", "tool_call_id": "call_abc123", "content": "sunny, 21 C"}]
    second = client.chat.completions.create(model=MODEL, messages=dialog, tools=[WEATHER_TOOL], temperature=0)
    assert second.choices[0].message.content == "It is sunny in Paris."
    assert second.choices[0].finish_reason == "stop"
    # The tool result was rendered exactly as in training: the prompt is the training dialog's prefix.
    expected, _ = render_chat_ids(bundle.tokenizer, TOOL_DIALOG[:4], [WEATHER_TOOL], add_generation_prompt=True)
    assert second.usage.prompt_tokens == len(expected)
    assert first.usage.completion_tokens > 5


def test_tool_call_streaming_matches(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=TOOL_PROMPT, tools=[WEATHER_TOOL],
                                                 temperature=0, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # the section is never content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_tool_choice_modes(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    # Hello normally gets text; a named tool choice forces the call prefix and the model fills in the arguments.
    plain = client.chat.completions.create(model=MODEL, messages=HELLO_PROMPT, tools=[WEATHER_TOOL], temperature=0)
    assert plain.choices[0].message.content == "Hi there!" and not plain.choices[0].message.tool_calls
    forced = client.chat.completions.create(model=MODEL, messages=HELLO_PROMPT, tools=[WEATHER_TOOL],
                                            tool_choice=named, temperature=0)
    (call,) = forced.choices[0].message.tool_calls
    assert call.id == "functions.get_weather:0" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert forced.choices[0].finish_reason == "tool_calls"
    required = client.chat.completions.create(model=MODEL, messages=TOOL_PROMPT, tools=[WEATHER_TOOL],
                                              tool_choice="required", temperature=0)
    assert required.choices[0].message.tool_calls[0].function.name == "get_weather"
    # "none": the tool-call markers are banned, so the same prompt cannot produce a call.
    none = client.chat.completions.create(model=MODEL, messages=TOOL_PROMPT, tools=[WEATHER_TOOL],
                                          tool_choice="none", temperature=0, max_tokens=20)
    msg = none.choices[0].message
    assert not msg.tool_calls and "<|tool_call" not in (msg.content or "")


def test_malformed_tool_call_comes_back_as_content(client):
    # A forced call to a tool the model never saw: whatever it writes, the answer is a 200, never a 500.
    other = {"type": "function", "function": {"name": "lookup_stock", "parameters": {"type": "object"}}}
    r = client.chat.completions.create(model=MODEL, messages=HELLO_PROMPT, tools=[WEATHER_TOOL, other],
                                       tool_choice={"type": "function", "function": {"name": "lookup_stock"}},
                                       temperature=0, max_tokens=3)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content.startswith("<|tool_calls_section_begin|><|tool_call_begin|>functions.lookup_stock:0")
    assert "unterminated" in choice.model_extra["tool_call_error"]


def test_streaming_equals_non_streaming_with_logprobs(client, bundle):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "the weather in Köln"}], temperature=0,
              max_tokens=24, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    streamed_lp = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed_lp] == [e.token for e in whole.choices[0].logprobs.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    # The logprobs are the model's own log-softmax at each generated position.
    tok, model = bundle.tokenizer, bundle.model
    prompt, _ = render_chat_ids(tok, kw["messages"], add_generation_prompt=True)
    by_bytes = {b: i for b, i in tok.mergeable_ranks().items()} | {t.encode(): i for t, i in tok.special_ids.items()}
    entries = whole.choices[0].logprobs.content
    ids = [by_bytes[bytes(e.bytes)] for e in entries]
    # The entries are every generated token, special ones included; the text leaves the specials out
    # (skip_special_tokens, as in vLLM): a tool call written without tools offered is text without its markers.
    assert bytes(b for e in entries for b in e.bytes).decode() == tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == whole.choices[0].message.content
    with torch.no_grad():
        lsm = model(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
    for k, e in enumerate(entries):
        assert e.logprob == pytest.approx(float(lsm[len(prompt) - 1 + k, ids[k]]), abs=1e-4)
        assert e.top_logprobs[0].logprob == pytest.approx(float(lsm[len(prompt) - 1 + k].max()), abs=1e-4)
    assert whole.usage.completion_tokens == len(entries) + (whole.choices[0].finish_reason == "stop")


def test_completions_echo_logprobs_equal_log_softmax(client, bundle):
    text = "the weather in Paris is sunny"
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=4, echo=True, logprobs=2, temperature=0)
    choice = r.choices[0]
    tok, model = bundle.tokenizer, bundle.model
    prompt = [tok.bos_id, *tok.encode(text)]
    lp = choice.logprobs
    assert lp.tokens[: len(prompt)] == [tok.decode([t]) for t in prompt]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert choice.text.startswith(text) and r.usage.prompt_tokens == len(prompt)
    n_gen = len(lp.tokens) - len(prompt)
    assert n_gen == r.usage.completion_tokens == 4
    gen_ids = model.generate([prompt], 4)[0, len(prompt):].tolist()  # greedy: the same tokens
    # The text leaves out special tokens (a greedy <|im_end|> is generated, reported in logprobs, not printed).
    assert tok.decode(gen_ids, skip_special_tokens=True) == choice.text[len(text):]
    with torch.no_grad():
        lsm = model(torch.tensor([prompt + gen_ids])).logits[0].log_softmax(-1)
    full = prompt + gen_ids
    for t in range(1, len(full)):
        assert lp.token_logprobs[t] == pytest.approx(float(lsm[t - 1, full[t]]), abs=1e-4)
        assert max(lp.top_logprobs[t].values()) == pytest.approx(float(lsm[t - 1].max()), abs=1e-4)
    assert lp.text_offset[0] == lp.text_offset[1] == 0  # the added [BOS] is not part of the text
    special = set(tok.special_ids)  # not printed: zero-width, at the offset of the text that follows it
    offsets, tokens = lp.text_offset[1:], lp.tokens[1:]
    for i, (o, t) in enumerate(zip(offsets, tokens, strict=True)):
        if t in special:
            assert o == (offsets[i + 1] if i + 1 < len(offsets) else len(choice.text))
        else:
            assert choice.text[o:].startswith(t)


def test_completions_scoring_like_an_eval_harness(client, bundle):
    # lm-eval style: token ids, echo, max_tokens 0 -> the log-likelihood of every prompt token.
    tok = bundle.tokenizer
    ids = tok.encode("It is sunny in Paris.")
    r = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=0, echo=True, logprobs=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == "It is sunny in Paris." and r.choices[0].finish_reason == "length"
    assert len(r.choices[0].logprobs.token_logprobs) == len(ids)
    assert r.choices[0].logprobs.token_logprobs[:3] == pytest.approx(r.choices[1].logprobs.token_logprobs, abs=1e-5)
    assert r.usage.prompt_tokens == len(ids) + 3 and r.usage.completion_tokens == 0


def test_n_seed_and_sampling(client):
    kw = dict(model=MODEL, prompt="zq weather", max_tokens=8, temperature=1.5, n=4, seed=7,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice samples with its own seed
    assert a.usage.completion_tokens == 32
    c = client.completions.create(**{**kw, "seed": 8})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_stop_strings(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO_PROMPT, temperature=0, stop=["ere"])
    assert r.choices[0].message.content == "Hi th" and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO_PROMPT, temperature=0,
                                                 stop=["ere", "zzz"], stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi th"
    # include_usage: a final chunk with no choices and the usage.
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 2
    assert all(c.usage is None for c in chunks[:-1])


def test_sixteen_concurrent_requests_equal_sequential(client, server):
    prompts = [f"the weather {w} in" for w in ["Paris", "Köln", "is", "city", "sunny", "tool", "It", "What",
                                                 "Hi", "there", "21", "C", "Hello", "天气", "functions", "?"]]

    def one(c, p):
        return c.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text

    sequential = [one(client, p) for p in prompts]
    before = _health(server)

    async def concurrent():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0,
                                      timeout=120) as ac:
            rs = await asyncio.gather(*(ac.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
                                        for p in prompts))
        return [r.choices[0].text for r in rs]

    assert asyncio.run(concurrent()) == sequential
    after = _health(server)
    steps = after["decode_steps"] - before["decode_steps"]
    assert steps < 16 * 11 / 2  # shared decode steps, not one request at a time


def test_streaming_disconnect_cancels_and_frees_the_row(server):
    before = _wait_idle(server)
    body = {"model": MODEL, "prompt": "the weather", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", f"{server.base_url}/completions", json=body,
                                                  headers={"Authorization": f"Bearer {server.api_key}"}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: {"):
                got += 1
                if got == 3:
                    break
    after = _wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 1


def test_non_streaming_disconnect_cancels(server):
    before = _wait_idle(server)
    body = {"model": MODEL, "prompt": "the weather", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/completions", json=body, headers={"Authorization": f"Bearer {server.api_key}"},
                   timeout=httpx.Timeout(10, read=0.3))
    after = _wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 1
