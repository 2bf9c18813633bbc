"""Analytic parameter counts (total and activated per token), embeddings included."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from openk2.model.config import ModelConfig


@dataclass
class ParamCount:
    total: int
    activated: int
    embedding: int  # input embedding rows (counted in both numbers above)
    attention: int
    dense_mlp: int
    routed_experts: int
    shared_experts: int
    routers: int
    norms_and_head: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_params(cfg: ModelConfig) -> ParamCount:
    D, H, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    qk, bias = cfg.qk_head_dim, int(cfg.attention_bias)
    if cfg.q_lora_rank is None:
        q = D * H * qk
    else:
        q = (D + bias) * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk
    kv = ((D + bias) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
          + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    attn_layer = q + kv + H * cfg.v_head_dim * D + bias * D
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(L))
    dense_layers = L - moe_layers
    expert = 3 * D * cfg.moe_intermediate_size
    embedding = cfg.vocab_size * D
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * D
    norms = 2 * D * L + D
    routed = moe_layers * cfg.n_routed_experts * expert
    shared = moe_layers * cfg.n_shared_experts * expert
    routers = moe_layers * cfg.n_routed_experts * D
    attention = L * attn_layer
    dense = dense_layers * 3 * D * cfg.intermediate_size
    total = embedding + head + norms + attention + dense + routed + shared + routers
    activated = total - routed + moe_layers * cfg.num_experts_per_tok * expert
    return ParamCount(total, activated, embedding, attention, dense, routed, shared, routers, norms + head)
