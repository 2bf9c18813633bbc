"""Tool-call parsers by family: the registry, DeepSeek-V3's format (round trip through its template), forced
prefixes, and malformed output reported rather than raised."""

from __future__ import annotations

import json

import pytest

from openk2.data.chat_template import ChatTemplate
from openk2.data.tool_parsers import (
    DSV3_CALL_BEGIN,
    DSV3_CALL_END,
    DSV3_CALLS_BEGIN,
    DSV3_CALLS_END,
    DSV3_SEP,
    TOOL_PARSERS,
    get_tool_parser,
)
from openk2.data.toolcall import render_tool_calls
from openk2.serve.testing_checkpoints import DEEPSEEK_V3_TEMPLATE

DS = get_tool_parser("deepseek_v3")
K2 = get_tool_parser("kimi_k2")


def _ds_call(name: str, arguments: str, kind: str = "function") -> str:
    return f"{DSV3_CALL_BEGIN}{kind}{DSV3_SEP}{name}\n```json\n{arguments}\n```{DSV3_CALL_END}"


def test_registry_names_and_unknown_name():
    assert sorted(TOOL_PARSERS) == ["deepseek_v3", "kimi_k2"]
    with pytest.raises(ValueError, match="unknown tool-call parser 'x'; valid: deepseek_v3, kimi_k2"):
        get_tool_parser("x")


def test_deepseek_round_trip_through_its_template():
    """What the template renders for an assistant turn with calls parses back to the same calls."""
    calls = [{"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Köln"}}},
             {"id": "b", "type": "function", "function": {"name": "search", "arguments": '{"q": "x\\ny", "n": 2}'}}]
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": calls}]
    text = ChatTemplate(DEEPSEEK_V3_TEMPLATE, {"bos_token": ""}).render(messages, add_generation_prompt=False)
    turn = text.split("<｜Assistant｜>", 1)[1].removesuffix("<｜end▁of▁sentence｜>")
    out = DS.parse(turn, first_index=3)
    assert out.error is None and out.content == "Let me check."
    assert [(c.id, c.name, json.loads(c.arguments)) for c in out.tool_calls] == [
        ("functions.get_weather:3", "get_weather", {"city": "Köln"}),
        ("functions.search:4", "search", {"q": "x\ny", "n": 2})]


def test_deepseek_plain_text_and_malformed_output():
    assert DS.parse("Just text.").tool_calls == [] and DS.parse("Just text.").error is None
    good = _ds_call("f", "{}")
    cases = [
        (DSV3_CALLS_BEGIN + good + _ds_call("g", "{'x': 1}") + DSV3_CALLS_END, 1, "not valid JSON"),
        (DSV3_CALLS_BEGIN + good + _ds_call("g", "[1]") + DSV3_CALLS_END, 1, "not an object"),
        (DSV3_CALLS_BEGIN + good, 1, "missing <｜tool▁calls▁end｜>"),
        (DSV3_CALLS_BEGIN + good + f'{DSV3_CALL_BEGIN}function{DSV3_SEP}g\n```json\n{{"x": ', 1, "unterminated"),
        (DSV3_CALLS_BEGIN + f"{DSV3_CALL_BEGIN}no separator{DSV3_CALL_END}" + DSV3_CALLS_END, 0, "malformed"),
        (good + DSV3_CALLS_END, 1, "without <｜tool▁calls▁begin｜>"),
        (DSV3_CALLS_BEGIN + DSV3_CALLS_END, 0, "without any tool call"),
        (DSV3_CALLS_BEGIN + good + DSV3_CALLS_END + "more", 1, "text after"),
    ]
    for text, n_calls, error in cases:
        out = DS.parse(text)
        assert len(out.tool_calls) == n_calls, text
        assert out.error is not None and error in out.error, (text, out.error)


def test_forced_prefixes():
    assert "".join(t for t, _ in DS.forced_prefix(None, 0)) == DSV3_CALLS_BEGIN
    named = DS.forced_prefix("get_weather", 2)
    expected = f"{DSV3_CALLS_BEGIN}{DSV3_CALL_BEGIN}function{DSV3_SEP}get_weather\n```json\n"
    assert "".join(t for t, _ in named) == expected
    assert [t for t, special in named if special] == [DSV3_CALLS_BEGIN, DSV3_CALL_BEGIN, DSV3_SEP]
    # A forced call the model completed up to the call end parses once the suffix closes it.
    out = DS.parse("".join(t for t, _ in named) + '{"city": "Paris"}\n```' + DS.named_suffix, first_index=2)
    assert out.error is None and out.tool_calls[0].id == "functions.get_weather:2"
    k2 = "".join(t for t, _ in K2.forced_prefix("get_weather", 1))
    out = K2.parse(k2 + '{"city": "Paris"}' + K2.named_suffix)
    assert out.error is None and out.tool_calls[0].id == "functions.get_weather:1"
    call = {"id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert K2.parse(render_tool_calls([call])).tool_calls[0].name == "f"
