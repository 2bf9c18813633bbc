"""Serving commands: `serve` (OpenAI-compatible HTTP server) and `chat` (a terminal chat, in process)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import typer

from openk2.cli.app import app, console, fail

if TYPE_CHECKING:
    from openk2.model_dir import LoadedModel
    from openk2.serve.service import OpenAIService

_SOURCE_HELP = ("Model source: a HF DeepseekV3 checkpoint directory with its tokenizer (tokenizer.json, or "
                "tiktoken.model + tokenizer_config.json) and chat template, or an openk2 training run directory.")
_PARSER_HELP = ("Tool-call format: kimi_k2 or deepseek_v3 (default: the one the chat template writes, else the "
                "model family's).")


def _load(source: Path, device: str, dtype: str, threads: int | None, name: str | None = None,
          tool_call_parser: str | None = None) -> LoadedModel:
    import torch

    from openk2.model_dir import ModelSourceError, load_model_dir

    if threads is not None:
        if threads < 1:
            fail(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        return load_model_dir(source, device=device, dtype=dtype, name=name, tool_call_parser=tool_call_parser)
    except (ModelSourceError, OSError) as e:
        fail(str(e))


@app.command()
def serve(
    source: Path = typer.Argument(..., help=_SOURCE_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to bind; loopback by default."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: str = typer.Option(None, "--api-key", envvar="OPENK2_API_KEY",
                                help="Require 'Authorization: Bearer KEY' on /v1 routes."),
    model_name: str = typer.Option(None, "--model-name", help="Model id clients must send (default: directory name)."),
    max_batch: int = typer.Option(16, "--max-batch", help="Sequences decoded together (KV-cache rows)."),
    max_len: int = typer.Option(None, "--max-len", help="Context length per sequence (default: the model's)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on CUDA), float32 or bfloat16."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    tool_call_parser: str = typer.Option(None, "--tool-call-parser", help=_PARSER_HELP),
    compile: str = typer.Option("auto", "--compile", help=(
        "Compile the decode step: auto (unless OPENK2_COMPILE=0), on or off. Each new (batch, window) shape "
        "compiles once (seconds to a minute on a CPU; cached across runs), then decodes ~1.7-1.9x faster.")),
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)."""
    switch = {"auto": "auto", "on": True, "off": False}.get(compile)
    if switch is None:
        fail(f"--compile must be auto, on or off, got {compile!r}")
    from openk2.serve.server import build_service, is_loopback
    from openk2.serve.server import serve as run_server

    if not is_loopback(host) and api_key is None:
        console.print(f"[yellow]warning:[/yellow] binding {host} without --api-key exposes the model to the network")
    bundle = _load(source, device, dtype, threads, model_name, tool_call_parser)
    try:
        service = build_service(bundle, max_batch=max_batch, max_len=max_len, compile=switch)
    except ValueError as e:
        fail(str(e))
    console.print(f"serving [bold]{bundle.name}[/bold] at http://{host}:{port}/v1 "
                  f"(max batch {max_batch}, context {service.context_len}; {bundle.chat_format.describe()})")
    run_server(service, host=host, port=port, api_key=api_key)


@app.command()
def chat(
    source: Path = typer.Argument(..., help=_SOURCE_HELP),
    system: str = typer.Option(None, "--system", help="System prompt (default: the chat template's)."),
    temperature: float = typer.Option(0.6, help="Sampling temperature (K2's recommended 0.6; 0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p"),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Most tokens per answer."),
    seed: int = typer.Option(None, help="Sampling seed (per turn: seed + turn index)."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    threads: int = typer.Option(None, "--threads"),
) -> None:
    """Chat with a model in the terminal. End a line with \\ to continue it; /reset clears the dialog,
    /system TEXT sets the system prompt (and resets), /exit quits."""
    from openk2.serve.server import build_service

    bundle = _load(source, device, dtype, threads)
    service = build_service(bundle, max_batch=1)
    service.start()
    try:
        run_chat_repl(service, system=system, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                      seed=seed, read=input, out=sys.stdout)
    finally:
        service.stop()


def _read_message(read: Callable[[str], str]) -> str | None:
    """One user message; lines ending with a backslash continue it. None at end of input."""
    lines = []
    prompt = "you> "
    while True:
        try:
            line = read(prompt)
        except EOFError:
            return "\n".join(lines) if lines else None
        if line.endswith("\\"):
            lines.append(line[:-1])
            prompt = "...  "
            continue
        lines.append(line)
        return "\n".join(lines)


def run_chat_repl(service: OpenAIService, *, system: str | None, temperature: float, top_p: float,
                  max_tokens: int, seed: int | None, read: Callable[[str], str], out: TextIO) -> list[dict[str, Any]]:
    """The chat loop; returns the final dialog (for tests)."""
    from openk2.serve.protocol import APIError

    def fresh() -> list[dict[str, Any]]:
        return [{"role": "system", "content": system}] if system else []

    messages = fresh()
    turn = 0
    out.write("openk2 chat: end a line with \\ to continue it; /reset, /system TEXT, /exit\n")
    while True:
        text = _read_message(read)
        if text is None or text.strip() in ("/exit", "/quit"):
            return messages
        if text.strip() == "/reset":
            messages = fresh()
            out.write("(dialog reset)\n")
            continue
        if text.startswith("/system "):
            system = text[len("/system "):].strip() or None
            messages = fresh()
            out.write("(system prompt set; dialog reset)\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        # Shrink the answer budget as the dialog fills the context, rather than refusing the turn.
        n_prompt = len(service.chat.render_ids(messages, add_generation_prompt=True))
        body = {"model": service.model_name, "messages": messages, "stream": True, "temperature": temperature,
                "top_p": top_p, "seed": None if seed is None else seed + turn,
                "max_tokens": max(1, min(max_tokens, service.context_len - n_prompt))}
        out.write("assistant> ")
        out.flush()
        try:
            reply = asyncio.run(_stream_reply(service, body, out))
        except APIError as e:
            hint = "; /reset to start over" if e.code == "context_length_exceeded" else ""
            out.write(f"[error: {e.message}{hint}]\n")
            messages.pop()
            continue
        except KeyboardInterrupt:
            out.write("\n[interrupted]\n")
            messages.pop()
            continue
        out.write("\n")
        messages.append({"role": "assistant", "content": reply})
        turn += 1


async def _stream_reply(service: OpenAIService, body: dict[str, Any], out: TextIO) -> str:
    job = service.prepare_chat(body)
    parts = []
    async for chunk in service.stream_chat(job):
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content") or ""
            if piece:
                parts.append(piece)
                out.write(piece)
                out.flush()
    return "".join(parts)
