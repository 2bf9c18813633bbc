"""Small, deterministic model directories for tests, benchmarks and demos of the serving stack.

`toy_tokenizer` trains a byte-level BPE on generated text (plus phrases that should become few tokens);
`train_tool_model` overfits a tiny K2 model on `TOOL_DIALOG` and `HELLO_DIALOG` in about 50 AdamW steps, so
its greedy output is a real K2 tool call followed, after the tool result, by a fixed answer: enough to drive
the tool-call parse/render path end to end through the server. `make_model_dir` writes what `openk2 serve`
loads: `save_hf` weights plus the tokenizer.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from openk2.data.chat import render_chat_ids
from openk2.data.tokenizer import Tokenizer, train_tokenizer
from openk2.model import K2Model, build_model, get_preset, save_hf

WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
SYSTEM = "Use tools."
TOOL_DIALOG: list[dict[str, Any]] = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                                                           "function": {"name": "get_weather",
                                                                        "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny in Paris."},
]
HELLO_DIALOG: list[dict[str, Any]] = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there!"},
]
_WORDS = ["the", "weather", "in", "Paris", "is", "sunny", "city", "Hello", "Hi", "there", "tool", "functions",
          "get_weather", "What", "It", "{", "}", '"', ":", ",", "21", "C", "Köln", "天气", "!", "?", "\n"]


def toy_tokenizer(vocab_size: int = 512, extra_texts: Sequence[str] = (), seed: int = 0) -> Tokenizer:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzäöü"

    def word() -> str:  # random words keep merges from saturating before the vocabulary is full
        if rng.random() < 0.6:
            return rng.choice(_WORDS)
        return "".join(rng.choice(letters) for _ in range(rng.randint(2, 7)))

    texts = [" ".join(word() for _ in range(80)) for _ in range(300)]
    phrases = ["What is the weather in Paris?", "It is sunny in Paris.", "Hello", "Hi there!", "sunny, 21 C", SYSTEM,
               "functions.get_weather:0", '{"city": "Paris"}', json.dumps([WEATHER_TOOL], separators=(",", ":")),
               "## Return of functions.get_weather:0\nsunny, 21 C", "tool_declare", "system", "user", "assistant"]
    return train_tokenizer(texts + phrases * 40 + list(extra_texts), vocab_size, show_progress=False)


def train_tool_model(tokenizer: Tokenizer, steps: int = 200, seed: int = 0, max_len: int = 512) -> K2Model:
    """A tiny K2 model overfit on TOOL_DIALOG and HELLO_DIALOG (loss on assistant turns only)."""
    # Hello with and without the tool declared: with it, "auto" answers in text, so forcing a call is visible.
    dialogs = [(TOOL_DIALOG, [WEATHER_TOOL]), (HELLO_DIALOG, [WEATHER_TOOL]), (HELLO_DIALOG, None)]
    rows = [render_chat_ids(tokenizer, d, tools) for d, tools in dialogs]
    T = max(len(ids) for ids, _ in rows)
    ids_BT = torch.full((len(rows), T), tokenizer.pad_id)
    labels_BT = torch.full((len(rows), T), -100)
    for b, (ids, mask) in enumerate(rows):
        ids_BT[b, : len(ids)] = torch.tensor(ids)
        labels_BT[b, : len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)])
    torch.manual_seed(seed)
    model = build_model(get_preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=max_len),
                        seed=seed)
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


def make_model_dir(path: str | os.PathLike, model: K2Model, tokenizer: Tokenizer) -> Path:
    path = Path(path)
    save_hf(model, path)
    tokenizer.save(path)
    return path
