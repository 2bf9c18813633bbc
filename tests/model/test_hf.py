"""HF checkpoints: openk2 <-> transformers `DeepseekV3ForCausalLM` logits parity, sharding, dtypes, errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import openk2.model.hf as hf_module
from openk2.cli import app
from openk2.model import CheckpointError, ConfigError, K2Model, build_model, get_preset, load_hf, save_hf

YARN = {
    "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
}
# initializer_range 0.1 (not 0.02) so that attention and experts move the logits well above the tolerance.
CONFIGS = {
    "tiny": {},  # q LoRA, n_group=2, topk_group=1
    "no_q_lora": dict(q_lora_rank=None),
    "groups": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3),
    "two_dense": dict(first_k_dense_replace=2, num_hidden_layers=4),
    "yarn": dict(rope_scaling=YARN),
    "yarn_mscale": dict(rope_scaling={**YARN, "mscale": 0.707, "beta_fast": 16}),  # cos/sin attention factor != 1
    "tied": dict(tie_word_embeddings=True),
}
T = 96  # > original_max_position_embeddings of the YaRN configs


def _random_model(seed: int = 0, **overrides) -> K2Model:
    """A tiny model whose norms and router selection biases are random too (init leaves them 1 and 0)."""
    model = build_model(get_preset("tiny", initializer_range=0.1, **overrides), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for m in model.moe_layers():
            bias = m.gate.e_score_correction_bias
            bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
    return model.eval()


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


# ------------------------------------------------------------------ parity with transformers
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_hf_loads_in_transformers_with_same_logits(name: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = _random_model(**CONFIGS[name])
    save_hf(model, tmp_path / "ckpt")
    ids = _ids(model.config.vocab_size)
    ours = _logits(model, ids)
    for impl in ("eager", "sdpa"):
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation=impl).eval()
        assert type(ref).__name__ == "DeepseekV3ForCausalLM" and ref.dtype == torch.float32
        theirs = _logits(ref, ids)
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-4, f"{name}/{impl}: max |logit diff| {diff:.3g}"
        if model.config.rope_scaling:  # positions past the original context, where YaRN interpolates
            assert (ours[:, 64:] - theirs[:, 64:]).abs().max().item() <= 1e-4
    assert ours.abs().max() > 0.5  # the comparison is not between near-zero logits

    if name == "tiny":  # the selection bias really changes the routing (so HF must apply it identically)
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.zero_()
        assert (_logits(model, ids) - ours).abs().max() > 1e-2
    if model.config.rope_scaling:  # YaRN really changes the logits past position 64
        plain = K2Model(model.config.replace(rope_scaling=None))
        plain.load_state_dict(model.state_dict())
        assert (_logits(plain.eval(), ids)[:, 64:] - ours[:, 64:]).abs().max() > 1e-2


def _hf_config(**overrides):
    from transformers import DeepseekV3Config

    kw = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=2, topk_group=1, first_k_dense_replace=1, max_position_embeddings=256, initializer_range=0.1,
    )
    return DeepseekV3Config(**{**kw, **overrides})


def _random_hf_model(config):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    ref = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.endswith("e_score_correction_bias"):
                t.normal_(0, 0.1)
            elif name.endswith("norm.weight"):
                t.add_(0.2 * torch.randn_like(t))
    return ref


HF_CONFIGS = {
    "default": {},
    # No layer routes (first_k_dense_replace = num_hidden_layers), so the MoE settings are inert: transformers'
    # default n_group=8 and topk_group=4 with only 4 routed experts and top-8 must still load.
    "all_dense_default_groups": dict(first_k_dense_replace=3, n_routed_experts=4, n_group=8, topk_group=4,
                                     num_experts_per_tok=8),
    "no_q_lora_tied": dict(q_lora_rank=None, tie_word_embeddings=True),
    "yarn_rope_parameters": dict(  # transformers 5 writes `rope_parameters`, not `rope_scaling`
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_transformers_checkpoint_loads_with_same_logits(name: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    ref = _random_hf_model(_hf_config(**HF_CONFIGS[name]))
    ref.save_pretrained(tmp_path)
    model = load_hf(tmp_path).eval()
    ids = _ids(256)
    diff = (_logits(model, ids) - _logits(ref, ids)).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff:.3g}"
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if name == "yarn_rope_parameters":
        assert model.config.rope_scaling["factor"] == 4.0


def test_fused_names_mtp_layers_and_rotary_buffers(tmp_path: Path) -> None:
    """transformers 5's in-memory names (gate_up_proj [E, 2F, D]) load; MTP layers and inv_freq are ignored."""
    pytest.importorskip("transformers")
    ref = _random_hf_model(_hf_config())
    ref.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    state["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)  # an MTP layer past num_hidden_layers
    state["model.layers.3.mlp.experts.0.gate_proj.weight"] = torch.zeros(32, 64)
    state["model.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load_hf(tmp_path).eval()
    ids = _ids(256)
    assert (_logits(model, ids) - _logits(ref, ids)).abs().max().item() <= 1e-4


# ------------------------------------------------------------------ layout, sharding, dtypes
def test_sharded_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model = _random_model()
    out = save_hf(model, tmp_path / "ckpt", max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert not any(k.endswith("experts.down_proj") or "gate_up" in k for k in index["weight_map"])
    total = 0
    for f in files:
        with safe_open(out / f, framework="pt") as h:
            total += sum(h.get_tensor(k).nbytes for k in h.keys())  # noqa: SIM118 (not a mapping)
    assert index["metadata"]["total_size"] == total
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["torch_dtype"] == "float32"

    loaded = load_hf(out)
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
    assert not any(b.is_meta for b in loaded.buffers())
    ids = _ids(model.config.vocab_size)
    assert torch.equal(_logits(loaded.eval(), ids), _logits(model, ids))


def test_bf16_save_round_trip(tmp_path: Path) -> None:
    model = _random_model()
    save_hf(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(tmp_path / "model-00001-of-00001.safetensors", framework="pt") as h:
        assert h.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert h.get_tensor("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch.bfloat16
    loaded = load_hf(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        want = v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)
        assert torch.equal(loaded.state_dict()[k], want), k
    # Re-saving the bf16 model is lossless, and dtype=fp32 on load upcasts exactly.
    save_hf(loaded, tmp_path / "again")
    assert torch.equal(load_hf(tmp_path / "again").lm_head.weight, loaded.lm_head.weight)
    up = load_hf(tmp_path, dtype=torch.float32)
    assert up.lm_head.weight.dtype == torch.float32
    assert torch.equal(up.lm_head.weight, loaded.lm_head.weight.float())


def test_tied_embeddings_write_no_lm_head(tmp_path: Path) -> None:
    model = _random_model(tie_word_embeddings=True)
    save_hf(model, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    loaded = load_hf(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_resave_replaces_checkpoint_and_keeps_other_files(tmp_path: Path) -> None:
    first, second = _random_model(seed=0), _random_model(seed=5)
    save_hf(first, tmp_path, max_shard_bytes=32 * 1024)
    (tmp_path / "tokenizer.json").write_text("{}")
    save_hf(second, tmp_path)  # one shard now: the stale ones must go
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json", "tokenizer.json",
    ]
    assert torch.equal(load_hf(tmp_path).lm_head.weight, second.lm_head.weight)


def test_interrupted_save_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _random_model(seed=0)
    save_hf(first, tmp_path / "ckpt", max_shard_bytes=64 * 1024)
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    calls = []

    def crash_on_second_shard(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_module, "save_file", crash_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        save_hf(_random_model(seed=5), tmp_path / "ckpt", max_shard_bytes=64 * 1024)
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        save_hf(_random_model(seed=5), tmp_path / "fresh", max_shard_bytes=64 * 1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dir, no half-written "fresh"
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    assert torch.equal(load_hf(tmp_path / "ckpt").lm_head.weight, first.lm_head.weight)


# ------------------------------------------------------------------ errors
@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    save_hf(_random_model(), tmp_path, max_shard_bytes=64 * 1024)
    return tmp_path


def _shard_of(directory: Path, tensor: str) -> Path:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return directory / index["weight_map"][tensor]


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_shard_file_names_file_and_tensor(sharded: Path) -> None:
    shard = _shard_of(sharded, "model.norm.weight")
    in_shard = load_file(shard).keys()
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard file {shard.name} is missing") as e:
        load_hf(sharded)
    msg = str(e.value)
    assert str(sharded / "model.safetensors.index.json") in msg
    assert any(repr(name) in msg for name in in_shard)


def test_shape_mismatch_names_file_tensor_and_shapes(sharded: Path) -> None:
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    shard = _shard_of(sharded, name)
    _rewrite(shard, lambda t: t.update({name: t[name][:-1].clone()}))
    with pytest.raises(CheckpointError) as e:
        load_hf(sharded)
    msg = str(e.value)
    assert str(shard) in msg and name in msg and "[127, 16]" in msg and "expected [128, 16]" in msg


def test_per_expert_shape_mismatch(sharded: Path) -> None:
    name = "model.layers.2.mlp.experts.3.down_proj.weight"
    shard = _shard_of(sharded, name)
    _rewrite(shard, lambda t: t.update({name: t[name].t().contiguous()}))
    with pytest.raises(CheckpointError, match=r"experts\.3\.down_proj\.weight.*shape \[32, 64\], expected \[64, 32\]"):
        load_hf(sharded)


UNEXPECTED = [
    "model.layers.0.self_attn.q_proj.weight",  # q_proj in a q-LoRA model
    "model.layers.1.mlp.experts.8.up_proj.weight",  # expert index past n_routed_experts
    "model.layers.0.mlp.experts.0.up_proj.weight",  # experts in a dense layer
    "lm_head.bias",
]


@pytest.mark.parametrize("name", UNEXPECTED)
def test_unexpected_tensor_names_file_and_tensor(sharded: Path, name: str) -> None:
    shard = _shard_of(sharded, "model.norm.weight")
    _rewrite(shard, lambda t: t.update({name: torch.zeros(4)}))
    with pytest.raises(CheckpointError, match="unexpected tensor") as e:
        load_hf(sharded)
    assert str(shard) in str(e.value) and repr(name) in str(e.value)


def test_missing_tensors_are_named(sharded: Path) -> None:
    name, expert = "model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.experts.5.gate_proj.weight"
    for n in (name, expert):
        _rewrite(_shard_of(sharded, n), lambda t, n=n: t.pop(n))
    with pytest.raises(CheckpointError, match="missing tensor") as e:
        load_hf(sharded)
    msg = str(e.value)
    assert name in msg and expert in msg and _shard_of(sharded, name).name in msg


def test_unsupported_architecture_is_a_config_error(sharded: Path) -> None:
    path = sharded / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="unsupported architecture") as e:
        load_hf(sharded)
    assert str(path) in str(e.value)


def test_missing_config_and_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(get_preset("tiny").to_hf_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        load_hf(tmp_path)


def test_fp8_checkpoint_is_rejected(tmp_path: Path) -> None:
    save_hf(_random_model(), tmp_path)
    shard = tmp_path / "model-00001-of-00001.safetensors"
    name = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(shard, lambda t: t.update({name: t[name].to(torch.float8_e4m3fn)}))
    with pytest.raises(CheckpointError, match="FP8 checkpoints are not supported"):
        load_hf(tmp_path)


# ------------------------------------------------------------------ CLI
def _out(result) -> str:
    return " ".join(result.output.split())  # rich wraps lines at the terminal width


def test_cli_export_and_import(tmp_path: Path) -> None:
    model = _random_model()
    save_hf(model, tmp_path / "src")
    runner = CliRunner()
    result = runner.invoke(app, ["export-hf", str(tmp_path / "src"), str(tmp_path / "bf16"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert "exported" in _out(result)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    exported = load_hf(tmp_path / "bf16")
    assert torch.equal(exported.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))

    result = runner.invoke(app, ["import-hf", str(tmp_path / "bf16"), str(tmp_path / "imported")])
    assert result.exit_code == 0, result.output
    n_params = sum(p.numel() for p in model.parameters())
    assert f"{n_params:,} parameters, bfloat16, 3 layers (1 dense, 2 MoE" in _out(result)
    assert torch.equal(load_hf(tmp_path / "imported").lm_head.weight, exported.lm_head.weight)

    result = runner.invoke(app, ["export-hf", str(tmp_path / "nowhere"), str(tmp_path / "x")])
    assert result.exit_code == 2 and "not a directory" in _out(result)
    result = runner.invoke(app, ["export-hf", str(tmp_path / "src"), str(tmp_path / "x"), "--dtype", "fp8"])
    assert result.exit_code == 2 and "--dtype must be one of" in _out(result)
    (tmp_path / "src" / "model-00001-of-00001.safetensors").unlink()
    result = runner.invoke(app, ["import-hf", str(tmp_path / "src"), str(tmp_path / "y")])
    assert result.exit_code == 2 and "is missing" in _out(result)
    assert not (tmp_path / "y").exists()
