"""Compatibility names for the loader, which lives in `openk2.model_dir` (serving, chat, evaluation and
fine-tuning share it); `ModelBundle` is `LoadedModel`."""

from __future__ import annotations

import os

from openk2.data.tokenizer import Tokenizer
from openk2.model_dir import LoadedModel, ModelSourceError, check_compatible, load_model_dir, load_tokenizer_and_format

ModelBundle = LoadedModel


def resolve_tokenizer_source(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer that belongs to the model source `path` (see `openk2.model_dir`)."""
    return load_tokenizer_and_format(path)[0]


__all__ = ["LoadedModel", "ModelBundle", "ModelSourceError", "check_compatible", "load_model_dir",
           "resolve_tokenizer_source"]
