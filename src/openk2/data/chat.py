"""Kimi K2 chat format: openk2's renderer, SFT loss masks, and the equivalent Jinja chat template.

Format (`k2-recipe.md` §3, the release `chat_template` of moonshotai/Kimi-K2-Instruct, later revision):

    [<|im_system|>tool_declare<|im_middle|>{tools JSON}<|im_end|>]          only if tools
    [<|im_system|>system<|im_middle|>You are Kimi, ...<|im_end|>]            only if messages[0] is not system
    per message: <|im_user|> | <|im_assistant|> | <|im_system|> (system, tool and any other role)
                 {name or role}<|im_middle|>{body}<|im_end|>
    body: content; assistant with tool_calls: content + tool-calls section (`openk2.data.toolcall`);
          tool: "## Return of {tool_call_id}\\n{content}"
    [<|im_assistant|>assistant<|im_middle|>]                                 add_generation_prompt

Choices openk2 makes and documents:
- Tools JSON is `json.dumps(tools, separators=(",", ":"), ensure_ascii=False)`: the later revision's
  `tools | tojson(separators=(',', ':'))` under transformers' `tojson` (ensure_ascii=False, keys in given order).
  No "# Tools" header and no TypeScript rendering; the declarations are the OpenAI tool list itself.
- Content may be a string, None (empty) or an OpenAI list of parts; text parts are concatenated with nothing
  in between, other parts (images) raise ValueError (K2's media tokens are not part of openk2).
- A tool message needs `tool_call_id`, a tool call needs `id`; without them K2's template would render an empty
  or "None" id, so both renderers raise instead.
- No BOS: K2's template has none, and `apply_chat_template` adds none with our tokenizer config.
- Special-token strings inside messages are encoded as plain text by `render_chat_ids` (see `tokenizer.py`);
  HF gives the same ids with `apply_chat_template(..., sanitize_control_tokens=True)`.

`render_chat_ids` and `K2_CHAT_TEMPLATE` + `transformers.AutoTokenizer` produce identical ids (tested).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openk2.data.tokenizer import IM_ASSISTANT, IM_END, IM_MIDDLE, IM_SYSTEM, IM_USER
from openk2.data.toolcall import tool_call_pieces

if TYPE_CHECKING:
    from openk2.data.tokenizer import Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."

Message = Mapping[str, Any]

# Written for transformers' sandboxed Jinja environment (trim_blocks, lstrip_blocks, its own `tojson`, and
# `raise_exception`). Every tag strips surrounding whitespace, so all output comes from the literal special
# tokens and the expressions; the only newline is the explicit '\n' after "## Return of {id}".
K2_CHAT_TEMPLATE = r"""
{%- macro render_content(message) -%}
  {%- set content = message.get('content') -%}
  {%- if content is string -%}
    {{- content -}}
  {%- elif content is not none -%}
    {%- for part in content -%}
      {%- if part is mapping and part.get('type') == 'text' -%}
        {{- part['text'] -}}
      {%- else -%}
        {{- raise_exception('openk2 chat template: only text content parts are supported') -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- if loop.first and message['role'] != 'system' -%}
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
  {%- endif -%}
  {%- set role_name = message.get('name') or message['role'] -%}
  {%- if message['role'] == 'user' -%}
    <|im_user|>
  {%- elif message['role'] == 'assistant' -%}
    <|im_assistant|>
  {%- else -%}
    <|im_system|>
  {%- endif -%}
  {{- role_name -}}<|im_middle|>
  {%- if message['role'] == 'assistant' and message.get('tool_calls') -%}
    {{- render_content(message) -}}<|tool_calls_section_begin|>
    {%- for tool_call in message['tool_calls'] -%}
      {%- if not tool_call.get('id') -%}
        {{- raise_exception('openk2 chat template: every tool call needs an id') -}}
      {%- endif -%}
      <|tool_call_begin|>{{ tool_call['id'] }}<|tool_call_argument_begin|>
      {%- if tool_call['function']['arguments'] is string -%}
        {{- tool_call['function']['arguments'] -}}
      {%- else -%}
        {{- tool_call['function']['arguments'] | tojson -}}
      {%- endif -%}
      <|tool_call_end|>
    {%- endfor -%}
    <|tool_calls_section_end|>
  {%- elif message['role'] == 'tool' -%}
    {%- if not message.get('tool_call_id') -%}
      {{- raise_exception('openk2 chat template: a tool message needs tool_call_id') -}}
    {%- endif -%}
    {{- '## Return of ' ~ message['tool_call_id'] ~ '\n' -}}
    {{- render_content(message) -}}
  {%- else -%}
    {{- render_content(message) -}}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
""".strip()

_OPENERS = {"user": IM_USER, "assistant": IM_ASSISTANT}  # every other role opens with <|im_system|>


def content_text(content: Any) -> str:
    """Text of a message's content: a string, None, or an OpenAI list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"only text content parts are supported, got {part!r}")
            parts.append(part["text"])
        return "".join(parts)
    raise TypeError(f"message content must be str, None or a list of parts, got {type(content).__name__}")


def format_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tool declarations' JSON, as in `<|im_system|>tool_declare<|im_middle|>{...}<|im_end|>`."""
    return json.dumps(list(tools), separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class _Piece:
    text: str
    special: bool
    mask: int  # 1 = trained on (assistant output)


def _pieces(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None,
            add_generation_prompt: bool) -> list[_Piece]:
    out: list[_Piece] = []

    def text(s: str, mask: int = 0) -> None:
        if not s:
            return
        # Adjacent text is joined because HF encodes everything between two specials as one string, and BPE
        # of a concatenation differs from the concatenation of BPEs at the seam.
        if out and not out[-1].special:
            if out[-1].mask != mask:
                raise AssertionError("adjacent text pieces with different loss masks")
            out[-1] = _Piece(out[-1].text + s, False, mask)
        else:
            out.append(_Piece(s, False, mask))

    def special(s: str, mask: int = 0) -> None:
        out.append(_Piece(s, True, mask))

    def header(opener: str, name: str) -> None:
        special(opener)
        text(name)
        special(IM_MIDDLE)

    if tools:
        header(IM_SYSTEM, "tool_declare")
        text(format_tools(tools))
        special(IM_END)
    for i, msg in enumerate(messages):
        role = msg["role"]
        if i == 0 and role != "system":
            header(IM_SYSTEM, "system")
            text(DEFAULT_SYSTEM_PROMPT)
            special(IM_END)
        header(_OPENERS.get(role, IM_SYSTEM), msg.get("name") or role)
        # nanochat's SFT mask: the model learns what the assistant writes after <|im_middle|>, including the
        # closing <|im_end|>, so it learns to stop; the role header is given at inference and not learned.
        mask = 1 if role == "assistant" else 0
        if role == "assistant" and msg.get("tool_calls"):
            text(content_text(msg.get("content")), mask)
            for s, is_special in tool_call_pieces(msg["tool_calls"]):
                (special if is_special else text)(s, mask)
        elif role == "tool":
            if not msg.get("tool_call_id"):
                raise ValueError(f"message {i}: a tool message needs tool_call_id")
            text(f"## Return of {msg['tool_call_id']}\n{content_text(msg.get('content'))}")
        else:
            text(content_text(msg.get("content")), mask)
        special(IM_END, mask)
    if add_generation_prompt:
        header(IM_ASSISTANT, "assistant")
    return out


def render_chat(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None,
                add_generation_prompt: bool = False) -> str:
    """The conversation as K2 chat text (what `K2_CHAT_TEMPLATE` renders)."""
    return "".join(p.text for p in _pieces(messages, tools, add_generation_prompt))


def render_chat_ids(tokenizer: Tokenizer, messages: Sequence[Message],
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and its SFT loss mask (1 on assistant content, tool calls and their
    <|im_end|>; 0 elsewhere). Control tokens come only from the format; message text is encoded as plain text.
    """
    pieces = _pieces(messages, tools, add_generation_prompt)
    encoded = iter(tokenizer.encode_batch([p.text for p in pieces if not p.special]))
    ids: list[int] = []
    mask: list[int] = []
    for p in pieces:
        piece_ids = [tokenizer.token_id(p.text)] if p.special else next(encoded)
        ids += piece_ids
        mask += [p.mask] * len(piece_ids)
    return ids, mask
