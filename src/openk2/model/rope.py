"""Rotary position embedding for MLA's decoupled rope dims, with DeepSeek's YaRN.

The checkpoint stores the rope dims of `q_b_proj` / `kv_a_proj_with_mqa` interleaved as pairs
(x0, x1), (x2, x3), ...; each pair rotates by one frequency. The rotated output is laid out
de-interleaved ([evens, odds]), exactly as HF's `apply_rotary_pos_emb_interleave`; since q and k get the
same permutation, dot products are unchanged.
"""

from __future__ import annotations

import math

import torch

from openk2.model.config import ModelConfig, yarn_get_mscale


def rope_inv_freq(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rope_dim/2,) and the cos/sin attention factor (1.0 unless YaRN's mscale
    differs from mscale_all_dim), matching HF's `default` and `yarn` rope types."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    factor = float(rs["factor"])
    orig_max = int(rs["original_max_position_embeddings"])
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attention_factor = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, attention_factor


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape positions.shape + (rope_dim/2,), computed in fp32 then cast."""
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of x (..., T, R) with cos/sin broadcastable to (..., T, R/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
