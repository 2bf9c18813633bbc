"""Multi-head Latent Attention (MLA) as in DeepSeek-V3 / Kimi K2.

Training runs the expanded form, through `scaled_dot_product_attention` or, on CPU for short sequences, the kernel
library's `causal_attention` (fp32, forward and backward; `few_rows`) or the reference `blocked_causal_attention`.
Cached generation runs the absorbed form: the cache holds only the normalized latent `c_kv` and the rotated shared
`k_pe` (`kv_lora_rank + qk_rope_head_dim` values per token per layer), `W_uk` is folded into the query and `W_uv`
into the output, so attention is one multi-query attention over the latent. A long chunk with a cache (a prompt's
prefill) stores its latents the same way but attends in the expanded form, where that costs fewer FLOPs
(`MLA._expand_pays`), as DeepSeek-V3's own inference does; on CPU through the kernel library's `masked_attention`
(fp32; `few_rows`) or `blocked_masked_attention`, both of which skip the causal blocks no query of a block can see."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from openk2.model import few_rows
from openk2.model.config import ModelConfig
from openk2.model.matmul import Linear
from openk2.model.norm import RMSNorm
from openk2.model.rope import apply_rope

if TYPE_CHECKING:
    from openk2.model.kv_cache import LayerCache

# Query rows per block when recording max logits, to bound memory at long context.
_MAX_LOGIT_QUERY_BLOCK = 512
# The low-rank norms use HF's default eps regardless of `rms_norm_eps` (DeepseekV3RMSNorm(rank)).
_LORA_NORM_EPS = 1e-6
# Training attention on CPU up to this length uses `blocked_causal_attention` (its memory grows as T^2).
_BLOCKED_ATTENTION_MAX_LEN = 1024
_BLOCKED_ATTENTION_QUERY_ROWS = 128
# Cached (absorbed) attention materialises [B, T*H, S] scores; a long prefill runs in query blocks of at most
# this many score elements (32 M, 128 MiB fp32), else a 12k-token prompt needs ~2 GiB per layer, and the passes
# over it, not the FLOPs, set the prefill time (5x slower on CPU than blocks).
_ABSORBED_SCORE_BLOCK = 1 << 25
# A cached prefill's attention on CPU in fp32 runs the kernel library's `masked_attention` (`few_rows`), 1.5-2x
# `blocked_masked_attention` at the bench configs' heads (docs/benchmarks.md, "Prefill attention as a kernel");
# False keeps the reference.
_MASKED_ATTENTION_KERNEL = True
# Training attention on CPU in fp32 up to `_BLOCKED_ATTENTION_MAX_LEN` runs the kernel library's `causal_attention`
# (`few_rows`, forward and backward); False keeps `blocked_causal_attention`.
_CAUSAL_ATTENTION_KERNEL = True


def blocked_causal_attention(
    q_BHTQ: torch.Tensor, k_BHTQ: torch.Tensor, v_BHTV: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal softmax attention as batched matmuls over blocks of query rows, each against only the keys up to
    its last row: the fully-masked upper-right blocks are never computed (1/4 of the work at T = 2 blocks).

    On CPU this beats SDPA's kernels for short sequences: 17 vs 24 ms fwd + bwd at the bench's [8, 4, 256, 48]
    (flash, V padded to 48) and 26 ms (math path, which also computes the masked half).
    """
    B, H, T, Q = q_BHTQ.shape
    q_MTQ, k_MTQ = q_BHTQ.reshape(B * H, T, Q), k_BHTQ.reshape(B * H, T, Q)
    v_MTV = v_BHTV.reshape(B * H, T, -1)
    rows = _BLOCKED_ATTENTION_QUERY_ROWS
    out = []
    for start in range(0, T, rows):
        stop = min(start + rows, T)
        future_tS = torch.ones(stop - start, stop, dtype=torch.bool, device=q_BHTQ.device).triu(start + 1)
        bias_tS = torch.zeros(future_tS.shape, dtype=q_BHTQ.dtype, device=q_BHTQ.device).masked_fill_(
            future_tS, float("-inf")
        )
        scores_MtS = torch.baddbmm(bias_tS, q_MTQ[:, start:stop], k_MTQ[:, :stop].transpose(1, 2), alpha=scale)
        out.append(torch.bmm(scores_MtS.softmax(dim=-1), v_MTV[:, :stop]))
    return torch.cat(out, dim=1).view(B, H, T, -1)


