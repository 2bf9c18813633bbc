"""Per-token log-probs of given responses under a model: the trainer's log pi_theta (and, recomputed, log pi_old).

`token_logprobs(model, sequences, prompt_lens, temperature=T)` returns logp_BR[b, r] = log softmax(logits / T)
of response token r of sequence b (the tokens after `prompt_lens[b]`), zero-padded to the longest response.
It is the same distribution `TorchEngine` reports as behaviour log-probs at sampling temperature T (its
default `logprobs="sampling"`), so at equal weights the two agree to fp32 rounding.

One batched forward over the right-padded sequences (causal attention: padding after a sequence cannot
change its positions) gives the hidden states; only the response positions are projected to the vocabulary,
`chunk_rows` rows at a time, with an fp32 log-sum-exp, so the [tokens, V] logits of the whole batch never
exist at once. Under grad each chunk is checkpointed (its logits are recomputed in backward instead of
kept), so memory stays at one chunk of logits. Padding tokens still pass through the MoE routers; in
training mode they are counted in the experts' load statistics (the bias update), like packed padding in
pretraining.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from openk2.model import block_cache

if TYPE_CHECKING:
    from openk2.model.transformer import K2Model


def _chunk_logprobs(x_CD: torch.Tensor, w_VD: torch.Tensor, targets_C: torch.Tensor,
                    inv_temperature: float) -> torch.Tensor:
    logits_CV = (x_CD @ w_VD.t()).float()
    if inv_temperature != 1.0:
        logits_CV = logits_CV * inv_temperature
    return logits_CV.gather(1, targets_C[:, None])[:, 0] - torch.logsumexp(logits_CV, dim=-1)


def token_logprobs(
    model: K2Model,
    sequences: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    *,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """log-probs [B, R] (fp32; R = the longest response; 0 beyond each response) of each sequence's response
    tokens `sequences[b][prompt_lens[b]:]` under `model` at `temperature`. Gradients flow when called under
    grad. `vocab_limit` normalizes over the first ids only (as an engine built with that `vocab_limit` samples)."""
    if len(sequences) != len(prompt_lens):
        raise ValueError(f"{len(sequences)} sequences but {len(prompt_lens)} prompt lengths")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use 1.0 for a greedy rollout's logprobs)")
    if not sequences:
        raise ValueError("token_logprobs needs at least one sequence")
    for b, (seq, n_prompt) in enumerate(zip(sequences, prompt_lens, strict=True)):
        if not 1 <= n_prompt <= len(seq):
            raise ValueError(f"sequence {b}: prompt length {n_prompt} outside [1, {len(seq)}] (the first token "
                             f"has no log-prob: a prompt needs at least one token)")
    max_pos = model.config.max_position_embeddings
    longest = max(len(s) for s in sequences)
    if longest - 1 > max_pos:
        raise ValueError(f"a sequence of {longest} tokens exceeds the model's context of {max_pos} tokens")
    w_VD = model.lm_head.weight
    if vocab_limit is not None:
        w_VD = w_VD[:vocab_limit]
    device = w_VD.device
    B, T = len(sequences), longest - 1
    inputs_BT = torch.zeros(B, max(T, 1), dtype=torch.long)
    for b, seq in enumerate(sequences):
        inputs_BT[b, : len(seq) - 1] = torch.as_tensor(list(seq[:-1]), dtype=torch.long)
    # Which (row, position) pairs predict a response token, and that token.
    rows, cols, targets, out_rows, out_cols = [], [], [], [], []
    for b, (seq, n_prompt) in enumerate(zip(sequences, prompt_lens, strict=True)):
        n_resp = len(seq) - n_prompt
        rows += [b] * n_resp
        cols += range(n_prompt - 1, len(seq) - 1)
        targets += list(seq[n_prompt:])
        out_rows += [b] * n_resp
        out_cols += range(n_resp)
    R = max(len(s) - n for s, n in zip(sequences, prompt_lens, strict=True))
    logp_BR = torch.zeros(B, R, dtype=torch.float32, device=device)
    if not targets:
        return logp_BR
    targets_N = torch.tensor(targets, dtype=torch.long, device=device)
    if int(targets_N.max()) >= w_VD.shape[0] or int(targets_N.min()) < 0:
        raise ValueError(f"response token ids must be in [0, {w_VD.shape[0]})")
    x_BTD = model.hidden_states(inputs_BT.to(device))
    x_ND = x_BTD[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    # ~2M logits (8 MiB fp32) per chunk: each is recomputed in the backward (checkpointed).
    chunk = chunk_rows or max(64, (1 << 21) // w_VD.shape[0])
    checkpointed = torch.is_grad_enabled() and (x_ND.requires_grad or w_VD.requires_grad)
    parts = []
    for start in range(0, x_ND.shape[0], chunk):
        args = (x_ND[start:start + chunk], w_VD, targets_N[start:start + chunk], 1.0 / temperature)
        parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if checkpointed
                     else _chunk_logprobs(*args))
    logp_N = torch.cat(parts)
    logp_BR = logp_BR.index_put((torch.tensor(out_rows, device=device), torch.tensor(out_cols, device=device)), logp_N)
    if block_cache.applies(device):  # the backward, to the embeddings' output (`hidden_states`), reuses blocks too
        block_cache.begin_backward_at(logp_BR)
    return logp_BR


def response_mask(prompt_lens: Sequence[int], seq_lens: Sequence[int], device: torch.device | None = None
                  ) -> torch.Tensor:
    """mask [B, R] (bool): True where `token_logprobs` holds a response token."""
    n_resp = torch.tensor([n - p for p, n in zip(prompt_lens, seq_lens, strict=True)], device=device)
    R = int(n_resp.max()) if len(n_resp) else 0
    return torch.arange(R, device=device)[None, :] < n_resp[:, None]


__all__ = ["response_mask", "token_logprobs"]
