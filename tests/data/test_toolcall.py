"""openk2.data.toolcall: K2 call ids, rendering, robust parsing of model output, id renumbering."""

from __future__ import annotations

import copy
import json
import random

import pytest

from openk2.data.toolcall import (
    TOOL_CALL_PATTERN,
    ParsedOutput,
    ToolCall,
    format_tool_call_id,
    parse_assistant_output,
    render_tool_calls,
    renumber_tool_call_ids,
)

B, E = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call(call_id: str, args: str) -> str:
    return f"{CB}{call_id}{AB}{args}{CE}"


def test_format_tool_call_id():
    assert format_tool_call_id("get_weather", 0) == "functions.get_weather:0"
    assert format_tool_call_id("ns.tool_2", 17) == "functions.ns.tool_2:17"
    for bad_name in ["get-weather", "has space", ""]:
        with pytest.raises(ValueError):
            format_tool_call_id(bad_name, 0)
    with pytest.raises(ValueError):
        format_tool_call_id("f", -1)


def test_render_tool_calls():
    calls = [
        {"id": "functions.a:0", "type": "function", "function": {"name": "a", "arguments": {"x": 1, "s": "ü"}}},
        ToolCall(id="functions.b:1", name="b", arguments='{"y":2}'),
    ]
    assert render_tool_calls(calls) == (
        B + call("functions.a:0", '{"x": 1, "s": "ü"}') + call("functions.b:1", '{"y":2}') + E)
    with pytest.raises(ValueError):
        render_tool_calls([{"function": {"name": "a", "arguments": "{}"}}])


def test_parse_well_formed_round_trip():
    calls = [ToolCall("functions.get_weather:0", "get_weather", '{"city": "Köln"}'),
             ToolCall("functions.search:1", "search", '{\n  "q": "a b",\n  "n": [1, 2]\n}')]
    text = "Let me look.\n" + render_tool_calls(calls) + "<|im_end|>"
    out = parse_assistant_output(text)
    assert out == ParsedOutput(content="Let me look.\n", tool_calls=calls, error=None)
    assert out.to_message() == {"role": "assistant", "content": "Let me look.\n",
                                "tool_calls": [c.to_openai() for c in calls]}


def test_parse_tolerates_whitespace_like_release_regex():
    text = f"{B}\n{CB} functions.f:3 \n{AB}  {{\"a\": 1}}  \n{CE}\n{E}"
    out = parse_assistant_output(text)
    assert out.error is None
    assert out.tool_calls == [ToolCall("functions.f:3", "f", '{"a": 1}')]
    # The release regex finds the same call.
    assert [m["tool_call_id"] for m in TOOL_CALL_PATTERN.finditer(text)] == ["functions.f:3"]


def test_parse_plain_content():
    assert parse_assistant_output("Just text.") == ParsedOutput("Just text.", [], None)
    assert parse_assistant_output("Just text.<|im_end|>") == ParsedOutput("Just text.", [], None)
    out = parse_assistant_output("Done.<|im_end|>garbage")
    assert out.content == "Done." and "after <|im_end|>" in out.error


