"""Bad input gets a 4xx with an OpenAI error body, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

MODEL = "toy-k2"
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture()
def post(server):
    def _post(path: str, body=None, *, raw: bytes | None = None, key: str | None = "default", method="POST"):
        headers = {"Content-Type": "application/json"}
        if key == "default":
            key = server.api_key
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        content = raw if raw is not None else httpx.Request("POST", "http://x", json=body).content
        return httpx.request(method, f"{server.url}{path}", content=content, headers=headers, timeout=30)

    return _post


def _chat(**overrides):
    body = dict(GOOD_CHAT)
    body.update(overrides)
    return body


def _tool(**function):
    return {"type": "function", "function": function}


BAD_CHAT = {
    "missing model": ({k: v for k, v in GOOD_CHAT.items() if k != "model"}, 400, "model"),
    "missing messages": ({"model": MODEL}, 400, "messages"),
    "empty messages": (_chat(messages=[]), 400, "messages"),
    "bad role": (_chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role"),
    "user without content": (_chat(messages=[{"role": "user"}]), 400, "messages[0].content"),
    "image part": (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                   400, None),
    "tool message without call": (_chat(messages=[{"role": "user", "content": "x"},
                                                  {"role": "tool", "tool_call_id": "call_1", "content": "r"}]), 400,
                                  "messages"),
    "tool message without id": (_chat(messages=[{"role": "tool", "content": "r"}]), 400, "messages[0]"),
    "max_tokens 0": (_chat(max_tokens=0), 400, "max_tokens"),
    "max_tokens negative": (_chat(max_tokens=-5), 400, "max_tokens"),
    "max_tokens beyond context": (_chat(max_tokens=100_000), 400, "max_tokens"),
    "max_completion_tokens 0": (_chat(max_tokens=None, max_completion_tokens=0), 400, "max_tokens"),
    "prompt beyond context": (_chat(messages=[{"role": "user", "content": "weather " * 600}]), 400, "messages"),
    "n 0": (_chat(n=0), 400, "n"),
    "n too big": (_chat(n=1000), 400, "n"),
    "temperature": (_chat(temperature=3.5), 400, "temperature"),
    "top_p 0": (_chat(top_p=0), 400, "top_p"),
    "top_logprobs too many": (_chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    "top_logprobs without logprobs": (_chat(top_logprobs=2), 400, "top_logprobs"),
    "too many stops": (_chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    "empty stop": (_chat(stop=[""]), 400, "stop"),
    "logit_bias key": (_chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    "logit_bias id": (_chat(logit_bias={"999999": 1}), 400, "logit_bias"),
    "logit_bias value": (_chat(logit_bias={"5": 500}), 400, "logit_bias"),
    "penalties": (_chat(presence_penalty=0.5), 400, "presence_penalty"),
    "json mode": (_chat(response_format={"type": "json_object"}), 400, "response_format"),
    "tool not a function": (_chat(tools=[{"type": "retrieval"}]), 400, "tools[0].type"),
    "tool without function": (_chat(tools=[{"type": "function"}]), 400, "tools[0].function"),
    "tool bad name": (_chat(tools=[_tool(name="get weather!")]), 400, "tools[0].function.name"),
    "tool duplicate name": (_chat(tools=[TOOL, TOOL]), 400, "tools[1].function.name"),
    "tool parameters not object": (_chat(tools=[_tool(name="f", parameters="a string")]), 400,
                                   "tools[0].function.parameters"),
    "tool parameters array": (_chat(tools=[_tool(name="f", parameters={"type": "array"})]), 400,
                              "tools[0].function.parameters.type"),
    "tool bad type": (_chat(tools=[_tool(name="f", parameters={"type": "object",
                                                               "properties": {"x": {"type": "strin"}}})]), 400,
                      "tools[0].function.parameters.properties.x.type"),
    "tool required unknown": (_chat(tools=[_tool(name="f", parameters={"type": "object", "properties": {},
                                                                       "required": ["x"]})]), 400,
                              "tools[0].function.parameters.required"),
    "tool_choice unknown name": (_chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}),
                                 400, "tool_choice"),
    "tool_choice bad string": (_chat(tools=[TOOL], tool_choice="always"), 400, "tool_choice"),
    "tool_choice required without tools": (_chat(tool_choice="required"), 400, "tool_choice"),
    "unknown model": (_chat(model="gpt-4"), 404, "model"),
}


@pytest.mark.parametrize("case", list(BAD_CHAT))
def test_bad_chat_requests(post, case):
    body, status, param = BAD_CHAT[case]
    r = post("/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize(("raw", "status"), [
    (b"{not json", 400), (b"", 400), (b"[1, 2]", 400), (b"\xff\xfe", 400), (b'"a string"', 400),
])
def test_malformed_bodies(post, raw, status):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = post(path, raw=raw)
        assert r.status_code == status
        assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),  # 0 only with echo (scoring)
    ({"model": MODEL, "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "weather " * 600}, 400, "prompt"),
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL, "prompt": [[]]}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1, 2, 99999]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": MODEL, "prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ({"model": MODEL, "prompt": {"a": 1}}, 400, "prompt"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
])
def test_bad_completion_requests(post, body, status, param):
    r = post("/v1/completions", body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param or param == "prompt" and r.json()["error"]["param"].startswith("prompt")


def test_auth_routes_and_methods(post, server):
    assert post("/v1/chat/completions", GOOD_CHAT, key=None).status_code == 401
    r = post("/v1/chat/completions", GOOD_CHAT, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    r = post("/v1/embeddings", {"model": MODEL, "input": "x"})
    assert r.status_code == 404 and "error" in r.json()
    r = post("/v1/chat/completions", method="GET", raw=b"")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(f"{server.url}/v1/models/nope", headers={"Authorization": f"Bearer {server.api_key}"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # health needs no key


def test_server_still_serves_after_bad_input(post):
    r = post("/v1/chat/completions", GOOD_CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["usage"]["completion_tokens"] == 2 and body["choices"][0]["finish_reason"] == "length"
    r = post("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 0, "echo": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello"
