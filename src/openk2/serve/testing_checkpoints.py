"""Third-party-style checkpoint directories for tests and demos, written the way their owners ship them.

- `write_kimi_tokenizer`: Kimi K2's layout: `tiktoken.model` (BPE ranks) + `tokenizer_config.json` whose
  `added_tokens_decoder` puts the specials at K2's ids (`K2_SPECIAL_OFFSETS` after the ranks: 163584.. when
  there are 163,584 ranks) and whose `chat_template` is `KIMI_K2_TEMPLATE`; no `tokenizer.json`, no PAD
  requirement.
- `write_deepseek_tokenizer`: DeepSeek-V3's layout: `tokenizer.json` with its `<｜...｜>` tokens (the role and
  tool tokens as non-special added tokens, as DeepSeek ships them) + `tokenizer_config.json` with
  `DEEPSEEK_V3_TEMPLATE`.
- `train_chat_model`: a tiny model overfit on dialogs rendered by any `ChatFormat` (loss on each dialog's last
  assistant turn), so its greedy output reproduces that turn: enough to drive a format end to end.
- `write_checkpoint`: `save_hf` weights with the config's `model_type` set as the family ships it.

The templates are modelled on the public ones (Kimi-K2-Instruct's `chat_template`, DeepSeek-V3's with the tool
declaration of vLLM's `tool_chat_template_deepseekv3.jinja`), written for these tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import AddedToken

from openk2.data.chat_format import ChatFormat
from openk2.data.tiktoken_file import TIKTOKEN_FILE, bpe_vocab_and_merges, write_tiktoken_file
from openk2.data.tokenizer import K2_SPLIT_PATTERN, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from openk2.model import K2Model, build_model, get_preset, save_hf

# K2's special tokens as offsets from the first id after the BPE ranks (`k2-recipe.md` §3: [BOS] = 163584).
K2_SPECIAL_OFFSETS: dict[str, int] = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4, "<|start_header_id|>": 6,
    "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10, "<|tool_calls_section_begin|>": 11,
    "<|tool_calls_section_end|>": 12, "<|tool_call_begin|>": 13, "<|tool_call_argument_begin|>": 14,
    "<|tool_call_end|>": 15, "<|im_middle|>": 17, "[UNK]": 254, "[PAD]": 255,
}
K2_NUM_RANKS = 163584

KIMI_K2_TEMPLATE = r"""
{%- if tools -%}
  {{- '<|im_system|>tool_declare<|im_middle|># Tools\n\n' ~ (tools | tojson(separators=(',', ':'))) ~ '<|im_end|>' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if loop.first and message['role'] != 'system' -%}
    {{- '<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>' -}}
  {%- endif -%}
  {%- set role_name = message.get('name') or message['role'] -%}
  {%- if message['role'] == 'user' -%}
    {{- '<|im_user|>' ~ role_name ~ '<|im_middle|>' -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- '<|im_assistant|>' ~ role_name ~ '<|im_middle|>' -}}
  {%- else -%}
    {{- '<|im_system|>' ~ role_name ~ '<|im_middle|>' -}}
  {%- endif -%}
  {%- if message['role'] == 'assistant' and message.get('tool_calls') -%}
    {{- message.get('content') or '' -}}
    {{- '<|tool_calls_section_begin|>' -}}
    {%- for tool_call in message['tool_calls'] -%}
      {%- set arguments = tool_call['function']['arguments'] -%}
      {{- '<|tool_call_begin|>' ~ tool_call['id'] ~ '<|tool_call_argument_begin|>' -}}
      {{- arguments if arguments is string else arguments | tojson -}}
      {{- '<|tool_call_end|>' -}}
    {%- endfor -%}
    {{- '<|tool_calls_section_end|>' -}}
  {%- elif message['role'] == 'tool' -%}
    {{- '## Return of ' ~ message['tool_call_id'] ~ '\n' ~ message['content'] -}}
  {%- elif message.get('content') is string -%}
    {{- message['content'] -}}
  {%- elif message.get('content') -%}
    {%- for part in message['content'] -%}
      {%- if part['type'] == 'text' -%}
        {{- part['text'] -}}
      {%- else -%}
        {{- raise_exception('only text content parts are supported') -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{- '<|im_end|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_assistant|>assistant<|im_middle|>' -}}
{%- endif -%}
""".strip()

DEEPSEEK_V3_TEMPLATE = r"""
{%- set ns = namespace(system_prompt='', is_tool=false) -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {%- set ns.system_prompt = ns.system_prompt ~ ('\n\n' if ns.system_prompt else '') ~ message['content'] -%}
  {%- endif -%}
{%- endfor -%}
{%- if tools -%}
  {%- set ns.system_prompt = ns.system_prompt ~ ('\n\n' if ns.system_prompt else '')
      ~ '## Tools\nYou have access to the following tools:\n' -%}
  {%- for tool in tools -%}
    {%- set ns.system_prompt = ns.system_prompt ~ '\n### ' ~ tool['function']['name'] ~ '\nDescription: '
        ~ (tool['function']['description'] or '') ~ '\n\nParameters: ' ~ (tool['function']['parameters'] | tojson)
        ~ '\n' -%}
  {%- endfor -%}
{%- endif -%}
{{- bos_token -}}{{- ns.system_prompt -}}
{%- for message in messages -%}
  {%- if message['role'] == 'user' -%}
    {%- set ns.is_tool = false -%}
    {{- '<｜User｜>' ~ message['content'] -}}
  {%- elif message['role'] == 'assistant' and message.get('tool_calls') -%}
    {%- set ns.is_tool = false -%}
    {{- '<｜Assistant｜>' ~ (message.get('content') or '') ~ '<｜tool▁calls▁begin｜>' -}}
    {%- for tool in message['tool_calls'] -%}
      {%- set arguments = tool['function']['arguments'] -%}
      {%- set arguments = arguments if arguments is string else arguments | tojson -%}
      {{- ('' if loop.first else '\n') ~ '<｜tool▁call▁begin｜>' ~ (tool.get('type') or 'function') ~ '<｜tool▁sep｜>'
          ~ tool['function']['name'] ~ '\n```json\n' ~ arguments ~ '\n```<｜tool▁call▁end｜>' -}}
    {%- endfor -%}
    {{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- ('<｜tool▁outputs▁end｜>' if ns.is_tool else '<｜Assistant｜>') ~ (message.get('content') or '')
        ~ '<｜end▁of▁sentence｜>' -}}
    {%- set ns.is_tool = false -%}
  {%- elif message['role'] == 'tool' -%}
    {{- ('\n' if ns.is_tool else '<｜tool▁outputs▁begin｜>') ~ '<｜tool▁output▁begin｜>' ~ message['content']
        ~ '<｜tool▁output▁end｜>' -}}
    {%- set ns.is_tool = true -%}
  {%- endif -%}
{%- endfor -%}
{%- if ns.is_tool -%}
  {{- '<｜tool▁outputs▁end｜>' -}}
{%- elif add_generation_prompt -%}
  {{- '<｜Assistant｜>' -}}
{%- endif -%}
""".strip()

# DeepSeek-V3's tokens: (content, special). Its role and tool tokens are plain added tokens, not special ones.
DEEPSEEK_V3_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<｜begin▁of▁sentence｜>", True), ("<｜end▁of▁sentence｜>", True), ("<｜▁pad▁｜>", True),
    ("<｜User｜>", False), ("<｜Assistant｜>", False), ("<｜tool▁calls▁begin｜>", False),
    ("<｜tool▁calls▁end｜>", False), ("<｜tool▁call▁begin｜>", False), ("<｜tool▁call▁end｜>", False),
    ("<｜tool▁outputs▁begin｜>", False), ("<｜tool▁outputs▁end｜>", False), ("<｜tool▁output▁begin｜>", False),
    ("<｜tool▁output▁end｜>", False), ("<｜tool▁sep｜>", False),
)


def _added(content: str, special: bool = True) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def pad_ranks(ranks: Mapping[bytes, int], n: int) -> dict[bytes, int]:
    """`ranks` extended to `n` entries with filler tokens (pairs of private-use characters), so that specials can
    sit at a real checkpoint's ids; the filler is unreachable from ordinary text."""
    out = dict(ranks)
    k = 0
    while len(out) < n:
        token = (chr(0xF0000 + k // 0xFFF0) + chr(0xF0000 + k % 0xFFF0)).encode()
        k += 1
        if token not in out:
            out[token] = len(out)
    return out


def write_kimi_tokenizer(directory: str | os.PathLike, ranks: Mapping[bytes, int],
                         chat_template: str | None = KIMI_K2_TEMPLATE) -> Path:
    """`tiktoken.model` + `tokenizer_config.json` as moonshotai/Kimi-K2-Instruct ships them (specials at
    len(ranks) + `K2_SPECIAL_OFFSETS`)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_tiktoken_file(ranks, d / TIKTOKEN_FILE)
    n = len(ranks)
    named = ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>", "[EOT]",
             "<|im_system|>", "<|im_middle|>"]
    config: dict[str, Any] = {
        "added_tokens_decoder": {str(n + off): _added(tok) for tok, off in K2_SPECIAL_OFFSETS.items()},
        "additional_special_tokens": named,
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False, "model_max_length": 1048576,
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (d / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return d


def write_deepseek_tokenizer(directory: str | os.PathLike, ranks: Mapping[bytes, int],
                             chat_template: str | None = DEEPSEEK_V3_TEMPLATE) -> Path:
    """`tokenizer.json` + `tokenizer_config.json` in DeepSeek-V3's style: byte-level BPE, its `<｜...｜>` tokens
    right after the BPE vocabulary, BOS/EOS named as AddedToken dicts."""
    from tokenizers import Regex, decoders, models, pre_tokenizers

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_vocab_and_merges(ranks)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(K2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for content, special in DEEPSEEK_V3_TOKENS:  # one at a time: ids in this order
        token = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    tok.save(str(d / TOKENIZER_FILE))

    def named(content: str) -> dict[str, Any]:
        return {"__type": "AddedToken", **_added(content)}

    config: dict[str, Any] = {
        "add_bos_token": False, "add_eos_token": False,
        "bos_token": named("<｜begin▁of▁sentence｜>"), "eos_token": named("<｜end▁of▁sentence｜>"),
        "pad_token": named("<｜end▁of▁sentence｜>"), "unk_token": None,
        "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (d / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return d


def last_turn_rows(chat: ChatFormat, dialogs: Sequence[tuple[Sequence[Mapping[str, Any]], Any]]
                   ) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per dialog, the mask covering its last message (an assistant turn) and nothing else:
    what the model must produce after `render_ids(dialog[:-1], add_generation_prompt=True)`."""
    rows = []
    for messages, tools in dialogs:
        full = chat.render_ids(messages, tools, add_generation_prompt=False)
        prompt = chat.render_ids(messages[:-1], tools, add_generation_prompt=True)
        if full[: len(prompt)] != prompt:
            raise ValueError("the template does not render the prompt as a prefix of the dialog")
        rows.append((full, [0] * len(prompt) + [1] * (len(full) - len(prompt))))
    return rows


def train_on_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], vocab_size: int, pad_id: int = 0,
                  steps: int = 200, seed: int = 0, max_len: int = 512) -> K2Model:
    """A tiny K2 model overfit on `rows` of (ids, loss mask), AdamW until the loss is near zero."""
    T = max(len(ids) for ids, _ in rows)
    ids_BT = torch.full((len(rows), T), pad_id)
    labels_BT = torch.full((len(rows), T), -100)
    for b, (ids, mask) in enumerate(rows):
        ids_BT[b, : len(ids)] = torch.tensor(list(ids))
        labels_BT[b, : len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)])
    torch.manual_seed(seed)
    model = build_model(get_preset("tiny", vocab_size=vocab_size, max_position_embeddings=max_len), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        # The logits path, as when the serving tests' expectations were written: the fast (chunked) loss differs by
        # float rounding, and the overfit toy model's answers to untrained multi-turn dialogs follow the rounding.
        loss = model(ids_BT, labels=labels_BT, return_logits=True).loss
        if loss.item() < 0.002:  # checked before stepping: these are the weights that reached it
            break
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def train_chat_model(chat: ChatFormat, dialogs: Sequence[tuple[Sequence[Mapping[str, Any]], Any]],
                     vocab_size: int | None = None, **kw: Any) -> K2Model:
    """`train_on_rows` over `last_turn_rows(chat, dialogs)`; the vocabulary defaults to the tokenizer's."""
    return train_on_rows(last_turn_rows(chat, dialogs), vocab_size or chat.tokenizer.vocab_size,
                         chat.tokenizer.pad_id, **kw)


def write_checkpoint(directory: str | os.PathLike, model: K2Model, model_type: str = "deepseek_v3") -> Path:
    """`save_hf` weights, with `config.json`'s model_type as the family ships it (kimi_k2 for Kimi K2)."""
    d = save_hf(model, directory)
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = model_type
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return d
