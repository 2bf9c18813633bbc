"""Response cache, replay backend, usage accounting and the client's cache/dedup logic (no model involved)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from openk2.llm import (
    CHAT,
    Backend,
    LLMClient,
    Price,
    ReplayBackend,
    ReplayMiss,
    ResponseCache,
    Usage,
    UsageTracker,
    chat_response,
    request_key,
)

MSG = [{"role": "user", "content": "hi"}]


def test_request_key_is_the_exact_request():
    a = {"model": "m", "messages": MSG, "temperature": 0.5}
    assert request_key(CHAT, a) == request_key(CHAT, json.loads(json.dumps(a)))
    assert request_key(CHAT, a) != request_key(CHAT, {**a, "temperature": 0.6})
    assert request_key(CHAT, a) != request_key("completions", a)
    # Key order is part of the request (tool declarations are rendered in the order given).
    assert request_key(CHAT, a) != request_key(CHAT, {"temperature": 0.5, "model": "m", "messages": MSG})


def test_cache_roundtrip_corruption_and_atomic_writes(tmp_path, monkeypatch):
    cache = ResponseCache(tmp_path / "c")
    key = request_key(CHAT, {"model": "m"})
    assert cache.get(key) is None and key not in cache
    cache.put(key, CHAT, {"model": "m"}, chat_response("hello"))
    assert cache.get(key)["choices"][0]["message"]["content"] == "hello"
    assert len(cache) == 1 and next(cache.records())["request"] == {"model": "m"}
    # A torn/corrupt entry is a miss, not a crash.
    path = next((tmp_path / "c").glob("*/*.json"))
    path.write_text('{"key": "x", "respo')
    assert cache.get(key) is None and len(cache) == 0
    # A write that dies before the rename leaves neither an entry nor a temporary file behind.
    key2 = request_key(CHAT, {"model": "m2"})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        cache.put(key2, CHAT, {"model": "m2"}, chat_response("x"))
    monkeypatch.undo()
    assert cache.get(key2) is None
    assert not [p for p in (tmp_path / "c").rglob("*") if p.name.endswith(".tmp")]


def test_usage_tracker_costs_and_save(tmp_path):
    t = UsageTracker({"big": Price(input_per_mtok=2.0, output_per_mtok=10.0)})
    t.record("big", Usage(1000, 500), cached=False, latency_s=0.5)
    t.record("big", Usage(1000, 500), cached=True)
    t.record("free", Usage(10, 5), cached=False)
    s = t.summary()
    big = s["models"]["big"]
    assert big["requests"] == 1 and big["cached_requests"] == 1
    assert big["cost_usd"] == pytest.approx(0.007) and big["cached_cost_usd"] == pytest.approx(0.007)
    assert s["total"]["prompt_tokens"] == 1010 and s["total"]["total_tokens"] == 1515
    assert s["models"]["free"]["cost_usd"] == 0
    t.save(tmp_path / "run" / "llm_usage.json")
    assert json.loads((tmp_path / "run" / "llm_usage.json").read_text()) == s


def test_price_parse_reads_the_cli_form_and_names_it_on_bad_input():
    assert Price.parse("1,2.5") == Price(1.0, 2.5)
    for bad in ("1", "a,b", "1,2,3"):
        with pytest.raises(ValueError, match="INPUT,OUTPUT in USD per million tokens"):
            Price.parse(bad)


def test_client_cache_makes_a_rerun_free_and_replayable(tmp_path):
    async def run(backend, cache_dir):
        client = LLMClient(backend, model="m", cache=ResponseCache(cache_dir),
                           usage=UsageTracker({"m": Price(1.0, 1.0)}))
        a = await client.chat(MSG, temperature=0)
        b = await client.chat([*MSG, {"role": "assistant", "content": a.content}, {"role": "user", "content": "2"}])
        return client, a, b

    first = ReplayBackend(script=[chat_response("one", prompt_tokens=3, completion_tokens=1),
                                  chat_response("two", prompt_tokens=7, completion_tokens=1)])
    client, a, b = asyncio.run(run(first, tmp_path / "cache"))
    assert (a.content, b.content, a.cached) == ("one", "two", False)
    assert len(first.calls) == 2 and first.calls[0][1] == {"model": "m", "temperature": 0, "messages": MSG}
    assert client.usage.model("m").prompt_tokens == 10
    # The rerun (e.g. a resumed pipeline) is served from disk: the backend would fail on any call.
    strict = ReplayBackend()
    client2, a2, b2 = asyncio.run(run(strict, tmp_path / "cache"))
    assert (a2.content, b2.content, a2.cached, b2.cached) == ("one", "two", True, True)
    assert strict.calls == []
    u = client2.usage.model("m")
    assert (u.requests, u.cached_requests, u.cost_usd, u.cached_cost_usd) == (0, 2, 0.0, pytest.approx(12e-6))
    # The cache doubles as a recording: replay it (directly, or via a JSONL export) with no cache in front.
    assert ResponseCache(tmp_path / "cache").export_jsonl(tmp_path / "rec.jsonl") == 2
    for replay in (ReplayBackend.from_cache(tmp_path / "cache"), ReplayBackend.from_jsonl(tmp_path / "rec.jsonl")):
        _, a3, b3 = asyncio.run(run(replay, tmp_path / f"fresh-{id(replay)}"))
        assert (a3.content, b3.content) == ("one", "two")
        with pytest.raises(ReplayMiss, match="no recorded response"):
            asyncio.run(LLMClient(replay, model="m").chat([{"role": "user", "content": "new"}]))


class _SlowBackend(Backend):
    def __init__(self):
        self.calls = 0
        self.gate = asyncio.Event()

    async def request(self, endpoint, payload):
        self.calls += 1
        n = self.calls
        await self.gate.wait()
        return chat_response(f"answer {n}", prompt_tokens=1, completion_tokens=1)


def test_identical_requests_in_flight_are_sent_once():
    async def main():
        backend = _SlowBackend()
        client = LLMClient(backend, model="m")
        tasks = [asyncio.create_task(client.chat(MSG)) for _ in range(3)]
        other = asyncio.create_task(client.chat(MSG, seed=1))
        await asyncio.sleep(0.01)
        backend.gate.set()
        rs = await asyncio.gather(*tasks, other)
        return backend, client, rs

    backend, client, rs = asyncio.run(main())
    assert backend.calls == 2
    assert [r.content for r in rs[:3]] == ["answer 1"] * 3 and rs[3].content == "answer 2"
    assert [r.cached for r in rs[:3]] == [False, True, True]
    assert client.usage.model("m").requests == 2 and client.usage.model("m").cached_requests == 2


def test_a_cancelled_sender_does_not_fail_its_waiters():
    async def main():
        backend = _SlowBackend()
        client = LLMClient(backend, model="m")
        first = asyncio.create_task(client.chat(MSG))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(client.chat(MSG))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0.01)
        backend.gate.set()
        return backend, await waiter, first

    backend, reply, first = asyncio.run(main())
    assert first.cancelled() and reply.content == "answer 2" and backend.calls == 2


def test_client_argument_errors():
    client = LLMClient(ReplayBackend(script=["x"]))
    with pytest.raises(ValueError, match="no model"):
        asyncio.run(client.chat(MSG))
    with pytest.raises(ValueError, match="stream"):
        asyncio.run(client.chat(MSG, model="m", stream=True))
    r = asyncio.run(LLMClient(ReplayBackend(script=["plain text"]), model="m").complete("p"))
    assert r.text == "plain text"
