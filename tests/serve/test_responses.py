"""`/v1/responses` driven by the official `openai` client: text, tool-call round trips, streaming, the store."""

from __future__ import annotations

import json

import httpx
import pytest

from openk2.serve.testing import SYSTEM, WEATHER_TOOL

openai = pytest.importorskip("openai")
MODEL = "toy-k2"
TOOL = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
ASK = "What is the weather in Paris?"


def test_text_input_and_instructions(client):
    r = client.responses.create(model=MODEL, instructions=SYSTEM, input="Hello", temperature=0)
    assert r.status == "completed" and r.output_text == "Hi there!"
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage.output_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert client.responses.retrieve(r.id).output_text == "Hi there!"
    # The same dialog as items, with content parts.
    items = [{"role": "system", "content": SYSTEM},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}]
    assert client.responses.create(model=MODEL, input=items, temperature=0).output_text == "Hi there!"
    short = client.responses.create(model=MODEL, instructions=SYSTEM, input="Hello", temperature=0,
                                    max_output_tokens=1)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"


def test_tool_call_round_trip(client):
    first = client.responses.create(model=MODEL, instructions=SYSTEM, input=ASK, tools=[TOOL], temperature=0)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    # Continued from the store ...
    second = client.responses.create(model=MODEL, instructions=SYSTEM, previous_response_id=first.id,
                                     input=[result], tools=[TOOL], temperature=0)
    assert second.output_text == "It is sunny in Paris." and second.previous_response_id == first.id
    # ... and statelessly, with the whole conversation as items (the client may rename call ids).
    items = [{"role": "user", "content": ASK},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": call.arguments},
             {**result, "call_id": "call_1"}]
    third = client.responses.create(model=MODEL, instructions=SYSTEM, input=items, tools=[TOOL], temperature=0,
                                    store=False)
    assert third.output_text == "It is sunny in Paris."
    # BFCL's OpenAI Responses handler feeds the SDK's output objects back as input, with store: false.
    bfcl = client.responses.create(model=MODEL, instructions=SYSTEM, temperature=0, store=False, tools=[TOOL],
                                   input=[{"role": "user", "content": ASK}, *first.output, result],
                                   include=["reasoning.encrypted_content"], reasoning={"summary": "auto"})
    assert bfcl.output_text == "It is sunny in Paris."
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(third.id)  # store: false


def test_streamed_reply(client):
    with client.responses.stream(model=MODEL, instructions=SYSTEM, input="Hello", temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hi there!"
    assert final.output_text == "Hi there!" and final.usage.output_tokens > 0
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_streamed_tool_call(client):
    events = list(client.responses.create(model=MODEL, instructions=SYSTEM, input=ASK, tools=[TOOL],
                                          temperature=0, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Paris"}
    final = events[-1].response
    assert final.output[0].type == "function_call" and final.output[0].name == "get_weather"
    assert not any(e.type == "response.output_text.delta" for e in events)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "Hello", "previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, None),
    ({"input": "Hello", "tools": [{"type": "web_search"}]}, None),
    ({"input": "Hello", "text": {"format": {"type": "json_schema"}}}, None),
    ({"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]}, "input"),
    ({"input": "Hello", "max_output_tokens": 10_000}, "max_output_tokens"),
    ({"input": "Hello", "tools": [{"type": "function", "name": "f", "parameters": {"type": {}}}]},
     "tools[0].parameters.type"),
    ({"input": "Hello", "max_output_tokens": "5"}, "max_output_tokens"),
    ({"input": [{"type": "reasoning", "summary": []}]}, None),
])
def test_bad_responses_requests(server, body, param):
    r = httpx.post(f"{server.base_url}/responses", json={"model": MODEL, **body}, timeout=30,
                   headers={"Authorization": f"Bearer {server.api_key}"})
    assert r.status_code == 400, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param


def test_the_store_is_bounded(client, server, monkeypatch):
    api = server.server.config.app.state.responses
    monkeypatch.setattr(api, "store_size", 2)
    ids = [client.responses.create(model=MODEL, input="Hello", max_output_tokens=1, temperature=0).id
           for _ in range(3)]
    assert len(api._store) <= 2
    with pytest.raises(openai.BadRequestError, match="previous_response_id|not found"):
        client.responses.create(model=MODEL, input="Hi", previous_response_id=ids[0], max_output_tokens=1)
    client.responses.create(model=MODEL, input="Hi", previous_response_id=ids[2], max_output_tokens=1)