def blocked_masked_attention(
    q_BHTQ: torch.Tensor, k_BHSQ: torch.Tensor, v_BHSV: torch.Tensor, mask_BTS: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention under a boolean mask (True: attend) as batched matmuls over blocks of query rows, each
    against only the keys up to the last one any of its rows may see: a cached prefill's causal upper-right blocks
    are never computed. Every query row must see at least one key (the caches guarantee it).

    On CPU this beats SDPA with a mask, which computes every block and converts the mask for each call: 3.9 vs 5.3
    ms at config A's [1, 4, 512, 48], 12.8 vs 17.3 ms at config C's [1, 8, 512, 96] (2 threads)."""
    B, H, T, _ = q_BHTQ.shape
    rows = _BLOCKED_ATTENTION_QUERY_ROWS
    seen_TS = mask_BTS.any(dim=0)
    blocks_B: list[list[torch.Tensor]] = [[] for _ in range(B)]
    for start in range(0, T, rows):
        stop = min(start + rows, T)
        keys = int(seen_TS[start:stop].any(dim=0).nonzero()[-1]) + 1
        for b in range(B):
            bias_tS = torch.zeros(stop - start, keys, dtype=q_BHTQ.dtype, device=q_BHTQ.device).masked_fill_(
                ~mask_BTS[b, start:stop, :keys], float("-inf"))
            scores_HtS = torch.baddbmm(bias_tS, q_BHTQ[b, :, start:stop], k_BHSQ[b, :, :keys].transpose(1, 2),
                                       alpha=scale)
            probs_HtS = scores_HtS.softmax(dim=-1, dtype=torch.float32).to(v_BHSV.dtype)
            blocks_B[b].append(torch.bmm(probs_HtS, v_BHSV[b, :, :keys]))
    return torch.stack([torch.cat(blocks, dim=1) for blocks in blocks_B])


class _KernelCausalAttention(torch.autograd.Function):
    """`blocked_causal_attention` by the kernel library's `causal_attention` (`few_rows`), and each head's largest
    logit [B, H] (no gradient): the backward recomputes the probabilities from the forward's log-sum-exp. The output
    is laid out [B, T, H, V] (a [B, H, T, V] view)."""

    @staticmethod
    def forward(ctx, q_BHTQ: torch.Tensor, k_BHTQ: torch.Tensor, v_BHTV: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        out_BHTV, lse_BHT, max_logit_BH = few_rows.causal_attention(q_BHTQ, k_BHTQ, v_BHTV, scale)
        ctx.save_for_backward(q_BHTQ, k_BHTQ, v_BHTV, out_BHTV, lse_BHT)
        ctx.scale = scale
        ctx.mark_non_differentiable(max_logit_BH)
        return out_BHTV, max_logit_BH

    @staticmethod
    def backward(ctx, grad_BHTV: torch.Tensor, _: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        q_BHTQ, k_BHTQ, v_BHTV, out_BHTV, lse_BHT = ctx.saved_tensors
        return (*few_rows.causal_attention_backward(grad_BHTV, q_BHTQ, k_BHTQ, v_BHTV, out_BHTV, lse_BHT,
                                                    ctx.scale), None)


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
            self.q_proj = Linear(D, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=_LORA_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + self.rope_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=_LORA_NORM_EPS)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, D, bias=cfg.attention_bias)
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
        ckv_BTC, k_pe_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        ckv_BTC = self.kv_a_layernorm(ckv_BTC)
        if cache is not None:
            attend = self._expanded_cached if self._expand_pays(T) else self._absorbed
            out_BTHV = attend(q_BTHQ, ckv_BTC, k_pe_BTR, cos_BTR, sin_BTR, cache)
            return self.o_proj(out_BTHV.reshape(B, T, H * self.v_dim))

        q_nope_BTHN, q_pe_BTHR = q_BTHQ.split([self.nope_dim, self.rope_dim], dim=-1)
        cos, sin = cos_BTR.unsqueeze(2), sin_BTR.unsqueeze(2)  # broadcast over heads
        q_pe_BTHR = apply_rope(q_pe_BTHR, cos, sin)
        k_pe_BTR = apply_rope(k_pe_BTR.unsqueeze(2), cos, sin).squeeze(2)
        kv_BTHX = self.kv_b_proj(ckv_BTC).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope_BTHN, v_BTHV = kv_BTHX.split([self.nope_dim, self.v_dim], dim=-1)
        # Concatenating the transposed parts lays q and k out [B, H, T, Q] contiguously, as the matmuls want them.
        q_BHTQ = torch.cat((q_nope_BTHN.transpose(1, 2), q_pe_BTHR.transpose(1, 2)), dim=-1)
        k_pe_BHTR = k_pe_BTR.unsqueeze(1).expand(B, H, T, self.rope_dim)
        k_BHTQ = torch.cat((k_nope_BTHN.transpose(1, 2), k_pe_BHTR), dim=-1)
        v_BHTV = v_BTHV.transpose(1, 2)
        max_logit_BH = None  # QK-Clip's per-sequence max logits, where the attention computes them anyway
        if q_BHTQ.device.type == "cpu" and T <= _BLOCKED_ATTENTION_MAX_LEN:
            if _CAUSAL_ATTENTION_KERNEL and few_rows.takes_causal_attention(q_BHTQ, k_BHTQ, v_BHTV):
                out_BHTV, max_logit_BH = _KernelCausalAttention.apply(q_BHTQ, k_BHTQ, v_BHTV, self.scale)
            else:
                out_BHTV = blocked_causal_attention(q_BHTQ, k_BHTQ, v_BHTV, self.scale)
        else:
            if self.v_dim < self.qk_dim:
                # Zero-padding V to the QK head dim lets SDPA use its fused (flash) kernel instead of the math path
                # that materializes [B, H, T, T] scores; the padded output columns are zero.
                v_BHTV = F.pad(v_BHTV, (0, self.qk_dim - self.v_dim))
            out_BHTV = F.scaled_dot_product_attention(q_BHTQ, k_BHTQ, v_BHTV, is_causal=True, scale=self.scale)
            out_BHTV = out_BHTV[..., : self.v_dim]
        if self.record_max_logits:
            self._record_max_logits(q_BHTQ, k_BHTQ, max_logit_BH)
        return self.o_proj(out_BHTV.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _expand_pays(self, T: int) -> bool:
        """Whether a chunk of T queries is cheaper in the expanded form: per query-key pair and head the absorbed
        form costs (L + C) multiply-adds, the expanded (Q + V), plus C (N + V) per key and head to expand the
        cached latents, so it pays from T (L + C - Q - V) > C (N + V) (T > ~64-170 for the presets)."""
        C, N, V = self.kv_lora_rank, self.nope_dim, self.v_dim
        saved_per_query = (C + self.rope_dim + C) - (self.qk_dim + V)
        return T * saved_per_query > C * (N + V)

    def _expanded_cached(
        self,
        q_BTHQ: torch.Tensor,
        ckv_BTC: torch.Tensor,
        k_pe_BTR: torch.Tensor,
        cos_BTR: torch.Tensor,
        sin_BTR: torch.Tensor,
        cache: LayerCache,
    ) -> torch.Tensor:
        """Attention of a long chunk (a prefill) with a cache: the chunk's latents are stored as in `_absorbed`,
        then every cached latent is expanded to per-head keys and values (`kv_b_proj`) and attention runs in the
        training form under the cache's mask (padding, causality), as DeepSeek-V3's inference does for prefill."""
        B, T, H, _ = q_BTHQ.shape
        N, C, V = self.nope_dim, self.kv_lora_rank, self.v_dim
        pe_BTXR = apply_rope(
            torch.cat((q_BTHQ[..., N:], k_pe_BTR.unsqueeze(2)), dim=2), cos_BTR.unsqueeze(2), sin_BTR.unsqueeze(2)
        )
        latent_BSL, mask_BTS = cache.append(torch.cat((ckv_BTC, pe_BTXR[:, :, H]), dim=-1))
        S = latent_BSL.shape[1]
        kv_BSHX = self.kv_b_proj(latent_BSL[..., :C]).view(B, S, H, N + V)
        k_nope_BSHN, v_BSHV = kv_BSHX.split([N, V], dim=-1)
        q_BHTQ = torch.cat((q_BTHQ[..., :N], pe_BTXR[:, :, :H]), dim=-1).transpose(1, 2)
        k_pe_BHSR = latent_BSL[..., C:].unsqueeze(1).expand(B, H, S, self.rope_dim)
        k_BHSQ = torch.cat((k_nope_BSHN.transpose(1, 2), k_pe_BHSR), dim=-1)
        v_BHSV = v_BSHV.transpose(1, 2)
        if _MASKED_ATTENTION_KERNEL and few_rows.takes_masked_attention(q_BHTQ, k_BHSQ, v_BHSV):
            return few_rows.masked_attention(q_BHTQ, k_BHSQ, v_BHSV, mask_BTS, self.scale).transpose(1, 2)
        if q_BHTQ.device.type == "cpu":
            return blocked_masked_attention(q_BHTQ, k_BHSQ, v_BHSV, mask_BTS, self.scale).transpose(1, 2)
        if self.qk_dim > V:  # as in training: SDPA's fused kernel wants V at the QK head dim
            v_BHSV = F.pad(v_BHSV, (0, self.qk_dim - V))
        out_BHTV = F.scaled_dot_product_attention(q_BHTQ, k_BHSQ, v_BHSV, attn_mask=mask_BTS.unsqueeze(1),
                                                  scale=self.scale)
        return out_BHTV[..., :V].transpose(1, 2)

    def _absorbed(
        self,
        q_BTHQ: torch.Tensor,
        ckv_BTC: torch.Tensor,
        k_pe_BTR: torch.Tensor,
        cos_BTR: torch.Tensor,
        sin_BTR: torch.Tensor,
        cache: LayerCache,
    ) -> torch.Tensor:
        """Attention over the cached latents; written for few queries (decode), where per-op costs dominate."""
        B, T, H, _ = q_BTHQ.shape
        N, C = self.nope_dim, self.kv_lora_rank
        # One rope call for the query heads and the shared key (as an extra head).
        pe_BTXR = apply_rope(
            torch.cat((q_BTHQ[..., N:], k_pe_BTR.unsqueeze(2)), dim=2), cos_BTR.unsqueeze(2), sin_BTR.unsqueeze(2)
        )
        latent_BSL, mask_BTS = cache.append(torch.cat((ckv_BTC, pe_BTXR[:, :, H]), dim=-1))
        w_HXC = self.kv_b_proj.weight.view(H, N + self.v_dim, C)
        q_lat_BTHC = torch.einsum("bthn,hnc->bthc", q_BTHQ[..., :N], w_HXC[:, :N])
        # All heads share one latent key/value: fold heads into the query axis (multi-query attention).
        q_BTHL = torch.cat((q_lat_BTHC, pe_BTXR[:, :, :H]), dim=-1)
        rows = max(1, _ABSORBED_SCORE_BLOCK // max(1, B * H * latent_BSL.shape[1]))
        o_lat_BTHC = torch.cat([self._absorbed_block(q_BTHL[:, t:t + rows], latent_BSL, mask_BTS[:, t:t + rows], C)
                                for t in range(0, T, rows)], dim=1) if rows < T else \
            self._absorbed_block(q_BTHL, latent_BSL, mask_BTS, C)
        return torch.einsum("bthc,hvc->bthv", o_lat_BTHC, w_HXC[:, N:])

    def _absorbed_block(self, q_BTHL: torch.Tensor, latent_BSL: torch.Tensor, mask_BTS: torch.Tensor,
                        C: int) -> torch.Tensor:
        B, T, H, _ = q_BTHL.shape
        # Plain matmul + softmax: SDPA's CPU math path costs several extra ops per call to handle masks.
        scores_BMS = torch.bmm(q_BTHL.reshape(B, T * H, -1), latent_BSL.transpose(1, 2)).mul_(self.scale)
        scores_BMS.view(B, T, H, -1).masked_fill_(~mask_BTS.unsqueeze(2), float("-inf"))
        probs_BMS = scores_BMS.float().softmax(dim=-1).to(latent_BSL.dtype)
        return torch.bmm(probs_BMS, latent_BSL[..., :C]).view(B, T, H, C)

    @torch.no_grad()
    def _record_max_logits(self, q_BHTQ: torch.Tensor, k_BHTQ: torch.Tensor,
                           max_logit_BH: torch.Tensor | None = None) -> None:
        """Signed per-head max of scale * q.k over causal (unmasked) pairs, folded into max_logit_H; computed here
        unless the attention kernel's per-sequence maxima are given."""
        if max_logit_BH is not None:
            best_H = max_logit_BH.amax(dim=0)
            self.max_logit_H = best_H if self.max_logit_H is None else torch.maximum(self.max_logit_H, best_H)
            return
        T = q_BHTQ.shape[2]
        best_H = q_BHTQ.new_full((q_BHTQ.shape[1],), float("-inf"), dtype=torch.float32)
        for start in range(0, T, _MAX_LOGIT_QUERY_BLOCK):
            stop = min(start + _MAX_LOGIT_QUERY_BLOCK, T)
            scores_BHtS = q_BHTQ[:, :, start:stop] @ k_BHTQ[:, :, :stop].transpose(-1, -2)
            # Max over the batch first: the mask is the same for every sequence, so masking the [H, t, S] maxima
            # gives the same result as masking every score, at 1/B of the masking and reduction traffic.
            scores_HtS = scores_BHtS.amax(dim=0)
            future_tS = torch.ones(stop - start, stop, dtype=torch.bool, device=q_BHTQ.device).triu(start + 1)
            scores_HtS = scores_HtS.masked_fill(future_tS, float("-inf"))
            best_H = torch.maximum(best_H, scores_HtS.amax(dim=(1, 2)).float())
        best_H *= self.scale
        self.max_logit_H = best_H if self.max_logit_H is None else torch.maximum(self.max_logit_H, best_H)
