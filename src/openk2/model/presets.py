"""Named model presets: the released configs and the CPU toy sizes.

`kimi-k2`, `deepseek-v3` and `moonlight-16b-a3b` carry the values of their released `config.json`
(see `../shared/docs/k2-recipe.md` §2.1). `nano` is K2's sparsity pattern scaled down for the CPU demo
(many small experts, 1 shared expert, 1 dense first layer); `tiny` is for tests.
"""

from __future__ import annotations

from typing import Any

from openk2.model.config import ConfigError, ModelConfig

_K2_YARN = {
    "type": "yarn",
    "factor": 32.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 1.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    "kimi-k2": dict(rope_scaling=_K2_YARN),  # the ModelConfig defaults are K2's config.json
    "deepseek-v3": dict(
        vocab_size=129280,
        num_attention_heads=128,
        num_key_value_heads=128,
        n_routed_experts=256,
        first_k_dense_replace=3,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        max_position_embeddings=163840,
        rope_theta=10000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        num_nextn_predict_layers=1,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "moonlight-16b-a3b": dict(
        hidden_size=2048,
        intermediate_size=11264,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=None,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        routed_scaling_factor=2.446,
        max_position_embeddings=8192,
        rope_theta=50000.0,
        rope_scaling=None,
        rms_norm_eps=1e-5,
    ),
    # CPU demo: ~20M parameters, sparsity 32 (32 experts, top-2 + 1 shared), 1 dense layer.
    "nano": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=32,
        num_experts_per_tok=2,
        n_shared_experts=1,
        routed_scaling_factor=2.827,
        max_position_embeddings=1024,
        rope_theta=50000.0,
        rope_scaling=None,
        bos_token_id=None,
        eos_token_id=None,
    ),
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rope_scaling=None,
        bos_token_id=None,
        eos_token_id=None,
    ),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with optional field overrides (unknown names/keys raise `ConfigError`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return ModelConfig().replace(**{**PRESETS[name], **overrides})
