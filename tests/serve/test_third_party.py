"""Serving checkpoints openk2 did not write, shipped the way their owners ship them: a DeepSeek-V3-style directory
(`tokenizer.json`, its own template and tool-call tokens) through a real `openk2 serve` subprocess and `openk2
chat`, a Kimi-K2-style one (`tiktoken.model` + `tokenizer_config.json`) through the server, and a
transformers-written all-dense DeepseekV3 directory whose tokenizer has K2's chat tokens but no [PAD]."""

from __future__ import annotations

import asyncio
import json

import pytest
from typer.testing import CliRunner

from openk2.cli import app
from openk2.data.chat import K2_CHAT_TEMPLATE
from openk2.data.tiktoken_file import tiktoken_backend
from openk2.data.tokenizer import K2_SPLIT_PATTERN, SPECIAL_TOKENS
from openk2.model_dir import ModelSourceError, load_model_dir, load_tokenizer_and_format
from openk2.serve.server import ServerThread, build_service
from openk2.serve.testing import HELLO_DIALOG, SYSTEM, TOOL_DIALOG, WEATHER_TOOL, serve_subprocess, toy_tokenizer
from openk2.serve.testing_checkpoints import (
    train_chat_model,
    write_checkpoint,
    write_deepseek_tokenizer,
    write_kimi_tokenizer,
)

from .conftest import one_torch_thread

openai = pytest.importorskip("openai")
TOOL_PROMPT = TOOL_DIALOG[:2]
HELLO_PROMPT = HELLO_DIALOG[:2]
# Each dialog teaches its last assistant turn: the call, the answer after the tool result, and a plain greeting.
DIALOGS = [(TOOL_DIALOG[:3], [WEATHER_TOOL]), (TOOL_DIALOG, [WEATHER_TOOL]), (HELLO_DIALOG, [WEATHER_TOOL]),
           (HELLO_DIALOG, None)]


def _trained_dir(path, write_tokenizer, model_type: str):
    with one_torch_thread():
        write_tokenizer(path, toy_tokenizer().mergeable_ranks())
        _, chat = load_tokenizer_and_format(path)
        write_checkpoint(path, train_chat_model(chat, DIALOGS), model_type)
    return path


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    return _trained_dir(tmp_path_factory.mktemp("third") / "toy-dsv3", write_deepseek_tokenizer, "deepseek_v3")


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory):
    return _trained_dir(tmp_path_factory.mktemp("third") / "toy-kimi", write_kimi_tokenizer, "kimi_k2")


def _tool_round_trip(client, model: str) -> None:
    first = client.chat.completions.create(model=model, messages=TOOL_PROMPT, tools=[WEATHER_TOOL], temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assistant = choice.message.model_dump(exclude_none=True)
    assistant["tool_calls"][0]["id"] = "call_abc123"  # clients pick their own ids; the server renumbers them
    dialog = [*TOOL_PROMPT, assistant, {"role": "tool", "tool_call_id": "call_abc123", "content": "sunny, 21 C"}]
    second = client.chat.completions.create(model=model, messages=dialog, tools=[WEATHER_TOOL], temperature=0)
    assert second.choices[0].message.content == "It is sunny in Paris."
    assert second.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_openk2_serve_subprocess_on_a_deepseek_v3_directory(deepseek_dir, tmp_path):
    log = tmp_path / "server.log"
    with serve_subprocess(deepseek_dir, "--api-key", "k", "--threads", "1", "--max-batch", "2", "--device", "cpu",
                          log_path=log) as (url, proc), \
            openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60) as client:
        hello = client.chat.completions.create(model="toy-dsv3", messages=HELLO_PROMPT, temperature=0)
        assert hello.choices[0].message.content == "Hi there!"
        _tool_round_trip(client, "toy-dsv3")
    out = log.read_text()
    assert proc.returncode == 0, out
    assert "tool calls: deepseek_v3" in " ".join(out.split())  # rich wraps the startup line


