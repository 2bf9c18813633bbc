"""Model configuration with Hugging Face `DeepseekV3Config` field names.

The field names are exactly those of the released Kimi K2 / DeepSeek-V3 `config.json`, so a config
round-trips through `to_hf_dict()` / `from_hf_dict()` and checkpoints load in transformers, vLLM and
SGLang as `DeepseekV3ForCausalLM`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """An invalid or inconsistent model configuration."""


@dataclass
class ModelConfig:
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    # MLA
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # RoPE
    max_position_embeddings: int = 131072
    rope_theta: float = 50000.0
    rope_scaling: dict[str, Any] | None = None
    # misc
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163585
    # --- openk2 training knobs (not part of HF config.json) ---
    # Aux-loss-free balancing: bias += rate * sign(mean_load - load) after each optimizer step.
    bias_update_rate: float = 0.001
    # Weight of the sequence-wise auxiliary balance loss added to the LM loss (0 disables).
    seq_aux_loss_coef: float = 0.0
    # Routed-expert kernel: "auto" | "grouped_mm" | "padded_bmm".
    moe_impl: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """q_head_dim^-0.5 x mscale^2, with DeepSeek's YaRN mscale (`mscale_all_dim`)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_get_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0,
             f"q_lora_rank must be None or > 0, got {self.q_lora_rank}")
        need(self.num_key_value_heads == self.num_attention_heads,
             "MLA needs num_key_value_heads == num_attention_heads "
             f"(got {self.num_key_value_heads} vs {self.num_attention_heads})")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace={self.first_k_dense_replace} must lie in [0, num_hidden_layers]")
        need(self.scoring_func == "sigmoid", f"only scoring_func='sigmoid' is supported, got {self.scoring_func!r}")
        need(self.hidden_act == "silu", f"only hidden_act='silu' is supported, got {self.hidden_act!r}")
        need(self.moe_impl in ("auto", "grouped_mm", "padded_bmm"),
             f"moe_impl must be one of auto, grouped_mm, padded_bmm; got {self.moe_impl!r}")
        need(self.moe_layer_freq >= 1, f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        routes = any(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        if not all(self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            need(self.intermediate_size > 0, "intermediate_size must be > 0 for dense layers")
        # The routing settings only matter if some layer routes: an all-dense model (first_k_dense_replace =
        # num_hidden_layers) keeps whatever its config carries, e.g. transformers' defaults n_group=8 with fewer
        # experts, and transformers runs it; so does openk2.
        if routes:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must lie in [1, n_routed_experts="
                 f"{self.n_routed_experts}]")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
            need(1 <= self.topk_group <= self.n_group,
                 f"topk_group={self.topk_group} must lie in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1:
                need(per_group >= 2, "group-limited routing scores each group by its top-2 experts: "
                     f"need >= 2 experts per group, got {per_group}")
            need(self.topk_group * per_group >= self.num_experts_per_tok,
                 f"topk_group={self.topk_group} groups of {per_group} experts cannot hold "
                 f"num_experts_per_tok={self.num_experts_per_tok}")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            need(kind == "yarn", f"only rope_scaling type 'yarn' is supported, got {kind!r}")
            for key in ("factor", "original_max_position_embeddings"):
                need(key in rs, f"rope_scaling needs {key!r}; got keys {sorted(rs)}")

    # -------------------------------------------------------------- conversion
    def replace(self, **overrides: Any) -> ModelConfig:
        unknown = sorted(set(overrides) - set(field_names()))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(field_names())}")
        return dataclasses.replace(self, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` of a `DeepseekV3ForCausalLM` checkpoint."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in OPENK2_ONLY}
        d.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            torch_dtype="bfloat16",
            rope_interleave=True,
            attention_dropout=0.0,
            use_cache=True,
            # Keep YaRN math on the config's max_position_embeddings; see rope.py.
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a HF `config.json` dict (DeepseekV3/kimi_k2); unknown HF keys are ignored."""
        arch = d.get("architectures") or ["DeepseekV3ForCausalLM"]
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "kimi_k2") or "DeepseekV3ForCausalLM" not in arch:
            raise ConfigError(
                f"unsupported architecture {arch} / model_type {model_type!r}: openk2 loads "
                "DeepseekV3ForCausalLM checkpoints (model_type deepseek_v3 or kimi_k2)"
            )
        names = set(field_names()) - OPENK2_ONLY
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("rope_scaling") is None and isinstance(d.get("rope_parameters"), dict):
            rp = dict(d["rope_parameters"])
            kwargs.setdefault("rope_theta", rp.pop("rope_theta", cls.rope_theta))
            if rp.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in rp.items()}
        for key in ("eos_token_id", "bos_token_id"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = kwargs[key][0]
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        return cls(**kwargs)


OPENK2_ONLY = frozenset({"bias_update_rate", "seq_aux_loss_coef", "moe_impl"})


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


__all__ = ["ConfigError", "ModelConfig", "field_names", "yarn_get_mscale"]
