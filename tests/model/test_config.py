import pytest
import torch

from openk2.model import ConfigError, K2Model, ModelConfig, count_params, get_preset, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_analytic_count_matches_meta_model(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = K2Model(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg).total


def test_kimi_k2_counts_match_release():
    c = count_params(get_preset("kimi-k2"))
    assert round(c.total / 1e9, 1) == 1026.4
    assert round(c.activated / 1e9, 2) == 32.86


def test_kimi_k2_preset_is_release_config():
    cfg = get_preset("kimi-k2")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (7168, 61, 64, 163840)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.first_k_dense_replace) == (
        384, 8, 1, 1)
    assert cfg.routed_scaling_factor == 2.827 and cfg.rope_theta == 50000.0
    assert cfg.rope_scaling["factor"] == 32.0 and cfg.rope_scaling["original_max_position_embeddings"] == 4096
    assert abs(cfg.softmax_scale - 192**-0.5 * (0.1 * torch.log(torch.tensor(32.0)).item() + 1) ** 2) < 1e-9


def test_nano_is_k2_shaped_and_small():
    cfg = get_preset("nano")
    c = count_params(cfg)
    assert 10e6 <= c.total <= 30e6
    assert cfg.n_shared_experts == 1 and cfg.first_k_dense_replace == 1
    assert cfg.n_routed_experts // cfg.num_experts_per_tok >= 8  # many small experts


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(num_experts_per_tok=9, n_routed_experts=8), "num_experts_per_tok"),
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(n_routed_experts=10, n_group=4), "divisible"),
        (dict(num_key_value_heads=2), "num_key_value_heads"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "yarn"),
    ],
)
def test_inconsistent_config_raises(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        get_preset("tiny", **overrides)


def test_unknown_preset_and_key_list_valid_ones():
    with pytest.raises(ConfigError, match="valid presets: kimi-k2"):
        get_preset("kimi-k3")
    with pytest.raises(ConfigError, match="valid keys: .*hidden_size"):
        get_preset("tiny", hidden_sise=3)


def test_hf_dict_round_trip():
    cfg = get_preset("kimi-k2")
    d = cfg.to_hf_dict()
    assert d["model_type"] == "deepseek_v3" and d["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "moe_impl" not in d
    assert ModelConfig.from_hf_dict(d) == cfg
    with pytest.raises(ConfigError, match="unsupported architecture"):
        ModelConfig.from_hf_dict({**d, "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
