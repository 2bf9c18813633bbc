"""Load a servable model: weights via `resolve_model_source` (the one place that maps a path to a model) and
the tokenizer saved beside them (`Tokenizer.save` into the same directory).

A model directory for serving is a HF-format checkpoint written by `save_hf` plus `tokenizer.json` and
`tokenizer_config.json` written by `Tokenizer.save`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from openk2.data.tokenizer import TOKENIZER_FILE, Tokenizer
from openk2.model.dtype import DtypePolicy
from openk2.model.transformer import K2Model


class ModelSourceError(ValueError):
    """The path does not name a servable model (weights and tokenizer)."""


def resolve_tokenizer_source(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer that belongs to the model source `path`: `tokenizer.json` in a HF directory, or in
    `<run>/tokenizer` for a training run directory."""
    from openk2.cli.hf import tokenizer_dir_of

    path = Path(path)
    tok_dir = tokenizer_dir_of(path)
    if tok_dir is not None:
        return Tokenizer.load(tok_dir)
    raise ModelSourceError(f"{path}: no {TOKENIZER_FILE}; save the tokenizer into the model directory with "
                           f"Tokenizer.save(dir)")


@dataclass
class ModelBundle:
    model: K2Model
    tokenizer: Tokenizer
    name: str
    source: Path


def check_compatible(model: K2Model, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ModelSourceError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                               f"{model.config.vocab_size} embedding rows")


def load_model_dir(path: str | os.PathLike, device: str = "auto", dtype: str = "auto",
                   name: str | None = None) -> ModelBundle:
    """Model + tokenizer from `path`, placed on `device` in `dtype` ("auto": fp32 on CPU, bf16 on CUDA)."""
    from openk2.cli.hf import resolve_model_source
    from openk2.model.hf import CheckpointError

    path = Path(path)
    try:
        policy = DtypePolicy.resolve(device, dtype)
    except ValueError as e:
        raise ModelSourceError(str(e)) from None
    tokenizer = resolve_tokenizer_source(path)
    try:
        model = resolve_model_source(path)
    except (CheckpointError, FileNotFoundError) as e:
        raise ModelSourceError(str(e)) from None
    check_compatible(model, tokenizer)
    model.to(device=policy.device, dtype=policy.compute_dtype)
    for m in model.moe_layers():  # the router's selection bias stays fp32, as in build_model and HF
        m.gate.e_score_correction_bias.data = m.gate.e_score_correction_bias.float()
    model.eval()
    return ModelBundle(model, tokenizer, name or path.resolve().name, path)

