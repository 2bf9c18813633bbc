"""Kimi K2 tool calls: ids, rendering, a parser for model output, and id renumbering (`k2-recipe.md` §3).

An assistant turn that calls tools is rendered as
`{content}<|tool_calls_section_begin|><|tool_call_begin|>{id}<|tool_call_argument_begin|>{json args}<|tool_call_end|>
...<|tool_calls_section_end|>` with ids `functions.{name}:{idx}`, idx counting every tool call in the dialog from 0.

Arguments: a string is used verbatim (OpenAI messages carry arguments as a JSON string); a dict is written with
`json.dumps(args, ensure_ascii=False)`, i.e. ", " and ": " separators, which is what transformers' `tojson`
filter produces for K2's `{{ arguments | tojson }}`.

The parser never raises: it returns the content, every tool call it could validate, and an `error` string that
lists each problem (for RL format rewards and for agent loops that must tell the model what went wrong).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from openk2.data.tokenizer import (
    IM_END,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
)

# The release parser's regex (MoonshotAI/Kimi-K2 docs/tool_call_guidance.md); DOTALL because arguments are JSON
# that may span lines.
TOOL_CALL_PATTERN = re.compile(
    r"<\|tool_call_begin\|>\s*(?P<tool_call_id>[\w\.]+:\d+)\s*<\|tool_call_argument_begin\|>\s*"
    r"(?P<function_arguments>.*?)\s*<\|tool_call_end\|>",
    re.DOTALL,
)
_NAME_RE = re.compile(r"[\w\.]+")
_ID_PREFIX = "functions."
_MARKERS = (TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END, TOOL_CALL_BEGIN, TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object, as the model wrote it

    def to_openai(self) -> dict[str, Any]:
        """OpenAI chat-completions form, as used in `messages[i]["tool_calls"]`."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedOutput:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None  # None when the output was well formed

    def to_message(self) -> dict[str, Any]:
        """The assistant message to append to the dialog."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


def format_tool_call_id(name: str, idx: int) -> str:
    """K2's call id `functions.{name}:{idx}`.

    Raises ValueError for names the release parse regex (`[\\w\\.]+`) cannot read back, e.g. with "-" or spaces:
    a model trained on such ids could never have its calls parsed.
    """
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"tool name {name!r} does not match [\\w.]+, so its call ids would not parse")
    if idx < 0:
        raise ValueError(f"tool call index must be >= 0, got {idx}")
    return f"{_ID_PREFIX}{name}:{idx}"


def format_arguments(arguments: str | Mapping[str, Any]) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def _call_fields(call: ToolCall | Mapping[str, Any]) -> tuple[str, str]:
    """(id, arguments text) of a ToolCall or an OpenAI-style tool-call dict."""
    if isinstance(call, ToolCall):
        return call.id, call.arguments
    try:
        call_id, arguments = call["id"], call["function"]["arguments"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"tool call needs 'id' and 'function.arguments': {call!r}") from e
    if not call_id:
        raise ValueError(f"tool call has an empty id: {call!r}")
    return str(call_id), format_arguments(arguments)


def tool_call_pieces(calls: Iterable[ToolCall | Mapping[str, Any]]) -> list[tuple[str, bool]]:
    """The tool-calls section as (text, is_special_token) pieces, so a renderer can emit specials as ids."""
    pieces = [(TOOL_CALLS_SECTION_BEGIN, True)]
    for call in calls:
        call_id, arguments = _call_fields(call)
        pieces += [(TOOL_CALL_BEGIN, True), (call_id, False), (TOOL_CALL_ARGUMENT_BEGIN, True), (arguments, False),
                   (TOOL_CALL_END, True)]
    pieces.append((TOOL_CALLS_SECTION_END, True))
    return pieces


def render_tool_calls(calls: Iterable[ToolCall | Mapping[str, Any]]) -> str:
    """The tool-calls section of an assistant turn, from ToolCalls or OpenAI-style tool-call dicts."""
    return "".join(text for text, _ in tool_call_pieces(calls))


def short_repr(s: str, n: int = 40) -> str:
    """`s` quoted for an error message, cut after `n` characters."""
    return repr(s if len(s) <= n else s[:n] + "...")


def _parse_call(chunk: str, errors: list[str]) -> ToolCall | None:
    """One call from the text following a <|tool_call_begin|> (up to the next one or the section end)."""
    m = TOOL_CALL_PATTERN.match(TOOL_CALL_BEGIN + chunk)
    if m is None:
        if TOOL_CALL_END not in chunk:
            errors.append(f"unterminated tool call (truncated output?): {short_repr(chunk)}")
        elif TOOL_CALL_ARGUMENT_BEGIN not in chunk:
            errors.append(f"tool call without <|tool_call_argument_begin|>: {short_repr(chunk)}")
        else:
            bad_id = chunk.split(TOOL_CALL_ARGUMENT_BEGIN, 1)[0].strip()
            errors.append(f"malformed tool call id {short_repr(bad_id)} (expected functions.NAME:IDX)")
        return None
    call_id, arguments = m["tool_call_id"], m["function_arguments"]
    rest = chunk[m.end() - len(TOOL_CALL_BEGIN):]
    if rest.strip():
        errors.append(f"unexpected text after tool call {call_id}: {short_repr(rest.strip())}")
    head = call_id.rsplit(":", 1)[0]
    if head.startswith(_ID_PREFIX):
        name = head[len(_ID_PREFIX):]
    else:
        errors.append(f"tool call id {call_id!r} lacks the 'functions.' prefix")
        name = head
    if not name:
        errors.append(f"tool call id {call_id!r} has an empty function name")
        return None
    if not arguments_ok(call_id, arguments, _MARKERS, errors):
        return None
    return ToolCall(id=call_id, name=name, arguments=arguments)


def arguments_ok(label: str, arguments: str, markers: Sequence[str], errors: list[str]) -> bool:
    """Whether a parsed call's `arguments` text is one JSON object with no tool-call marker in it; if not, the
    reason (naming the call by `label`) is appended to `errors`."""
    if any(marker in arguments for marker in markers):
        errors.append(f"tool call {label} arguments contain a tool-call marker: {short_repr(arguments)}")
        return False
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as e:
        errors.append(f"tool call {label} arguments are not valid JSON ({e.msg} at char {e.pos}): "
                      f"{short_repr(arguments)}")
        return False
    if not isinstance(value, dict):
        errors.append(f"tool call {label} arguments are JSON {type(value).__name__}, not an object")
        return False
    return True


def parse_assistant_output(text: str) -> ParsedOutput:
    """Split a decoded assistant turn (special tokens kept) into content and tool calls. Never raises.

    Accepts the turn with or without its closing <|im_end|>. Calls that fail validation (bad id, bad or
    non-object JSON arguments, truncated) are left out of `tool_calls` and described in `error`; everything
    well formed is returned, so one bad call does not hide the others.
    """
    if not isinstance(text, str):
        return ParsedOutput(content="", error=f"expected str, got {type(text).__name__}")
    errors: list[str] = []
    end = text.find(IM_END)
    if end >= 0:
        if text[end + len(IM_END):].strip():
            errors.append(f"text after <|im_end|> ignored: {short_repr(text[end + len(IM_END):].strip())}")
        text = text[:end]

    begin = text.find(TOOL_CALLS_SECTION_BEGIN)
    if begin >= 0:
        content, section = text[:begin], text[begin + len(TOOL_CALLS_SECTION_BEGIN):]
        stray = [m for m in _MARKERS if m in content]
        if stray:
            errors.append(f"tool-call markers {stray} before <|tool_calls_section_begin|>")
    else:
        # The model skipped the section opener; recover the calls if it still wrote call markers.
        found = [i for i in (text.find(m) for m in _MARKERS) if i >= 0]
        if not found:
            return ParsedOutput(content=text, error="; ".join(errors) or None)
        first = min(found)
        errors.append("tool-call markers without <|tool_calls_section_begin|>")
        content, section = text[:first], text[first:]

    section_end = section.find(TOOL_CALLS_SECTION_END)
    if section_end < 0:
        errors.append("missing <|tool_calls_section_end|> (truncated output?)")
    else:
        trailing = section[section_end + len(TOOL_CALLS_SECTION_END):]
        if trailing.strip():
            errors.append(f"text after <|tool_calls_section_end|> ignored: {short_repr(trailing.strip())}")
        section = section[:section_end]
    if TOOL_CALLS_SECTION_BEGIN in section:
        errors.append("nested <|tool_calls_section_begin|>")
        section = section.replace(TOOL_CALLS_SECTION_BEGIN, "")

    chunks = section.split(TOOL_CALL_BEGIN)
    if chunks[0].strip():
        errors.append(f"unexpected text in the tool-calls section: {short_repr(chunks[0].strip())}")
    calls = [c for c in (_parse_call(chunk, errors) for chunk in chunks[1:]) if c is not None]
    if len(chunks) == 1:
        errors.append("tool-calls section without any <|tool_call_begin|>")
    ids = [c.id for c in calls]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        errors.append(f"duplicate tool call ids {dupes}")
    return ParsedOutput(content=content, tool_calls=calls, error="; ".join(errors) or None)


def renumber_tool_call_ids(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy of `messages` with every tool call renamed `functions.{name}:{idx}` (idx over the whole dialog).

    K2 was trained on such ids and the official API rewrites history this way ([VV] in `k2-recipe.md`); other
    ids (`call_abc123`) hurt K2's tool-calling accuracy. Each tool message's `tool_call_id` is updated to the
    new id of the call it answers, i.e. the most recent assistant call with that old id. Raises ValueError for a
    tool message that answers no earlier call, and for duplicate ids inside one assistant message, since the
    pairing would be a guess. The input is not modified.
    """
    out = copy.deepcopy([dict(m) for m in messages])
    idx = 0
    mapping: dict[str, str] = {}
    for i, msg in enumerate(out):
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            seen: set[str] = set()
            for call in msg["tool_calls"]:
                new_id = format_tool_call_id(call["function"]["name"], idx)
                idx += 1
                old_id = call.get("id")
                if old_id is not None:
                    if old_id in seen:
                        raise ValueError(f"message {i}: duplicate tool call id {old_id!r}")
                    seen.add(old_id)
                    mapping[old_id] = new_id
                call["id"] = new_id
        elif msg.get("role") == "tool":
            old_id = msg.get("tool_call_id")
            if old_id not in mapping:
                raise ValueError(f"message {i}: tool_call_id {old_id!r} answers no earlier assistant tool call")
            msg["tool_call_id"] = mapping[old_id]
    return out
