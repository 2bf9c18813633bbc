"""Cached autoregressive generation for K2Model (greedy, temperature, top-k, top-p)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from openk2.model.decode import CompileSwitch, decode_step, window_size

if TYPE_CHECKING:
    from openk2.model.transformer import K2Model

# Tokens between checks that every row has finished (each check is a host sync).
_EOS_CHECK_EVERY = 8


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids [B, T], valid mask [B, T])."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("generate needs at least one non-empty prompt")
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(sequences), T, dtype=torch.bool)
    for b, s in enumerate(sequences):
        ids[b, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        valid[b, T - len(s):] = True
    return ids, valid


def sample_next(
    logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    if temperature <= 0.0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k > 0:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_BV, idx_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        drop_BV = cum_BV - sorted_BV.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits_BV = logits_BV.scatter(1, idx_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def generate(
    model: K2Model,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    compile: CompileSwitch = "auto",
) -> torch.Tensor:
    """Returns [B, T + n] = prompt followed by up to `max_new_tokens` new tokens.

    Prompts of different lengths: pass a list of token lists, or a left-padded tensor with
    `attention_mask` (1 = real token). Rows that hit `eos_token_id` are filled with `pad_token_id`
    (default: the eos id) until every row is done.

    The prompt runs through the model's forward; each new token through the model's shared `DecodeStep`
    (`openk2.model.decode`), compiled unless `compile=False` (or OPENK2_COMPILE=0 with "auto"). With
    compiling off, or where it fails, decoding runs the eager reference path (`K2Model.forward` with the
    cache): the same greedy tokens, logits equal within fp32 rounding.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = model.lm_head.weight.device
    if isinstance(input_ids, torch.Tensor):
        ids_BT = input_ids.to(device)
        valid_BT = (torch.ones_like(ids_BT, dtype=torch.bool) if attention_mask is None
                    else attention_mask.to(device).bool())
    else:
        ids_BT, valid_BT = left_pad(input_ids)
        ids_BT, valid_BT = ids_BT.to(device), valid_BT.to(device)
    B, T = ids_BT.shape
    if max_new_tokens == 0:
        return ids_BT
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    was_training = model.training
    model.eval()
    step_fn = decode_step(model, compile)
    # A compiled step reuses its graph for every cache of the same (batch, power-of-two) size.
    capacity = window_size(T + max_new_tokens) if step_fn.compiled else T + max_new_tokens
    cache = model.new_cache(B, capacity)
    positions_BT = (valid_BT.long().cumsum(dim=1) - 1).clamp(min=0)
    logits = model(ids_BT, position_ids_BT=positions_BT, cache=cache, valid_BT=valid_BT,
                   last_logits_only=True).logits
    next_pos_B = positions_BT[:, -1] + 1
    tok_B = sample_next(logits[:, -1], temperature, top_p, top_k, generator)
    finished_B = (tok_B == eos_token_id) if eos_token_id is not None else torch.zeros_like(tok_B, dtype=torch.bool)
    new_tokens = [tok_B]
    greedy = temperature <= 0.0
    eos_id = eos_token_id if eos_token_id is not None else -1
    eos, pad_t = torch.tensor(eos_id, device=device), torch.tensor(pad, device=device)
    write_pos_1: torch.Tensor | None = None  # the cache length as a tensor, for the greedy graph
    ones_B1 = torch.ones(B, 1, dtype=torch.bool, device=device)
    for step in range(1, max_new_tokens):
        # Whether every row has finished is checked every few tokens only (a host sync per token costs more
        # than a few wasted steps at the end); the tokens past the stop are cut below.
        if eos_token_id is not None and step % _EOS_CHECK_EVERY == 0 and bool(finished_B.all()):
            break
        out = None
        if greedy:
            if write_pos_1 is None:
                write_pos_1 = torch.tensor([cache.length], device=device)
            out = step_fn.greedy(cache.latent_NBSL, cache.key_valid_BS, tok_B, next_pos_B, finished_B, write_pos_1,
                                 eos, pad_t)
            if out is not None:
                tok_B, finished_B, next_pos_B, write_pos_1 = out[:4]
                if not step_fn.writes_cache:
                    cache.append_decoded(out[4])
                else:
                    cache.length += 1
                new_tokens.append(tok_B)
                continue
            write_pos_1 = None
        else:
            out = step_fn(cache.latent_NBSL, cache.key_valid_BS, tok_B, next_pos_B)
        if out is None:  # the eager reference path
            logits_BV = model(tok_B[:, None], position_ids_BT=next_pos_B[:, None], cache=cache,
                              valid_BT=ones_B1).logits[:, -1]
        else:
            logits_BV, new_latent_NBL = out
            cache.append_decoded(new_latent_NBL)
        next_pos_B = next_pos_B + 1
        tok_B = sample_next(logits_BV, temperature, top_p, top_k, generator).masked_fill(finished_B, pad)
        new_tokens.append(tok_B)
        if eos_token_id is not None:
            finished_B = finished_B | (tok_B == eos_token_id)
    new_BN = torch.stack(new_tokens, dim=1)
    if eos_token_id is not None and bool(finished_B.all()):
        # Stop where the last row finished, as if every token had been checked.
        first_eos_B = (new_BN == eos_token_id).int().argmax(dim=1)
        new_BN = new_BN[:, : int(first_eos_B.max()) + 1]
    model.train(was_training)
    return torch.cat((ids_BT, new_BN), dim=1)
