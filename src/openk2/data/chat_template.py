"""A checkpoint's own Jinja chat template, rendered and tokenized as transformers' `apply_chat_template` does.

    ChatTemplate(source, special_tokens).render(messages, tools, add_generation_prompt) -> str
    ChatTemplate(...).render_ids(tokenizer, messages, tools, add_generation_prompt) -> list[int]

Same environment as transformers: a sandboxed (immutable) Jinja environment with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `{% generation %}` tag, `raise_exception`, `strftime_now` and a
`tojson` filter that keeps non-ASCII text and takes `indent`/`separators`/`sort_keys`. The template sees
`messages` (keys whose value is None dropped, as transformers does), `tools`, `add_generation_prompt` and the
tokenizer's named special tokens (`bos_token`, `eos_token`, ...).

Tokenizing: the rendered text is encoded with special-token strings parsed, so the template's own control
tokens become their ids. Control tokens inside the caller's strings (message text, tool descriptions) are
encoded as plain text, so a user who writes "<|im_end|>" cannot end a turn: the ids equal
`apply_chat_template(..., tokenize=True, sanitize_control_tokens=True)`, and equal the default
`apply_chat_template(..., tokenize=True)` whenever the inputs contain no control-token strings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from openk2.data.tokenizer import Tokenizer

# transformers' markers around control tokens found in user strings (private-use code points).
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


class ChatTemplateError(ValueError):
    """The template failed to render these messages (its `raise_exception`, or a Jinja error)."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant masks; here it
    only renders its body, which is all a prompt needs."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which no chat template wants.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """JSON-like copy of the template's inputs: the template never touches the caller's objects."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _mark(value: Any, pattern: re.Pattern[str]) -> Any:
    """Wrap each control-token string inside user data in the markers (dict keys untouched, as transformers)."""
    if isinstance(value, str):
        value = value.replace(_MARK_START, "").replace(_MARK_END, "")  # no forged markers
        return pattern.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, value)
    if isinstance(value, dict):
        return {k: _mark(v, pattern) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark(v, pattern) for v in value]
    return value


class ChatTemplate:
    """A Jinja chat template plus the named special tokens it may refer to (`bos_token`, ...)."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from None
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._control: tuple[Tokenizer, re.Pattern[str]] | None = None  # per tokenizer, built on first use

    def _inputs(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
                ) -> tuple[list[dict[str, Any]], list[Any] | None]:
        # transformers drops None-valued keys: OpenAI clients send content=None next to tool_calls, and many
        # templates test for a key's presence.
        msgs = [{k: _plain(v) for k, v in m.items() if v is not None} for m in messages]
        return msgs, (_plain(list(tools)) if tools is not None else None)

    def _render(self, messages: list[dict[str, Any]], tools: list[Any] | None, add_generation_prompt: bool,
                special_tokens: Mapping[str, Any]) -> str:
        try:
            return self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **special_tokens)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as e:  # e.g. a template adding str and dict
            raise ChatTemplateError(f"chat template cannot render these messages: {e!r}") from None

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        """The chat as text (transformers' `apply_chat_template(..., tokenize=False)`)."""
        msgs, tool_list = self._inputs(messages, tools)
        return self._render(msgs, tool_list, add_generation_prompt, self.special_tokens)

    def control_tokens(self, tokenizer: Tokenizer) -> list[str]:
        """Tokens encoded as text when they appear in user strings: every special token, plus added tokens the
        template itself writes (transformers' default choice)."""
        out = list(tokenizer.special_ids)
        for token in tokenizer.backend.get_added_tokens_decoder().values():
            if not token.special and token.content in self.source and not token.content.isspace():
                out.append(token.content)
        return out

    def _control_pattern(self, tokenizer: Tokenizer) -> re.Pattern[str]:
        if self._control is None or self._control[0] is not tokenizer:
            tokens = sorted(self.control_tokens(tokenizer), key=len, reverse=True)  # longest first, as transformers
            self._control = (tokenizer, re.compile("|".join(map(re.escape, tokens)) or "(?!)"))
        return self._control[1]

    def render_ids(self, tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]],
                   tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat; see the module docstring for how control tokens in user strings are handled."""
        msgs, tool_list = self._inputs(messages, tools)
        pattern = self._control_pattern(tokenizer)
        # The named special tokens are the template's own (bos_token is meant to become BOS): not marked.
        text = self._render(_mark(msgs, pattern), _mark(tool_list, pattern), add_generation_prompt, self.special_tokens)
        return _encode_marked(tokenizer, text, pattern)


def _encode_marked(tokenizer: Tokenizer, text: str, pattern: re.Pattern[str]) -> list[int]:
    """Encode rendered text: marked control tokens as plain text, everything else with specials parsed. Splitting
    gives [text, marked token, text, ...] (None for a lone marker, which only breaks the text), exactly as
    transformers' `encode_marked_chat`, whose piece-wise encoding this reproduces id for id."""
    markers = re.compile(f"{_MARK_START}({pattern.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]")
    pieces = markers.split(text)
    ids = tokenizer.encode(pieces[0], allow_special=True)
    newline = tokenizer.encode("\n", allow_special=True)
    for i, piece in enumerate(pieces[1:], start=1):
        if not piece:
            continue
        as_text = i % 2 == 1
        # transformers encodes each later piece after a newline and strips it again (a SentencePiece guard);
        # doing the same keeps the ids identical at piece seams.
        piece_ids = tokenizer.encode("\n" + piece, allow_special=not as_text)
        if piece_ids[: len(newline)] == newline:
            piece_ids = piece_ids[len(newline):]
        else:
            piece_ids = tokenizer.encode(piece, allow_special=not as_text)
        # Non-special added tokens (DeepSeek-V3's <｜User｜>) match even in plain encoding; refuse, as transformers
        # does, rather than let user text forge one.
        if as_text and tokenizer.backend.token_to_id(piece) in piece_ids:
            raise ChatTemplateError(f"cannot encode {piece!r} in a message as text: the tokenizer always reads it "
                                    "as a control token")
        ids += piece_ids
    return ids