@pytest.mark.parametrize(
    ("text", "n_calls", "error_part"),
    [
        # truncated: no section end
        (B + call("functions.a:0", "{}"), 1, "missing <|tool_calls_section_end|>"),
        # truncated inside the arguments of the second call; the first survives
        (B + call("functions.a:0", "{}") + f'{CB}functions.b:1{AB}{{"x": ', 1, "unterminated tool call"),
        # bad JSON arguments
        (B + call("functions.a:0", "{'x': 1}") + call("functions.b:1", "{}") + E, 1, "not valid JSON"),
        # JSON that is not an object
        (B + call("functions.a:0", "[1, 2]") + E, 0, "not an object"),
        # ids the release regex rejects
        (B + call("get weather", "{}") + E, 0, "malformed tool call id"),
        (B + call("functions.a", "{}") + E, 0, "malformed tool call id"),
        # id without the functions. prefix: recovered, but reported
        (B + call("a:0", "{}") + E, 1, "lacks the 'functions.' prefix"),
        # missing argument begin
        (B + f"{CB}functions.a:0 {{}}{CE}" + E, 0, "without <|tool_call_argument_begin|>"),
        # missing section begin
        ("text " + call("functions.a:0", "{}") + E, 1, "without <|tool_calls_section_begin|>"),
        # section with no calls
        (B + E, 0, "without any <|tool_call_begin|>"),
        # stray text inside the section and after it
        (B + "oops" + call("functions.a:0", "{}") + E + "tail", 1, "unexpected text in the tool-calls section"),
        (B + call("functions.a:0", "{}") + "junk" + E, 1, "unexpected text after tool call"),
        (B + call("functions.a:0", "{}") + E + "tail", 1, "text after <|tool_calls_section_end|>"),
        # duplicate ids
        (B + call("functions.a:0", "{}") + call("functions.a:0", '{"b": 1}') + E, 2, "duplicate tool call ids"),
        # argument begin twice
        (B + f"{CB}functions.a:0{AB}{{}}{AB}{{}}{CE}" + E, 0, "contain a tool-call marker"),
        # nested section
        (B + B + call("functions.a:0", "{}") + E, 1, "nested"),
    ],
)
def test_parse_malformed(text, n_calls, error_part):
    out = parse_assistant_output(text)
    assert out.error is not None and error_part in out.error, out.error
    assert len(out.tool_calls) == n_calls
    for c in out.tool_calls:
        assert isinstance(json.loads(c.arguments), dict)  # whatever is returned is usable


def test_parse_keeps_content_before_section_and_reports_every_problem():
    text = "Thinking out loud " + B + call("functions.a:0", "{bad") + call("functions.b:1", '{"ok": true}')
    out = parse_assistant_output(text)
    assert out.content == "Thinking out loud "
    assert out.tool_calls == [ToolCall("functions.b:1", "b", '{"ok": true}')]
    assert "not valid JSON" in out.error and "missing <|tool_calls_section_end|>" in out.error


def test_parse_never_raises_on_garbage():
    rng = random.Random(0)
    atoms = [B, E, CB, AB, CE, "<|im_end|>", "functions.", "f", ":", "0", "12", "{", "}", '"a"', ":", " ", "\n",
             "[", "]", "x", "é", "<|", "|>", "functions.get_weather:0", '{"k": "v"}']
    for _ in range(2000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
        out = parse_assistant_output(text)
        assert isinstance(out, ParsedOutput)
        assert out.error is None or isinstance(out.error, str)
        for c in out.tool_calls:
            assert c.id in text and c.arguments in text and isinstance(json.loads(c.arguments), dict)
    assert parse_assistant_output(None).error == "expected str, got NoneType"  # type: ignore[arg-type]
    assert parse_assistant_output(b"bytes").error is not None  # type: ignore[arg-type]


def _tc(call_id, name):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


def test_renumber_tool_call_ids():
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [_tc("call_x", "search"), _tc("call_y", "get_weather")]},
        {"role": "tool", "tool_call_id": "call_y", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_x", "content": "hits"},
        {"role": "assistant", "content": "", "tool_calls": [_tc("call_x", "search")]},  # id reused in a later turn
        {"role": "tool", "tool_call_id": "call_x", "content": "more hits"},
        {"role": "assistant", "content": "done"},
    ]
    snapshot = copy.deepcopy(messages)
    out = renumber_tool_call_ids(messages)
    assert messages == snapshot
    assert [c["id"] for c in out[1]["tool_calls"]] == ["functions.search:0", "functions.get_weather:1"]
    assert out[2]["tool_call_id"] == "functions.get_weather:1"
    assert out[3]["tool_call_id"] == "functions.search:0"
    assert out[4]["tool_calls"][0]["id"] == "functions.search:2"
    assert out[5]["tool_call_id"] == "functions.search:2"
    assert out[6] == messages[6]
    assert renumber_tool_call_ids(out) == out  # idempotent on K2-format ids


def test_renumber_rejects_ambiguous_history():
    with pytest.raises(ValueError, match="answers no earlier"):
        renumber_tool_call_ids([{"role": "tool", "tool_call_id": "call_1", "content": "r"}])
    with pytest.raises(ValueError, match="duplicate"):
        renumber_tool_call_ids([{"role": "assistant", "tool_calls": [_tc("c", "f"), _tc("c", "f")]}])
    with pytest.raises(ValueError, match="does not match"):
        renumber_tool_call_ids([{"role": "assistant", "tool_calls": [_tc("c", "get-weather")]}])
