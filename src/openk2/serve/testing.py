"""Small, deterministic model directories for tests, benchmarks and demos of the serving stack.

`toy_tokenizer` trains a byte-level BPE on generated text (plus phrases that should become few tokens);
`train_tool_model` overfits a tiny K2 model on `TOOL_DIALOG` and `HELLO_DIALOG` in about 50 AdamW steps, so
its greedy output is a real K2 tool call followed, after the tool result, by a fixed answer: enough to drive
the tool-call parse/render path end to end through the server. `make_model_dir` writes what `openk2 serve`
loads: `save_hf` weights plus the tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from openk2.data.chat import render_chat_ids
from openk2.data.tokenizer import Tokenizer, train_tokenizer
from openk2.model import K2Model, save_hf
from openk2.serve.testing_checkpoints import train_on_rows

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
    return train_on_rows(rows, tokenizer.vocab_size, tokenizer.pad_id, steps=steps, seed=seed, max_len=max_len)


def make_model_dir(path: str | os.PathLike, model: K2Model, tokenizer: Tokenizer) -> Path:
    path = Path(path)
    save_hf(model, path)
    tokenizer.save(path)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_subprocess(model_dir: str | os.PathLike, *args: str, log_path: str | os.PathLike,
                     startup_s: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m openk2 serve model_dir --port P *args` as a subprocess; yields (`http://127.0.0.1:P/v1`, process)
    once `/health` answers, and stops it with SIGINT (then SIGKILL) on exit. The server logs to `log_path`, not a
    pipe: a pipe nobody reads fills after ~1000 access-log lines and then blocks the server."""
    import signal
    import sys
    import time

    import httpx

    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "openk2", "serve", str(model_dir), "--port", str(port), *args],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + startup_s
            while True:
                assert proc.poll() is None, Path(log_path).read_text()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}/v1", proc
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@contextlib.contextmanager
def serve_tiny_random(root: str | os.PathLike, *, max_position_embeddings: int = 1024, max_batch: int = 4,
                      api_key: str = "k", model_name: str = "tiny") -> Iterator[str]:
    """A random-weight `tiny` model with the toy tokenizer behind `openk2 serve` (one thread, CPU, `--api-key
    api_key`, `--model-name model_name`), for tests of an LLM path's plumbing, not its output quality. The model
    directory and `server.log` go under `root`; yields the base URL (`http://127.0.0.1:P/v1`)."""
    from openk2.model import build_model, get_preset

    root = Path(root)
    tok = toy_tokenizer()
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=max_position_embeddings),
                        seed=0)
    model_dir = make_model_dir(root / model_name, model, tok)
    with serve_subprocess(model_dir, "--api-key", api_key, "--threads", "1", "--max-batch", str(max_batch),
                          "--device", "cpu", "--model-name", model_name, log_path=root / "server.log") as (url, _):
        yield url
