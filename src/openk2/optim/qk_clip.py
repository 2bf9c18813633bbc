"""Per-head QK-Clip ([K2] §2.1; `k2-recipe.md` §1.3), applied after each optimizer step.

For every attention head h whose largest pre-softmax logit in the step's forward(s), S_max^h, exceeds tau,
gamma_h = tau / S_max^h rescales that head's query/key weights so that the same inputs give S_max^h = tau:

* MLA (`openk2.model.attention.MLA`): rows of head h in the query up-projection (`q_b_proj`, or `q_proj`) are
  [q_nope | q_rope]; q_nope x sqrt(gamma_h), q_rope x gamma_h. Rows of head h in `kv_b_proj` are
  [k_nope | v]; k_nope x sqrt(gamma_h), v untouched. The shared rotary key (rows `kv_lora_rank:` of
  `kv_a_proj_with_mqa`) is never touched: scaling it would change every head.
* Standard multi-head / grouped-query attention (the protocol below): a key head used by exactly one query
  head (MHA) is scaled like MLA's head-specific parts, query and key rows x sqrt(gamma_h); a key head shared by
  several query heads (GQA/MQA) is left untouched and the query rows take the whole gamma_h.

Heads at or under tau get gamma = 1 exactly, so their weights stay bitwise unchanged. Non-finite S_max (a
broken forward) is never used as a clip factor.

Recording protocol. An attention module takes part when it has

    record_max_logits: bool         # set by MuonClip; when True, training forwards record
    max_logit_H: Tensor | None      # fp32 [num_heads]: running max over forwards, reset to None by MuonClip

and either is an `MLA`, or exposes the GQA layout (`GQAAttentionLike`): `q_proj` / `k_proj` (`nn.Linear`,
head h = rows [h*head_dim, (h+1)*head_dim), query head h reads key head h // (num_heads // num_key_value_heads),
as in Llama's `repeat_kv`), `num_heads`, `num_key_value_heads`, `head_dim`. In your forward, after RoPE and
before the softmax, call `record_max_logits_(self, q_BHTD, k_BKTD, scale)` when `self.record_max_logits` is
set. `GQAAttention` below is a complete reference module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openk2.model.attention import MLA

# Query rows per block when computing max logits, to bound the [B, H, t, T] score block at long context.
_QUERY_BLOCK = 512


@runtime_checkable
class GQAAttentionLike(Protocol):
    """What QK-Clip needs from a Llama-style attention module (see the module docstring)."""

    q_proj: nn.Linear
    k_proj: nn.Linear
    num_heads: int
    num_key_value_heads: int
    head_dim: int
    record_max_logits: bool
    max_logit_H: Tensor | None


def is_mla(module: nn.Module) -> bool:
    return isinstance(module, MLA)


def is_gqa(module: nn.Module) -> bool:
    return not is_mla(module) and all(
        hasattr(module, name)
        for name in ("q_proj", "k_proj", "num_heads", "num_key_value_heads", "head_dim", "record_max_logits",
                     "max_logit_H")
    )


def find_attention_layers(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules QK-Clip can act on: `model.attention_layers()` when the model provides
    it (K2Model), else every submodule that is an MLA or follows the GQA protocol."""
    if hasattr(model, "attention_layers"):
        layers = list(model.attention_layers())
    else:
        layers = [m for m in model.modules() if is_mla(m) or is_gqa(m)]
    bad = [type(m).__name__ for m in layers if not (is_mla(m) or is_gqa(m))]
    if bad:
        raise TypeError(f"attention_layers() returned modules QK-Clip cannot clip: {bad}")
    return layers


def num_heads(attn: nn.Module) -> int:
    return attn.n_heads if is_mla(attn) else attn.num_heads


