"""Load the tokenizer of a checkpoint directory, whoever wrote it.

    load_tokenizer_dir(directory) -> Tokenizer

accepts the two ways DeepSeek-V3-family checkpoints ship a tokenizer:
- `tokenizer.json` (openk2's `Tokenizer.save`, transformers' `save_pretrained`, DeepSeek-V3), with the
  `tokenizer_config.json` beside it naming `bos_token` / `eos_token` / `pad_token`;
- `tiktoken.model` + `tokenizer_config.json` (Kimi K2, Moonlight): BPE ranks, K2's split pattern, and the
  specials of `added_tokens_decoder` at their ids (`openk2.data.tiktoken_file`).

Only tokens are read here; the chat template in the same config is `openk2.data.chat_format`'s business.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tokenizers

from openk2.data.tiktoken_file import TIKTOKEN_FILE, read_tiktoken_file, tiktoken_backend
from openk2.data.tokenizer import (
    BOS,
    DEFAULT_MODEL_MAX_LENGTH,
    EOS,
    K2_SPLIT_PATTERN,
    PAD,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    Tokenizer,
)


class TokenizerFilesError(ValueError):
    """A directory without a usable tokenizer; the message says which file is missing or wrong."""


def read_tokenizer_config(directory: str | os.PathLike) -> dict[str, Any]:
    """`tokenizer_config.json` of `directory` as a dict ({} when there is none)."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerFilesError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise TokenizerFilesError(f"{path}: expected a JSON object")
    return config


def token_content(value: Any) -> str | None:
    """A token as tokenizer configs write it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def has_tokenizer_files(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / TOKENIZER_FILE).is_file() or (d / TIKTOKEN_FILE).is_file()


def _model_max_length(config: dict[str, Any]) -> int:
    value = config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
    # transformers writes a huge float (1e30) for "no limit"; keep it an int.
    return int(value) if isinstance(value, int | float) else DEFAULT_MODEL_MAX_LENGTH


def _tiktoken_specials(directory: Path, config: dict[str, Any]) -> dict[int, str]:
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict) or not decoder:
        raise TokenizerFilesError(
            f"{directory / TOKENIZER_CONFIG_FILE}: a {TIKTOKEN_FILE} tokenizer needs 'added_tokens_decoder' "
            "(the special tokens and their ids)")
    specials = {}
    for key, value in decoder.items():
        content = token_content(value)
        if content is None or not str(key).isdigit():
            raise TokenizerFilesError(f"{directory / TOKENIZER_CONFIG_FILE}: bad added_tokens_decoder entry "
                                      f"{key!r}: {value!r}")
        specials[int(key)] = content
    return specials


def _backend(directory: Path, config: dict[str, Any]) -> tokenizers.Tokenizer:
    if (directory / TOKENIZER_FILE).is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as e:  # tokenizers raises its own exception type for bad files
            raise TokenizerFilesError(f"{directory / TOKENIZER_FILE}: cannot load ({e})") from None
    if (directory / TIKTOKEN_FILE).is_file():
        try:
            ranks = read_tiktoken_file(directory / TIKTOKEN_FILE)
            # K2's pattern: the tiktoken.model checkpoints of this family (Kimi K2, Moonlight) all use it, and
            # their tokenizer_config.json does not carry one.
            return tiktoken_backend(ranks, K2_SPLIT_PATTERN, _tiktoken_specials(directory, config))
        except ValueError as e:
            raise TokenizerFilesError(f"{directory / TIKTOKEN_FILE}: {e}") from None
    raise TokenizerFilesError(f"{directory}: no {TOKENIZER_FILE} or {TIKTOKEN_FILE} (a servable directory needs "
                              f"its tokenizer, e.g. Tokenizer.save(dir) or the checkpoint's own tokenizer files)")


def load_tokenizer_dir(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer stored in `directory` (see the module docstring). Raises TokenizerFilesError."""
    directory = Path(directory)
    config = read_tokenizer_config(directory)
    backend = _backend(directory, config)
    if config:
        names = {k: token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
    else:  # a bare tokenizer.json: openk2's own layout, when its tokens are there
        names = {k: t if backend.token_to_id(t) is not None else None
                 for k, t in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD))}
    missing = {k: v for k, v in names.items() if v is not None and backend.token_to_id(v) is None}
    if missing:
        raise TokenizerFilesError(f"{directory / TOKENIZER_CONFIG_FILE}: names tokens the vocabulary lacks: "
                                  f"{missing}")
    return Tokenizer(backend, model_max_length=_model_max_length(config), **names)
