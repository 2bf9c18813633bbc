"""Tool-call formats by model family, chosen like vLLM's `--tool-call-parser`: `kimi_k2` and `deepseek_v3`.

    get_tool_parser(name) -> ToolCallParser          (ValueError naming the valid ones)
    TOOL_PARSERS: name -> ToolCallParser

A parser knows the special tokens of its format (`markers`, the first of which opens a tool-call section), how
to split a finished assistant turn into content and calls (`parse`, never raises), and the prefix that forces a
call for `tool_choice` "required" or a named function (`forced_prefix`), whose generation stops at `call_end`
and is closed with `named_suffix`.

kimi_k2 (`openk2.data.toolcall`): `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
<|tool_call_argument_begin|>{args}<|tool_call_end|>...<|tool_calls_section_end|>`.

deepseek_v3 (DeepSeek-V3's chat template): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
\\n```json\\n{args}\\n```<｜tool▁call▁end｜>` calls separated by a newline, then `<｜tool▁calls▁end｜>`. The format
carries no call ids; each parsed call gets K2's `functions.NAME:IDX` with IDX counting the calls of the dialog,
the ids the server renumbers histories to anyway.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

from openk2.data.tokenizer import (
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
)
from openk2.data.toolcall import (
    ParsedOutput,
    ToolCall,
    arguments_ok,
    format_tool_call_id,
    parse_assistant_output,
    short_repr,
)


class ToolCallParser(ABC):
    name: str
    markers: tuple[str, ...]
    call_end: str
    named_suffix: str

    @abstractmethod
    def parse(self, text: str, first_index: int = 0) -> ParsedOutput:
        """Content and tool calls of a finished assistant turn (stop token excluded); `first_index` is the number
        of tool calls earlier in the dialog, for formats whose calls carry no id."""

    @abstractmethod
    def forced_prefix(self, function: str | None, call_index: int) -> list[tuple[str, bool]]:
        """(text, is_special_token) pieces that make the model call a tool: any tool if `function` is None, else
        that function, whose arguments the model then writes."""


class KimiK2ToolParser(ToolCallParser):
    name = "kimi_k2"
    markers = (TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END, TOOL_CALL_BEGIN, TOOL_CALL_ARGUMENT_BEGIN,
               TOOL_CALL_END)
    call_end = TOOL_CALL_END
    named_suffix = TOOL_CALL_END + TOOL_CALLS_SECTION_END

    def parse(self, text: str, first_index: int = 0) -> ParsedOutput:
        return parse_assistant_output(text)

    def forced_prefix(self, function: str | None, call_index: int) -> list[tuple[str, bool]]:
        if function is None:
            return [(TOOL_CALLS_SECTION_BEGIN, True)]
        return [(TOOL_CALLS_SECTION_BEGIN, True), (TOOL_CALL_BEGIN, True),
                (format_tool_call_id(function, call_index), False), (TOOL_CALL_ARGUMENT_BEGIN, True)]


DSV3_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
DSV3_CALLS_END = "<｜tool▁calls▁end｜>"
DSV3_CALL_BEGIN = "<｜tool▁call▁begin｜>"
DSV3_CALL_END = "<｜tool▁call▁end｜>"
DSV3_SEP = "<｜tool▁sep｜>"
_DSV3_CALL = re.compile(r"(?P<type>[^\n]*?)" + re.escape(DSV3_SEP) + r"(?P<name>[^\n]+?)\s*\n```(?:json)?\s*\n"
                        r"(?P<arguments>.*?)\n?```\s*$", re.DOTALL)


class DeepSeekV3ToolParser(ToolCallParser):
    name = "deepseek_v3"
    markers = (DSV3_CALLS_BEGIN, DSV3_CALLS_END, DSV3_CALL_BEGIN, DSV3_SEP, DSV3_CALL_END)
    call_end = DSV3_CALL_END
    named_suffix = DSV3_CALL_END + DSV3_CALLS_END

    def forced_prefix(self, function: str | None, call_index: int) -> list[tuple[str, bool]]:
        if function is None:
            return [(DSV3_CALLS_BEGIN, True)]
        return [(DSV3_CALLS_BEGIN, True), (DSV3_CALL_BEGIN, True), ("function", False), (DSV3_SEP, True),
                (f"{function}\n```json\n", False)]

    def _call(self, body: str, index: int, errors: list[str]) -> ToolCall | None:
        m = _DSV3_CALL.match(body.strip("\n"))
        if m is None:
            errors.append(f"malformed tool call (expected TYPE{DSV3_SEP}NAME, then ```json ARGS ```): "
                          f"{short_repr(body)}")
            return None
        name, arguments = m["name"].strip(), m["arguments"].strip()
        if not arguments_ok(name, arguments, self.markers, errors):
            return None
        try:
            call_id = format_tool_call_id(name, index)
        except ValueError as e:
            errors.append(str(e))
            return None
        return ToolCall(id=call_id, name=name, arguments=arguments)

    def parse(self, text: str, first_index: int = 0) -> ParsedOutput:
        if not isinstance(text, str):
            return ParsedOutput(content="", error=f"expected str, got {type(text).__name__}")
        errors: list[str] = []
        begin = text.find(DSV3_CALLS_BEGIN)
        if begin < 0:
            stray = [m for m in self.markers if m in text]
            if not stray:
                return ParsedOutput(content=text)
            errors.append(f"tool-call markers {stray} without {DSV3_CALLS_BEGIN}")
            begin = min(text.find(m) for m in stray)
            content, section = text[:begin], text[begin:]
        else:
            content, section = text[:begin], text[begin + len(DSV3_CALLS_BEGIN):]
            stray = [m for m in self.markers if m in content]
            if stray:
                errors.append(f"tool-call markers {stray} before {DSV3_CALLS_BEGIN}")
        end = section.find(DSV3_CALLS_END)
        if end < 0:
            errors.append(f"missing {DSV3_CALLS_END} (truncated output?)")
        else:
            if section[end + len(DSV3_CALLS_END):].strip():
                errors.append(f"text after {DSV3_CALLS_END} ignored: {short_repr(section[end + len(DSV3_CALLS_END):])}")
            section = section[:end]
        chunks = section.split(DSV3_CALL_BEGIN)
        if chunks[0].strip():
            errors.append(f"unexpected text in the tool-calls section: {short_repr(chunks[0].strip())}")
        if len(chunks) == 1:
            errors.append("tool-calls section without any tool call")
        calls: list[ToolCall] = []
        for chunk in chunks[1:]:
            body, sep, rest = chunk.partition(DSV3_CALL_END)
            if not sep:
                errors.append(f"unterminated tool call (truncated output?): {short_repr(chunk)}")
                continue
            if rest.strip():
                errors.append(f"unexpected text between tool calls: {short_repr(rest.strip())}")
            call = self._call(body, first_index + len(calls), errors)
            if call is not None:
                calls.append(call)
        return ParsedOutput(content=content, tool_calls=calls, error="; ".join(errors) or None)


TOOL_PARSERS: dict[str, ToolCallParser] = {p.name: p for p in (KimiK2ToolParser(), DeepSeekV3ToolParser())}


def get_tool_parser(name: str) -> ToolCallParser:
    """The parser registered as `name`; ValueError listing the valid names otherwise."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; valid: {', '.join(sorted(TOOL_PARSERS))}") from None
