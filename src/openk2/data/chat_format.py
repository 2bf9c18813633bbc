"""A model's chat format: how its chats become ids, which tokens end its turns, and how its tool calls look.

    ChatFormat.render_ids(messages, tools=None, add_generation_prompt=True) -> list[int]
    ChatFormat.stop_ids / completion_stop_ids / tool_parser
    chat_format_for_dir(directory, tokenizer, tool_call_parser=None, model_type=None) -> ChatFormat

`chat_format_for_dir` reads the checkpoint's own choices:
- template: `chat_template.jinja`, else `chat_template` in `tokenizer_config.json` (a string, or transformers'
  list of named templates, of which "default" is used). A template identical to openk2's `K2_CHAT_TEMPLATE`,
  and no template at all on a tokenizer with K2's chat tokens, use openk2's K2 renderer (`openk2.data.chat`),
  which gives the same ids; any other template is rendered as transformers does (`openk2.data.chat_template`).
- stop tokens (chat): the EOS token, `generation_config.json`'s `eos_token_id`, and every known end-of-turn token
  (`<|im_end|>`, `<|eot_id|>`, ...) that the template writes. At least one is required.
- tool calls: `tool_call_parser` if given, else the format whose section opener the template writes
  (`<|tool_calls_section_begin|>`: kimi_k2, `<｜tool▁calls▁begin｜>`: deepseek_v3), else the one named by the
  config's model_type (kimi_k2; deepseek_v3) if the vocabulary has its tokens, else none (requests with tools
  are then refused). A parser chosen by name or by the template must have all its tokens in the vocabulary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from openk2.data.chat import K2_CHAT_TEMPLATE, render_chat_ids
from openk2.data.chat_template import ChatTemplate, ChatTemplateError
from openk2.data.tokenizer import EOS, IM_END, SPECIAL_TOKENS, Tokenizer
from openk2.data.tokenizer_files import read_tokenizer_config, token_content
from openk2.data.tool_parsers import TOOL_PARSERS, ToolCallParser, get_tool_parser

CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

# Tokens that end an assistant turn in the chat formats of common model families.
END_OF_TURN_TOKENS = ("<|im_end|>", "<｜end▁of▁sentence｜>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>",
                      "<|end|>", "<|endoftext|>", "[EOT]")
# The model_type of config.json -> its family's tool-call format.
PARSER_BY_MODEL_TYPE = {"kimi_k2": "kimi_k2", "deepseek_v3": "deepseek_v3"}
# Special tokens (besides the named BOS/EOS/PAD) that the template may reference as variables.
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatFormatError(ValueError):
    """A directory whose chat format cannot be served; the message says what is missing and how to fix it."""


Message = Mapping[str, Any]


class ChatFormat:
    """Chat rendering, stop tokens and tool-call parsing for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None, stop_tokens: Sequence[int],
                 tool_parser: ToolCallParser | None, source: str = "openk2 K2 renderer") -> None:
        if not stop_tokens:
            raise ChatFormatError("no end-of-turn token to stop on")
        self.tokenizer, self.template, self.tool_parser, self.source = tokenizer, template, tool_parser, source
        self.stop_ids = frozenset(stop_tokens)
        self.completion_stop_ids = frozenset(_completion_stops(tokenizer))

    @classmethod
    def k2(cls, tokenizer: Tokenizer) -> ChatFormat:
        """openk2's own format: K2's renderer, stops at `<|im_end|>` and `[EOS]`, K2 tool calls."""
        missing = [t for t in SPECIAL_TOKENS if tokenizer.special_id(t) is None and t != "[PAD]"]
        if missing:
            raise ChatFormatError(f"the K2 chat format needs the special tokens {missing}; this tokenizer lacks them")
        return cls(tokenizer, None, [tokenizer.token_id(IM_END), tokenizer.token_id(EOS)], TOOL_PARSERS["kimi_k2"])

    def render_ids(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None,
                   add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids of a chat. Raises ValueError (ChatTemplateError) for messages the format cannot express."""
        if self.template is None:
            return render_chat_ids(self.tokenizer, messages, tools, add_generation_prompt=add_generation_prompt)[0]
        return self.template.render_ids(self.tokenizer, messages, tools, add_generation_prompt=add_generation_prompt)

    def render_ids_and_mask(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None
                            ) -> tuple[list[int], list[int]]:
        """Ids of a whole dialog and its SFT loss mask: 1 on what each assistant turn adds after its generation
        prompt (content, tool calls, end-of-turn token), 0 elsewhere, as `render_chat_ids` masks K2 dialogs.

        For a Jinja template the turn's span is found by rendering the dialog up to it (with the generation
        prompt) and through it; a template that does not render a dialog's beginning as a prefix of the whole
        (one that drops earlier reasoning, say) cannot be masked this way and raises ValueError.
        """
        if self.template is None:
            return render_chat_ids(self.tokenizer, messages, tools)
        ids = self.render_ids(messages, tools, add_generation_prompt=False)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.render_ids(messages[:i], tools, add_generation_prompt=True)
            through = self.render_ids(messages[: i + 1], tools, add_generation_prompt=False)
            if ids[: len(prompt)] != prompt or ids[: len(through)] != through or len(through) < len(prompt):
                raise ValueError(f"message {i}: the chat template does not render this dialog's beginning as a "
                                 "prefix of the whole, so its assistant turns cannot be masked")
            mask[len(prompt): len(through)] = [1] * (len(through) - len(prompt))
        return ids, mask

    def marker_ids(self) -> frozenset[int]:
        """Ids of the tool-call tokens (empty without a parser)."""
        if self.tool_parser is None:
            return frozenset()
        return frozenset(self.tokenizer.token_id(m) for m in self.tool_parser.markers)

    def describe(self) -> str:
        stops = ", ".join(self.tokenizer.decode([i]) for i in sorted(self.stop_ids))
        parser = self.tool_parser.name if self.tool_parser else "none"
        return f"chat: {self.source}; stops on {stops}; tool calls: {parser}"


def _completion_stops(tokenizer: Tokenizer) -> list[int]:
    # A pretraining document ends at EOS, or where the model predicts the next document's BOS.
    return [tokenizer.token_id(t) for t in (tokenizer.eos_token, tokenizer.bos_token) if t is not None]


def _read_template(directory: Path, config: Mapping[str, Any]) -> tuple[str | None, str]:
    path = directory / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path.name)
    template = config.get("chat_template")
    if isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ChatFormatError(f"{directory / 'tokenizer_config.json'}: chat_template must be a string")
    return template, "tokenizer_config.json chat_template"


def _generation_eos(directory: Path) -> list[int]:
    path = directory / GENERATION_CONFIG_FILE
    if not path.is_file():
        return []
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int)]


def _stop_ids(tokenizer: Tokenizer, template_text: str, directory: Path) -> list[int]:
    stops = [tokenizer.token_id(tokenizer.eos_token)] if tokenizer.eos_token is not None else []
    stops += [i for i in _generation_eos(directory) if 0 <= i < tokenizer.vocab_size]
    for token in END_OF_TURN_TOKENS:
        tid = tokenizer.special_id(token)
        if tid is not None and token in template_text:
            stops.append(tid)
    return sorted(set(stops))


def _choose_parser(tokenizer: Tokenizer, name: str | None, template_text: str, model_type: str | None
                   ) -> ToolCallParser | None:
    if name is not None:
        return get_tool_parser(name)
    for parser in TOOL_PARSERS.values():
        if parser.markers[0] in template_text:
            return parser
    family = TOOL_PARSERS.get(PARSER_BY_MODEL_TYPE.get(model_type or "", ""))
    # A fine-tune may keep the family's model_type but not its tool tokens (a ChatML template, say): then it
    # simply has no tool-call format, rather than failing to load.
    if family is not None and all(tokenizer.backend.token_to_id(m) is not None for m in family.markers):
        return family
    return None


def _checked_parser(tokenizer: Tokenizer, name: str | None, template_text: str, model_type: str | None
                    ) -> ToolCallParser | None:
    try:
        parser = _choose_parser(tokenizer, name, template_text, model_type)
    except ValueError as e:
        raise ChatFormatError(str(e)) from None
    if parser is not None:
        missing = [m for m in parser.markers if tokenizer.backend.token_to_id(m) is None]
        if missing:
            raise ChatFormatError(f"tool-call parser {parser.name!r} needs the tokens {missing}, which this "
                                  "tokenizer lacks; pick another with --tool-call-parser "
                                  f"({', '.join(sorted(TOOL_PARSERS))})")
    return parser


def chat_format_for_dir(directory: str | os.PathLike, tokenizer: Tokenizer, tool_call_parser: str | None = None,
                        model_type: str | None = None) -> ChatFormat:
    """The chat format of the checkpoint (or tokenizer) directory `directory`; see the module docstring.

    Raises ChatFormatError (a ValueError) with what is missing: no template and no K2 tokens, no end-of-turn
    token, an unknown parser name (listing the valid ones), or a parser whose tokens the vocabulary lacks.
    """
    directory = Path(directory)
    config = read_tokenizer_config(directory)
    source, where = _read_template(directory, config)
    if source is None or source.strip() == K2_CHAT_TEMPLATE:
        try:
            fmt = ChatFormat.k2(tokenizer)
        except ChatFormatError as e:
            raise ChatFormatError(f"{directory}: no chat template (chat_template.jinja or tokenizer_config.json's "
                                  f"chat_template), and {e}") from None
        fmt.tool_parser = _checked_parser(tokenizer, tool_call_parser, K2_CHAT_TEMPLATE, model_type)
        return fmt
    parser = _checked_parser(tokenizer, tool_call_parser, source, model_type)
    specials = {k: v for k in _NAMED_TOKENS if (v := token_content(config.get(k))) is not None}
    try:
        template = ChatTemplate(source, specials)
    except ChatTemplateError as e:
        raise ChatFormatError(f"{directory} ({where}): {e}") from None
    stops = _stop_ids(tokenizer, source, directory)
    if not stops:
        raise ChatFormatError(f"{directory}: no end-of-turn token to stop generation on: tokenizer_config.json names "
                              f"no eos_token and the chat template writes none of {list(END_OF_TURN_TOKENS)}")
    return ChatFormat(tokenizer, template, stops, parser, source=where)
