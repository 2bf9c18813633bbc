"""Per-sequence sampling that is numerically safe for every value the server accepts.

The engine samples each sequence on its own (`sample_token`), so an error or an extreme setting in one
request can only affect that request. What the extremes mean:

- `temperature` below `GREEDY_TEMPERATURE` (1e-5) is greedy decoding. Dividing float32 logits by a tiny
  temperature overflows to inf and softmax turns that into NaN (`temperature: 1e-300` used to crash the
  step); and at such temperatures the distribution already puts all its mass on the argmax unless two logits
  are within ~1e-5 of each other, so greedy is what the request asks for.
- Above it, the softmax is computed in float64 from max-subtracted logits, so `logits / temperature` stays
  finite (|logits| <= float32 max, / 1e-5 < 1e44 << float64 max) and the probabilities are exact to float64.
- `top_p` keeps the smallest set of most-likely tokens whose probability reaches `top_p`, and always keeps
  the most likely token: a tiny `top_p` (even 1e-46, which is 0 in float32) samples from that one token,
  i.e. it is greedy up to ties, never an empty set.
- Logits that are NaN or +inf (a broken model row) end that sequence with an error naming the cause instead
  of being sampled from.

The draw is inverse-CDF (one uniform number from the sequence's generator, a cumulative sum and a binary
search): the same distribution as `torch.multinomial`, at a fraction of its cost over a whole vocabulary.
"""

from __future__ import annotations

import math

import torch

GREEDY_TEMPERATURE = 1e-5


class SamplingError(ValueError):
    """The logits of one sequence cannot be sampled from; the engine ends that sequence alone."""


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_TEMPERATURE


def apply_bias_and_bans(logits_V: torch.Tensor, logit_bias: tuple[tuple[int, float], ...],
                        banned: tuple[int, ...], vocab: int) -> torch.Tensor:
    """`logits_V` (already cut to `vocab`) with the request's logit bias added and its banned ids at -inf."""
    if not logit_bias and not banned:
        return logits_V
    out = logits_V.clone()
    if logit_bias:
        pairs = [(t, b) for t, b in logit_bias if 0 <= t < vocab]
        if pairs:
            ids = torch.tensor([t for t, _ in pairs], device=out.device)
            out.index_add_(0, ids, torch.tensor([b for _, b in pairs], device=out.device, dtype=out.dtype))
    ids_banned = [t for t in banned if 0 <= t < vocab]
    if ids_banned:
        out[ids_banned] = float("-inf")
    return out


def sample_token(logits_V: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> int:
    """One token id from one row of (processed) logits; see the module docstring for the extreme values."""
    # One pass gives the argmax and the checks: max() propagates NaN, and +inf is the max when present.
    top, best_t = logits_V.max(dim=0)
    top_value, best = float(top), int(best_t)
    if math.isnan(top_value) or top_value == math.inf:
        raise SamplingError("the model produced non-finite logits (NaN or +inf) for this sequence")
    if top_value == -math.inf:
        raise SamplingError("every token is banned for this sequence: nothing can be sampled")
    if is_greedy(temperature):
        return best
    # exp((logits - max) / T) in float64, in place: <= 1, the max is exactly 1. The inverse-CDF draw below
    # scales by the total, so only top-p needs the normalized probabilities.
    probs_V = logits_V.double().sub_(top_value).div_(temperature).exp_()
    if top_p < 1.0:
        probs_V /= probs_V.sum()
        sorted_V, order_V = probs_V.sort(descending=True)
        before_V = sorted_V.cumsum(dim=-1) - sorted_V  # mass of the more likely tokens
        drop_V = before_V >= top_p
        drop_V[0] = False  # the most likely token is always kept, so the set is never empty
        probs_V = probs_V.scatter(0, order_V, sorted_V.masked_fill(drop_V, 0.0))
    # Inverse-CDF sampling: one uniform draw and a binary search, ~20x cheaper than torch.multinomial over a
    # vocabulary (which dominated the per-token cost of batched sampling). Zero-probability tokens (cut by
    # top-p, banned) are never picked: searchsorted(right=True) lands on the first id whose CDF exceeds u.
    cdf_V = probs_V.cumsum(dim=0)
    u = torch.rand((), dtype=cdf_V.dtype, device=cdf_V.device, generator=generator) * cdf_V[-1]
    return min(int(torch.searchsorted(cdf_V, u, right=True)), cdf_V.shape[0] - 1)