@torch.no_grad()
def max_logits_per_head(q_BHTD: Tensor, k_BKTD: Tensor, scale: float, causal: bool = True) -> Tensor:
    """Signed per-query-head max of scale * q.k over the (causally) visible pairs, fp32 [H].

    k may have fewer heads than q (GQA): query head h reads key head h // (H // K)."""
    B, H, T, _ = q_BHTD.shape
    K, S = k_BKTD.shape[1], k_BKTD.shape[2]
    if H % K:
        raise ValueError(f"{H} query heads cannot share {K} key heads evenly")
    q_BKGTD = q_BHTD.view(B, K, H // K, T, -1)
    best_H = q_BHTD.new_full((H,), float("-inf"), dtype=torch.float32)
    for start in range(0, T, _QUERY_BLOCK):
        stop = min(start + _QUERY_BLOCK, T)
        scores_BKGtS = q_BKGTD[:, :, :, start:stop] @ k_BKTD.unsqueeze(2).mT
        if causal:
            # Query t (absolute position start + t, with S - T earlier cached keys) sees keys <= its position.
            future_tS = torch.ones(stop - start, S, dtype=torch.bool, device=q_BHTD.device).triu(
                start + S - T + 1
            )
            scores_BKGtS = scores_BKGtS.masked_fill(future_tS, float("-inf"))
        best_H = torch.maximum(best_H, scores_BKGtS.amax(dim=(0, 3, 4)).reshape(H).float())
    return best_H * scale


@torch.no_grad()
def record_max_logits_(module: nn.Module, q_BHTD: Tensor, k_BKTD: Tensor, scale: float, causal: bool = True) -> None:
    """Fold this forward's per-head max logits into `module.max_logit_H` (running max until reset)."""
    best_H = max_logits_per_head(q_BHTD, k_BKTD, scale, causal)
    prev = module.max_logit_H
    module.max_logit_H = best_H if prev is None else torch.maximum(prev, best_H)


def clip_factors(max_logit_H: Tensor, tau: float) -> Tensor:
    """gamma_H = tau / S_max^h where S_max^h > tau (and finite), exactly 1 elsewhere."""
    over_H = torch.isfinite(max_logit_H) & (max_logit_H > tau)
    return torch.where(over_H, tau / max_logit_H, torch.ones_like(max_logit_H))


def _scale_rows_(weight_HRD: Tensor, rows: slice, factor_H: Tensor) -> None:
    # The fp32 factor is not cast down first: a bf16 weight is multiplied in fp32 and rounded once.
    weight_HRD[:, rows].mul_(factor_H.to(weight_HRD.device).view(-1, 1, 1))


@torch.no_grad()
def scale_mla_(attn: MLA, gamma_H: Tensor) -> None:
    """The K2 split: q_nope, k_nope x sqrt(gamma); q_rope x gamma; v and shared k_rope untouched."""
    q = attn.q_up_proj
    # Bias-free by construction (HF's q_b_proj / kv_b_proj have no bias); refuse rather than silently mis-clip.
    if q.bias is not None or attn.kv_b_proj.bias is not None:
        raise NotImplementedError("QK-Clip for MLA assumes bias-free q/kv up-projections")
    H, N = attn.n_heads, attn.nope_dim
    sqrt_H = gamma_H.sqrt()
    q_HQD = q.weight.view(H, attn.qk_dim, -1)
    _scale_rows_(q_HQD, slice(0, N), sqrt_H)
    _scale_rows_(q_HQD, slice(N, None), gamma_H)
    kv_HXC = attn.kv_b_proj.weight.view(H, N + attn.v_dim, -1)
    _scale_rows_(kv_HXC, slice(0, N), sqrt_H)


@torch.no_grad()
def scale_gqa_(attn: nn.Module, gamma_H: Tensor) -> None:
    """Query head h x gamma_h, or q and k x sqrt(gamma_h) when its key head is not shared (MHA)."""
    H, K, D = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    if H % K:
        raise ValueError(f"{type(attn).__name__}: {H} query heads cannot share {K} key heads evenly")
    if K < H:
        _scale_proj_heads_(attn.q_proj, H, D, gamma_H)
    else:
        sqrt_H = gamma_H.sqrt()
        _scale_proj_heads_(attn.q_proj, H, D, sqrt_H)
        _scale_proj_heads_(attn.k_proj, K, D, sqrt_H)


def _scale_proj_heads_(proj: nn.Linear, heads: int, head_dim: int, factor_H: Tensor) -> None:
    _scale_rows_(proj.weight.view(heads, head_dim, -1), slice(None), factor_H)
    if proj.bias is not None:
        proj.bias.view(heads, head_dim).mul_(factor_H.to(proj.bias.device).view(-1, 1))


@torch.no_grad()
def qk_clip_(layers: Sequence[nn.Module], tau: float) -> list[Tensor | None]:
    """Clip every layer from its recorded `max_logit_H`; returns those records (None where nothing was
    recorded, e.g. no training forward since the last reset). Does not reset them."""
    recorded: list[Tensor | None] = []
    for attn in layers:
        s_H = attn.max_logit_H
        recorded.append(s_H)
        if s_H is None or math.isinf(tau):  # tau = inf: monitoring only
            continue
        gamma_H = clip_factors(s_H, tau)
        if is_mla(attn):
            scale_mla_(attn, gamma_H)
        else:
            scale_gqa_(attn, gamma_H)
    return recorded


def _rope_cos_sin(T: int, dim: int, theta: float, device: torch.device, dtype: torch.dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles_TR = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
    angles_TD = torch.cat((angles_TR, angles_TR), dim=-1)
    return angles_TD.cos().to(dtype), angles_TD.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class GQAAttention(nn.Module):
    """Reference Llama-style causal grouped-query attention with RoPE that follows the QK-Clip protocol.

    Copy the three marked lines into your own attention module to make MuonClip clip it.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads or num_heads
        if num_heads % self.num_key_value_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_key_value_heads="
                             f"{self.num_key_value_heads}")
        self.head_dim = head_dim or hidden_size // num_heads
        self.rope_theta = rope_theta
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.record_max_logits = False  # (1) QK-Clip protocol: the flag MuonClip sets
        self.max_logit_H: Tensor | None = None  # (2) the running per-head max MuonClip reads and resets

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, _ = x_BTD.shape
        H, K, D = self.num_heads, self.num_key_value_heads, self.head_dim
        q_BHTD = self.q_proj(x_BTD).view(B, T, H, D).transpose(1, 2)
        k_BKTD = self.k_proj(x_BTD).view(B, T, K, D).transpose(1, 2)
        v_BKTD = self.v_proj(x_BTD).view(B, T, K, D).transpose(1, 2)
        cos_TD, sin_TD = _rope_cos_sin(T, D, self.rope_theta, x_BTD.device, x_BTD.dtype)
        q_BHTD = q_BHTD * cos_TD + _rotate_half(q_BHTD) * sin_TD
        k_BKTD = k_BKTD * cos_TD + _rotate_half(k_BKTD) * sin_TD
        scale = 1 / math.sqrt(D)
        if self.record_max_logits:  # (3) record with the forward's softmax scale, after RoPE
            record_max_logits_(self, q_BHTD, k_BKTD, scale)
        out_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BKTD, v_BKTD, is_causal=True, scale=scale,
                                                  enable_gqa=K < H)
        return self.o_proj(out_BHTD.transpose(1, 2).reshape(B, T, H * D))
