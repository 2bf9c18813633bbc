"""Optimizers: MuonClip (Muon + AdamW + per-head QK-Clip) and its building blocks."""

from openk2.optim.muon import NS_COEFFICIENTS, adjusted_lr_ratio, zeropower_via_newtonschulz
from openk2.optim.muonclip import MuonClip, moonlight_classifier
from openk2.optim.qk_clip import (
    GQAAttention,
    GQAAttentionLike,
    clip_factors,
    find_attention_layers,
    max_logits_per_head,
    qk_clip_,
    record_max_logits_,
)

__all__ = [
    "NS_COEFFICIENTS", "GQAAttention", "GQAAttentionLike", "MuonClip", "adjusted_lr_ratio", "clip_factors",
    "find_attention_layers", "max_logits_per_head", "moonlight_classifier", "qk_clip_", "record_max_logits_",
    "zeropower_via_newtonschulz",
]
