"""The HTTP backend (retries, backoff, concurrency, timeouts) and the in-process backend."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from openk2.llm import LLMClient, LLMError, OpenAIHTTPBackend, ResponseCache, chat_response
from openk2.llm.local import LocalBackend

MSG = [{"role": "user", "content": "the weather"}]


def _backend(handler, **kw):
    sleeps: list[float] = []

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    b = OpenAIHTTPBackend("http://llm.invalid/v1", api_key="k", transport=httpx.MockTransport(handler),
                          sleep=fake_sleep, seed=0, **kw)
    return b, sleeps


def test_retries_429_5xx_and_timeouts_then_succeeds():
    answers = iter([
        httpx.Response(429, headers={"Retry-After": "2"}, json={"error": {"message": "slow down"}}),
        httpx.Response(500, text="oops"),
        httpx.ReadTimeout("slow"),
        httpx.ConnectError("refused"),
        httpx.Response(200, json=chat_response("ok")),
    ])
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers["authorization"]))
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    b, sleeps = _backend(handler, max_retries=5, backoff_base=0.5)
    r = asyncio.run(LLMClient(b, model="m").chat(MSG))
    assert r.content == "ok" and b.attempts == 5
    assert seen[0] == ("http://llm.invalid/v1/chat/completions", "Bearer k")
    assert len(sleeps) == 4 and sleeps[0] >= 2.0  # Retry-After is honoured
    assert all(0 <= s <= 60 for s in sleeps)


def test_client_errors_fail_fast_and_retries_run_out():
    b, sleeps = _backend(lambda r: httpx.Response(400, json={"error": {"message": "bad role"}}))
    with pytest.raises(LLMError) as e:
        asyncio.run(b.request("chat/completions", {"model": "m"}))
    assert (e.value.status, e.value.message, e.value.retryable, b.attempts, sleeps) == (400, "bad role", False, 1, [])

    b, sleeps = _backend(lambda r: httpx.Response(503, text="busy"), max_retries=3, backoff_base=1.0)
    with pytest.raises(LLMError) as e:
        asyncio.run(b.request("chat/completions", {"model": "m"}))
    assert e.value.status == 503 and b.attempts == 4 and len(sleeps) == 3
    assert all(s <= 1.0 * 2**i for i, s in enumerate(sleeps))  # full jitter under the exponential cap


def test_concurrency_limit():
    state = {"now": 0, "max": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        return httpx.Response(200, json=chat_response("x"))

    b, _ = _backend(handler, max_concurrency=3)

    async def main():
        client = LLMClient(b, model="m")
        await asyncio.gather(*(client.chat(MSG, seed=i) for i in range(12)))
        await client.aclose()

    asyncio.run(main())
    assert state["max"] == 3 and b.attempts == 12


def test_http_backend_against_the_real_server(llm_server, tmp_path):
    async def main():
        backend = OpenAIHTTPBackend(llm_server.base_url, api_key="secret", max_retries=0)
        async with LLMClient(backend, model="tiny-random", cache=ResponseCache(tmp_path)) as client:
            chat = await client.chat(MSG, temperature=0, max_tokens=5)
            comp = await client.complete("the weather", max_tokens=0, echo=True, logprobs=1)
            with pytest.raises(LLMError) as bad:
                await client.chat(MSG, max_tokens=0)
            again = await client.chat(MSG, temperature=0, max_tokens=5)
            return chat, comp, bad.value, again, client.usage.summary()

    chat, comp, bad, again, usage = asyncio.run(main())
    assert chat.finish_reason in ("stop", "length") and chat.usage.completion_tokens >= 1
    assert comp.text == "the weather" and comp.logprobs["token_logprobs"][0] is None
    assert bad.status == 400 and not bad.retryable
    assert again.cached and again.raw == chat.raw
    assert usage["total"]["requests"] == 2 and usage["total"]["cached_requests"] == 1


def test_request_timeout_on_a_real_server(llm_server):
    async def main():
        backend = OpenAIHTTPBackend(llm_server.base_url, api_key="secret", max_retries=0, timeout=0.2)
        try:
            await backend.request("completions", {"model": "tiny-random", "prompt": "x", "max_tokens": 480,
                                                  "ignore_eos": True})
        finally:
            await backend.aclose()

    with pytest.raises(LLMError, match="timeout") as e:
        asyncio.run(main())
    assert e.value.retryable


def test_local_backend_matches_http(llm_server, llm_service, llm_model_dir):
    async def both():
        http = LLMClient(OpenAIHTTPBackend(llm_server.base_url, api_key="secret"), model="tiny-random")
        local = LLMClient(LocalBackend(llm_service), model="tiny-random")  # shares the server's engine
        kw = dict(temperature=0.8, seed=3, max_tokens=12, n=2)
        pairs = await asyncio.gather(http.chat(MSG, **kw), local.chat(MSG, **kw),
                                     http.complete("the weather", max_tokens=6, temperature=0),
                                     local.complete("the weather", max_tokens=6, temperature=0))
        with pytest.raises(LLMError) as e:
            await local.chat(MSG, model="other")
        await http.aclose()
        await local.aclose()
        return pairs, e.value

    (h_chat, l_chat, h_comp, l_comp), err = asyncio.run(both())
    assert [c["message"] for c in h_chat.choices] == [c["message"] for c in l_chat.choices]
    assert h_chat.raw["usage"] == l_chat.raw["usage"]
    assert h_comp.text == l_comp.text
    assert err.status == 404
    assert llm_service.engine.running  # a LocalBackend that does not own the engine leaves it running

    async def owned():
        backend = LocalBackend.from_model_dir(llm_model_dir, device="cpu", max_batch=2)
        r = await LLMClient(backend, model="tiny-random").complete("the weather", max_tokens=6, temperature=0)
        await backend.aclose()
        return r, backend

    r, backend = asyncio.run(owned())
    assert r.text == h_comp.text and not backend.service.engine.running
