"""Issue 13 through HTTP: each hostile request gets a 4xx (or its own error) and never changes another's output."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

MODEL = "toy-k2"
HELLO = [{"role": "user", "content": "Hello"}]


def _headers(server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}


def _post(server, path: str, body=None, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers=_headers(server), timeout=60)


def _error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param != "any":
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("extreme", [{"temperature": 1e-300}, {"top_p": 1e-46},
                                     {"temperature": 1e-300, "top_p": 1e-46}])
def test_extreme_sampling_values_are_greedy(server, extreme):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 8}
    greedy = _post(server, "/v1/chat/completions", {**body, "temperature": 0}).json()
    r = _post(server, "/v1/chat/completions", {**body, **extreme, "seed": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == greedy["choices"][0]["message"]
    # Streamed: a normal stream, no error event.
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=_headers(server), timeout=60,
                      json={**body, **extreme, "stream": True}) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert s.status_code == 200 and lines[-1] == "data: [DONE]"
    assert not any('"error"' in ln for ln in lines)


def test_tool_schema_type_not_a_string(server):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": {}}}}
    _error(_post(server, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "tools": [tool]}), 400,
           "tools[0].function.parameters.type")
    tool["function"]["parameters"] = {"type": "object", "properties": {"x": {"type": [[]]}}}
    _error(_post(server, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "tools": [tool]}), 400)


def test_deeply_nested_bodies(server):
    _error(_post(server, "/v1/chat/completions", raw=b"[" * 100_000), 400)
    _error(_post(server, "/v1/completions", raw=b'{"model": "toy-k2", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
           400)
    deep: object = "x"
    for _ in range(600):
        deep = {"a": deep}
    history = [*HELLO, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    err = _error(_post(server, "/v1/chat/completions", {"model": MODEL, "messages": history}), 400)
    assert "nested deeper" in err["message"]
    # The same depth inside a JSON *string* is text: it must not crash the renderer either.
    history[1]["tool_calls"][0]["function"]["arguments"] = "[" * 5000 + "]" * 5000
    r = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": history, "max_tokens": 2})
    assert r.status_code in (200, 400), r.text


def test_lone_surrogates(server):
    raw = b'{"model": "toy-k2", "prompt": "ab\\ud800cd", "max_tokens": 2}'
    _error(_post(server, "/v1/completions", raw=raw), 400, "prompt")
    raw = b'{"model": "toy-k2", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'
    _error(_post(server, "/v1/chat/completions", raw=raw), 400, "messages.0.content")
    _error(_post(server, "/v1/completions", raw=b'{"model": "toy-k2", "prompt": "x", "max_tokens": NaN}'), 400)


@pytest.mark.parametrize("seed", [1e23, 10**23, -(10**20)])
def test_bad_seed_is_refused_before_the_stream(server, seed):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 1.0, "seed": seed, "stream": True}
    _error(_post(server, "/v1/completions", body), 400, "seed")


def test_largest_seed_streams(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 1.0, "seed": 2**63 - 1, "n": 3,
            "stream": True}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200 and '"error"' not in r.text and r.text.rstrip().endswith("data: [DONE]")


def test_a_request_that_can_never_fit_is_a_400_not_a_503(server):
    err = _error(_post(server, "/v1/completions", {"model": MODEL, "prompt": ["x"] * 300, "n": 16, "max_tokens": 1}),
                 400, "n")
    assert "4096" in err["message"]


def test_405_has_allow(server):
    r = httpx.get(f"{server.url}/v1/chat/completions", headers=_headers(server), timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["message"]
    r = httpx.delete(f"{server.url}/v1/models", headers=_headers(server), timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "GET"


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/completions", "logprobs", False),
    ("/v1/completions", "max_tokens", "2"),
    ("/v1/completions", "stream", "false"),
    ("/v1/completions", "seed", True),
    ("/v1/completions", "n", 1.0),
    ("/v1/completions", "echo", 1),
    ("/v1/completions", "prompt", [1, True]),
    ("/v1/chat/completions", "max_tokens", "2"),
    ("/v1/chat/completions", "stream", "false"),
    ("/v1/chat/completions", "seed", True),
    ("/v1/chat/completions", "logprobs", 1),
    ("/v1/chat/completions", "temperature", "0.5"),
    ("/v1/chat/completions", "top_logprobs", 1.5),
])
def test_wrong_json_types_are_rejected(server, path, field, value):
    body = {"model": MODEL, "max_tokens": 2}
    body.update({"prompt": "Hello"} if path == "/v1/completions" else {"messages": HELLO})
    body[field] = value
    err = _error(_post(server, path, body), 400)
    assert err["param"].startswith(field)


def test_nulls_mean_defaults(server):
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stop", "seed", "stream", "logprobs", "logit_bias",
                           "presence_penalty", "frequency_penalty", "stream_options", "top_logprobs"])
    r = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 2, **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None


def test_special_tokens_are_skipped_unless_asked_for(server, bundle):
    bos = bundle.tokenizer.bos_id
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "temperature": 0, "logit_bias": {str(bos): 100}}
    r = _post(server, "/v1/chat/completions", body).json()
    assert r["choices"][0]["message"]["content"] == "" and r["usage"]["completion_tokens"] == 3
    kept = _post(server, "/v1/chat/completions", {**body, "skip_special_tokens": False}).json()
    assert kept["choices"][0]["message"]["content"] == "[BOS]" * 3
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": [bos, *bundle.tokenizer.encode("Hi")],
                                          "max_tokens": 0, "echo": True}).json()
    assert r["choices"][0]["text"] == "Hi"


def test_hostile_requests_in_a_batch_change_nothing(server, monkeypatch):
    """Normal requests (greedy and seeded sampling) return exactly what they return alone, while hostile ones
    (including one whose sampling raises inside the engine) land in the middle of their batch."""
    from openk2.serve import engine as engine_mod

    real_sample = engine_mod.sample_token
    calls = {"n": 0}

    def poisoned(logits_V, temperature, top_p, generator):
        if temperature == 0.777:  # marks the request whose sampling fails inside the engine, mid-generation
            calls["n"] += 1
            if calls["n"] == 5:
                raise FloatingPointError("poisoned sample")
        return real_sample(logits_V, temperature, top_p, generator)

    monkeypatch.setattr(engine_mod, "sample_token", poisoned)
    normal = [{"model": MODEL, "prompt": f"the weather {w}", "max_tokens": 12, "temperature": t, "seed": 11}
              for w, t in [("in", 0), ("Paris", 1.3), ("is", 0), ("sunny", 0.8)]]
    hostile = [
        {"model": MODEL, "prompt": "x y z", "max_tokens": 30, "temperature": 0.777, "ignore_eos": True},
        {"model": MODEL, "prompt": "x", "max_tokens": 20, "temperature": 1e-300, "ignore_eos": True},
        {"model": MODEL, "prompt": "x", "max_tokens": 20, "top_p": 1e-46, "ignore_eos": True},
        {"model": MODEL, "prompt": ["x"] * 300, "n": 16},
        {"model": MODEL, "prompt": "x", "seed": 1e23, "stream": True},
    ]

    def text(r: httpx.Response) -> list[str]:
        assert r.status_code == 200, r.text
        return [c["text"] for c in r.json()["choices"]]

    alone = [text(_post(server, "/v1/completions", b)) for b in normal]

    async def together():
        async with httpx.AsyncClient(base_url=server.url, headers=_headers(server), timeout=120) as ac:
            bodies = [normal[0], normal[1], *hostile[:3], normal[2], *hostile[3:], normal[3]]
            return await asyncio.gather(*(ac.post("/v1/completions", json=b) for b in bodies))

    rs = asyncio.run(together())
    got_normal = [text(rs[i]) for i in (0, 1, 5, 8)]
    assert got_normal == alone
    poisoned_r = rs[2]
    assert poisoned_r.status_code == 500 and "poisoned sample" in poisoned_r.json()["error"]["message"]
    assert rs[3].status_code == rs[4].status_code == 200
    assert rs[6].status_code == rs[7].status_code == 400


def test_overload_is_a_503_with_retry_after_and_limits_are_400s(server, monkeypatch):
    from openk2.serve.engine import Engine

    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "n": 16}
    monkeypatch.setattr(Engine, "n_waiting", property(lambda self: self.max_waiting - 8))  # a full queue, for now
    r = _post(server, "/v1/completions", body)
    assert _error(r, 503)["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
    monkeypatch.undo()
    assert _post(server, "/v1/completions", body).status_code == 200
    bias = {str(i): 1 for i in range(301)}
    _error(_post(server, "/v1/completions", {**body, "logit_bias": bias}), 400, "logit_bias")


def test_an_engine_error_after_the_first_byte_is_an_error_event(server, monkeypatch):
    from openk2.serve import engine as engine_mod

    real_sample = engine_mod.sample_token
    calls = {"n": 0}

    def poisoned(logits_V, temperature, top_p, generator):
        if temperature == 0.777:
            calls["n"] += 1
            if calls["n"] == 4:
                raise FloatingPointError("poisoned sample")
        return real_sample(logits_V, temperature, top_p, generator)

    monkeypatch.setattr(engine_mod, "sample_token", poisoned)
    body = {"model": MODEL, "prompt": "the weather", "max_tokens": 20, "temperature": 0.777, "ignore_eos": True,
            "seed": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=_headers(server), json=body, timeout=60) as s:
        events = [ln[len("data: "):] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert s.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "poisoned sample" in error["message"] and error["type"] == "server_error"
    assert any(json.loads(e).get("choices") for e in events[:-2])  # tokens came before the error
