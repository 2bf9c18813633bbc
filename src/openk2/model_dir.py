"""Load a model directory for inference or fine-tuning: weights, tokenizer and chat format, in one call.

    load_model_dir(path, device="auto", dtype="auto", name=None, tool_call_parser=None) -> LoadedModel
    LoadedModel(model, tokenizer, name, source, chat_format)

The one loader behind `openk2 serve`, `openk2 chat`, `LocalBackend.from_model_dir` (the evaluation harness's
`--model`) and the starting checkpoint of SFT/RL. `path` may be
- an openk2 training run directory (latest checkpoint, tokenizer in `<run>/tokenizer`);
- a HF `DeepseekV3ForCausalLM` directory written by openk2 (`save_hf` + `Tokenizer.save`);
- a third-party one: Kimi K2 / Moonlight (`tiktoken.model` + `tokenizer_config.json`, model_type kimi_k2),
  DeepSeek-V3 or a fine-tune saved by transformers (`tokenizer.json`), with their own chat templates.

Only what the task needs is required: weights, a tokenizer, a chat template (or K2's chat tokens) and an
end-of-turn token. Tool calls are parsed with the format the template writes, or `tool_call_parser`
(`openk2.data.tool_parsers`: kimi_k2, deepseek_v3). Errors are `ModelSourceError` with the fix in the message.
Block-FP8 checkpoints (the released K2 / DeepSeek-V3 weights) must be dequantized to bf16 first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from openk2.data.chat_format import ChatFormat, ChatFormatError, chat_format_for_dir
from openk2.data.tokenizer import Tokenizer
from openk2.data.tokenizer_files import TokenizerFilesError, has_tokenizer_files, load_tokenizer_dir
from openk2.model.dtype import DtypePolicy
from openk2.model.transformer import K2Model


class ModelSourceError(ValueError):
    """The path does not name a loadable model (weights, tokenizer, chat format); the message says why."""


@dataclass
class LoadedModel:
    model: K2Model
    tokenizer: Tokenizer
    name: str
    source: Path
    chat_format: ChatFormat


def tokenizer_dir_of(path: str | os.PathLike) -> Path | None:
    """Where the tokenizer of a model source lives: the HF directory itself or `<run>/tokenizer`."""
    path = Path(path)
    for candidate in (path, path / "tokenizer"):
        if has_tokenizer_files(candidate):
            return candidate
    return None


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def load_tokenizer_and_format(path: str | os.PathLike, tool_call_parser: str | None = None
                              ) -> tuple[Tokenizer, ChatFormat]:
    """The tokenizer and chat format of model source `path`, without the weights (cheap; for data pipelines)."""
    path = Path(path)
    tok_dir = tokenizer_dir_of(path)
    if tok_dir is None:
        raise ModelSourceError(f"{path}: no tokenizer.json or tiktoken.model (in the directory or its tokenizer/ "
                               "folder); save one there, e.g. Tokenizer.save(dir), or copy the checkpoint's own")
    try:
        tokenizer = load_tokenizer_dir(tok_dir)
        model_type = _model_type(path) if (path / "config.json").is_file() else "kimi_k2"  # run dirs are K2's
        return tokenizer, chat_format_for_dir(tok_dir, tokenizer, tool_call_parser, model_type)
    except (TokenizerFilesError, ChatFormatError) as e:
        raise ModelSourceError(str(e)) from None


def check_compatible(model: K2Model, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ModelSourceError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                               f"{model.config.vocab_size} embedding rows")


def load_model_dir(path: str | os.PathLike, device: str = "auto", dtype: str = "auto", name: str | None = None,
                   tool_call_parser: str | None = None) -> LoadedModel:
    """Model, tokenizer and chat format from `path`, the model placed on `device` in `dtype` ("auto": fp32 on
    CPU, bf16 on CUDA) in eval mode. `name` defaults to the directory name. Raises ModelSourceError."""
    from openk2.cli.hf import resolve_model_source
    from openk2.model.config import ConfigError
    from openk2.model.hf import CheckpointError

    path = Path(path)
    try:
        policy = DtypePolicy.resolve(device, dtype)
    except ValueError as e:
        raise ModelSourceError(str(e)) from None
    tokenizer, chat_format = load_tokenizer_and_format(path, tool_call_parser)
    try:
        model = resolve_model_source(path)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        raise ModelSourceError(str(e)) from None
    check_compatible(model, tokenizer)
    model.to(device=policy.device, dtype=policy.compute_dtype)
    for m in model.moe_layers():  # the router's selection bias stays fp32, as in build_model and HF
        m.gate.e_score_correction_bias.data = m.gate.e_score_correction_bias.float()
    model.eval()
    return LoadedModel(model, tokenizer, name or path.resolve().name, path, chat_format)