def test_kimi_tiktoken_directory_through_the_server(kimi_dir):
    bundle = load_model_dir(kimi_dir, device="cpu")
    assert bundle.chat_format.tool_parser.name == "kimi_k2" and bundle.chat_format.template is not None
    with ServerThread(build_service(bundle, max_batch=4, max_len=512)) as srv, \
            openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=60) as client:
        _tool_round_trip(client, "toy-kimi")
        chunks = list(client.chat.completions.create(model="toy-kimi", messages=TOOL_PROMPT, tools=[WEATHER_TOOL],
                                                     temperature=0, stream=True))
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert [(c.id, c.function.name) for c in calls] == [("functions.get_weather:0", "get_weather")]
        forced = client.chat.completions.create(
            model="toy-kimi", messages=HELLO_PROMPT, tools=[WEATHER_TOOL], temperature=0, max_tokens=20,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert forced.choices[0].message.tool_calls or forced.choices[0].model_extra.get("tool_call_error")


def test_export_hf_keeps_the_checkpoints_own_tokenizer_files(kimi_dir, tmp_path):
    r = CliRunner().invoke(app, ["export-hf", str(kimi_dir), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (kimi_dir / name).read_bytes()
    _, original = load_tokenizer_and_format(kimi_dir)
    _, exported = load_tokenizer_and_format(tmp_path / "out")
    assert exported.render_ids(TOOL_DIALOG, [WEATHER_TOOL]) == original.render_ids(TOOL_DIALOG, [WEATHER_TOOL])


def test_chat_command_and_local_backend_on_a_deepseek_v3_directory(deepseek_dir):
    r = CliRunner().invoke(app, ["chat", str(deepseek_dir), "--system", SYSTEM, "--temperature", "0",
                                 "--max-tokens", "8", "--threads", "1", "--device", "cpu"], input="Hello\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "assistant> Hi there!\n" in r.output

    from openk2.llm.client import CHAT
    from openk2.llm.local import LocalBackend

    async def ask() -> dict:
        backend = LocalBackend.from_model_dir(deepseek_dir, device="cpu", max_batch=1)
        try:
            return await backend.request(CHAT, {"model": "toy-dsv3", "messages": HELLO_PROMPT, "temperature": 0})
        finally:
            await backend.aclose()

    assert asyncio.run(ask())["choices"][0]["message"]["content"] == "Hi there!"


def test_transformers_written_all_dense_directory_without_pad(tmp_path):
    """The issue's case: transformers saved an all-dense DeepseekV3 (config defaults n_group=8, 4 routed experts)
    and a tokenizer.json with K2's chat tokens but no [PAD]; serving used to refuse it."""
    transformers = pytest.importorskip("transformers")
    tok = toy_tokenizer()
    ranks = tok.mergeable_ranks()
    n = len(ranks)
    chat_tokens = [t for t in SPECIAL_TOKENS if t != "[PAD]"]
    backend = tiktoken_backend(ranks, K2_SPLIT_PATTERN, {n + i: t for i, t in enumerate(chat_tokens)}, num_reserved=0)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]")
    hf_tok.chat_template = K2_CHAT_TEMPLATE
    hf_tok.save_pretrained(tmp_path)
    config = transformers.DeepseekV3Config(
        vocab_size=n + len(chat_tokens), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=2, n_routed_experts=4, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, max_position_embeddings=256)
    assert (config.n_group, config.topk_group) == (8, 4)  # transformers' defaults, more groups than experts
    with one_torch_thread():
        transformers.DeepseekV3ForCausalLM(config).save_pretrained(tmp_path)
        bundle = load_model_dir(tmp_path, device="cpu")
        assert bundle.tokenizer.pad_token is None and bundle.chat_format.template is None  # openk2's K2 renderer
        service = build_service(bundle, max_batch=1)
        service.start()
        try:
            job = service.prepare_chat({"model": bundle.name, "messages": HELLO_PROMPT, "max_tokens": 4,
                                        "temperature": 0, "tools": [WEATHER_TOOL]})
            out = asyncio.run(service.run_chat(job))
        finally:
            service.stop()
    assert out["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


def test_clear_errors_for_unservable_directories(deepseek_dir, tmp_path):
    r = CliRunner().invoke(app, ["serve", str(deepseek_dir), "--tool-call-parser", "hermes"])
    assert r.exit_code == 2 and "unknown tool-call parser 'hermes'" in r.output and "kimi_k2" in r.output
    r = CliRunner().invoke(app, ["serve", str(deepseek_dir), "--tool-call-parser", "kimi_k2"])
    assert r.exit_code == 2 and "needs the tokens" in r.output
    with pytest.raises(ModelSourceError, match="no tokenizer.json or tiktoken.model"):
        load_model_dir(tmp_path)
