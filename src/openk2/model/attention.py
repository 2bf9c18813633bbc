"""Multi-head Latent Attention (MLA) as in DeepSeek-V3 / Kimi K2.

Training runs the expanded form through `scaled_dot_product_attention`. Cached generation runs the
absorbed form: the cache holds only the normalized latent `c_kv` and the rotated shared `k_pe`
(`kv_lora_rank + qk_rope_head_dim` values per token per layer), `W_uk` is folded into the query and `W_uv`
into the output, so attention is one multi-query attention over the latent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from openk2.model.config import ModelConfig
from openk2.model.rope import apply_rope

if TYPE_CHECKING:
    from openk2.model.kv_cache import LayerCache

# Query rows per block when recording max logits, to bound memory at long context.
_MAX_LOGIT_QUERY_BLOCK = 512
# The low-rank norms use HF's default eps regardless of `rms_norm_eps` (DeepseekV3RMSNorm(rank)).
_LORA_NORM_EPS = 1e-6


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        D, H = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = nn.RMSNorm(cfg.q_lora_rank, eps=_LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + self.rope_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = nn.RMSNorm(cfg.kv_lora_rank, eps=_LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=cfg.attention_bias)
        # QK-Clip support: when `record_max_logits` is set, each training forward folds the per-head
        # max pre-softmax logit into `max_logit_H` (max over calls, so gradient accumulation works);
        # the optimizer reads and resets it.
        self.record_max_logits = False
        self.max_logit_H: torch.Tensor | None = None

    @property
    def q_up_proj(self) -> nn.Linear:
        """The projection whose rows are per-head [q_nope | q_rope] (q_b_proj, or q_proj without q LoRA)."""
        return self.q_proj if hasattr(self, "q_proj") else self.q_b_proj

    def _queries(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x_BTD)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BTR: torch.Tensor,
        sin_BTR: torch.Tensor,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H = self.n_heads
        q_BTHQ = self._queries(x_BTD).view(B, T, H, self.qk_dim)
        q_nope_BTHN, q_pe_BTHR = q_BTHQ.split([self.nope_dim, self.rope_dim], dim=-1)
        ckv_BTC, k_pe_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        ckv_BTC = self.kv_a_layernorm(ckv_BTC)
        cos, sin = cos_BTR.unsqueeze(2), sin_BTR.unsqueeze(2)  # broadcast over heads
        q_pe_BTHR = apply_rope(q_pe_BTHR, cos, sin)
        k_pe_BTR = apply_rope(k_pe_BTR.unsqueeze(2), cos, sin).squeeze(2)
        if cache is not None:
            out_BTHV = self._absorbed(q_nope_BTHN, q_pe_BTHR, ckv_BTC, k_pe_BTR, cache)
            return self.o_proj(out_BTHV.reshape(B, T, H * self.v_dim))

        kv_BTHX = self.kv_b_proj(ckv_BTC).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope_BTHN, v_BTHV = kv_BTHX.split([self.nope_dim, self.v_dim], dim=-1)
        q_BHTQ = torch.cat((q_nope_BTHN, q_pe_BTHR), dim=-1).transpose(1, 2)
        k_BHTQ = torch.cat((k_nope_BTHN, k_pe_BTR.unsqueeze(2).expand(B, T, H, self.rope_dim)), dim=-1)
        k_BHTQ = k_BHTQ.transpose(1, 2)
        if self.record_max_logits:
            self._record_max_logits(q_BHTQ, k_BHTQ)
        out_BHTV = F.scaled_dot_product_attention(
            q_BHTQ, k_BHTQ, v_BTHV.transpose(1, 2), is_causal=True, scale=self.scale
        )
        return self.o_proj(out_BHTV.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _absorbed(
        self,
        q_nope_BTHN: torch.Tensor,
        q_pe_BTHR: torch.Tensor,
        ckv_BTC: torch.Tensor,
        k_pe_BTR: torch.Tensor,
        cache: LayerCache,
    ) -> torch.Tensor:
        B, T, H, _ = q_nope_BTHN.shape
        latent_BSL, mask_BTS = cache.append(torch.cat((ckv_BTC, k_pe_BTR), dim=-1))
        w_HXC = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk_HNC, w_uv_HVC = w_HXC.split([self.nope_dim, self.v_dim], dim=1)
        q_lat_BTHC = torch.einsum("bthn,hnc->bthc", q_nope_BTHN, w_uk_HNC)
        # All heads share one latent key/value: fold heads into the query axis (multi-query attention).
        q_B1ML = torch.cat((q_lat_BTHC, q_pe_BTHR), dim=-1).reshape(B, 1, T * H, -1)
        mask_B1MS = mask_BTS.repeat_interleave(H, dim=1).unsqueeze(1)
        latent_B1SL = latent_BSL.unsqueeze(1)
        o_lat_B1MC = F.scaled_dot_product_attention(
            q_B1ML, latent_B1SL, latent_B1SL[..., : self.kv_lora_rank], attn_mask=mask_B1MS, scale=self.scale
        )
        return torch.einsum("bthc,hvc->bthv", o_lat_B1MC.view(B, T, H, self.kv_lora_rank), w_uv_HVC)

    @torch.no_grad()
    def _record_max_logits(self, q_BHTQ: torch.Tensor, k_BHTQ: torch.Tensor) -> None:
        """Signed per-head max of scale * q.k over causal (unmasked) pairs, folded into max_logit_H."""
        T = q_BHTQ.shape[2]
        best_H = q_BHTQ.new_full((q_BHTQ.shape[1],), float("-inf"), dtype=torch.float32)
        for start in range(0, T, _MAX_LOGIT_QUERY_BLOCK):
            stop = min(start + _MAX_LOGIT_QUERY_BLOCK, T)
            scores_BHtS = q_BHTQ[:, :, start:stop] @ k_BHTQ[:, :, :stop].transpose(-1, -2)
            future_tS = torch.ones(stop - start, stop, dtype=torch.bool, device=q_BHTQ.device).triu(start + 1)
            scores_BHtS = scores_BHtS.masked_fill(future_tS, float("-inf"))
            best_H = torch.maximum(best_H, scores_BHtS.amax(dim=(0, 2, 3)).float())
        best_H *= self.scale
        self.max_logit_H = best_H if self.max_logit_H is None else torch.maximum(self.max_logit_H, best_H)
