import math

import pytest
import torch
import torch.nn.functional as F

from openk2.model import K2Model, build_model, get_preset
from openk2.model.moe import grouped_matmul


def tiny(**kw):
    return build_model(get_preset("tiny", **kw), seed=0)


def test_meta_construction_then_init_is_deterministic():
    a, b = tiny(), tiny()
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na
    assert not any(p.is_meta for p in a.parameters())


def test_param_groups_cover_every_parameter_once():
    model = tiny(attention_bias=True)
    groups = model.param_groups()
    names = [n for g in groups.values() for n, _ in g]
    assert len(names) == len(set(names)) == len(list(model.parameters()))
    muon, adamw = dict(groups["muon"]), dict(groups["adamw"])
    assert "model.layers.1.mlp.experts.gate_proj" in muon and muon["model.layers.1.mlp.experts.gate_proj"].ndim == 3
    assert "model.layers.1.mlp.gate.weight" in muon  # the router is a matrix: Muon (torchtitan's Kimi recipe)
    assert "model.layers.0.self_attn.q_b_proj.weight" in muon
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_a_layernorm.weight", "model.layers.0.self_attn.q_a_proj.bias"):
        assert name in adamw


def test_loss_is_mean_over_non_ignored_tokens():
    model = tiny()
    ids = torch.randint(0, 256, (2, 12))
    labels = torch.randint(0, 256, (2, 12))
    labels[0, :5] = -100
    out = model(ids, labels=labels, return_logits=True)
    keep = labels != -100
    expected = F.cross_entropy(out.logits[keep], labels[keep])
    assert torch.allclose(out.loss, expected, atol=1e-6)
    total = model(ids, labels=labels, reduction="sum").loss
    assert torch.allclose(total, expected * keep.sum(), rtol=1e-5)


def test_router_bias_selects_but_does_not_weight():
    model = tiny()
    moe = model.moe_layers()[0]
    x = torch.randn(10, 64)
    ids0, w0, scores = moe.gate(x)
    moe.gate.e_score_correction_bias[3] = 10.0  # force expert 3 into every top-k
    ids1, w1, _ = moe.gate(x)
    assert (ids1 == 3).any(dim=1).all()
    pos = (ids1 == 3).nonzero()
    raw = scores[pos[:, 0], 3]
    # weights come from unbiased scores: renormalized over the chosen experts, times the scaling factor
    chosen = scores.gather(1, ids1)
    expected = raw / chosen[pos[:, 0]].sum(-1) * model.config.routed_scaling_factor
    assert torch.allclose(w1[pos[:, 0], pos[:, 1]], expected, atol=1e-6)


def test_group_limited_routing_stays_in_top_groups():
    model = tiny(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    ids, _, _ = model.moe_layers()[0].gate(torch.randn(64, 64))
    groups = ids // 2
    assert all(len(set(row.tolist())) <= 2 for row in groups)


@pytest.mark.parametrize("impl", ["grouped_mm", "padded_bmm"])
def test_grouped_matmul_matches_per_expert_loop(impl):
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    w = torch.randn(6, 16, 12, requires_grad=True)
    y = grouped_matmul(x, w, counts, impl)
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.cat([x2[s:s + c] @ w2[e] for e, (s, c) in enumerate(zip((counts.cumsum(0) - counts).tolist(),
                                                                          counts.tolist(), strict=True))])
    (ref * torch.arange(ref.numel()).view_as(ref)).sum().backward()
    assert torch.allclose(y, ref, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-4) and torch.allclose(w.grad, w2.grad, atol=1e-4)


def test_moe_impls_agree_end_to_end():
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 16))
    a, b = tiny(moe_impl="grouped_mm"), tiny(moe_impl="padded_bmm")
    la, lb = a(ids, labels=ids).loss, b(ids, labels=ids).loss
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, atol=1e-6)
    ga = a.model.layers[1].mlp.experts.down_proj.grad
    assert torch.allclose(ga, b.model.layers[1].mlp.experts.down_proj.grad, atol=1e-6)


def test_load_counts_and_bias_update():
    model = tiny()
    model.train()
    model(torch.randint(0, 256, (4, 32)))
    moe = model.moe_layers()[0]
    counts = moe.tokens_per_expert.clone()
    assert counts.sum() == 4 * 32 * model.config.num_experts_per_tok
    model.update_expert_biases(rate=0.01)
    bias = moe.gate.e_score_correction_bias
    over, under = counts > counts.mean(), counts < counts.mean()
    assert (bias[over] < bias[under].min()).all()
    assert abs(float(bias.mean())) < 1e-6  # mean-centred
    assert moe.tokens_per_expert.sum() == 0


def test_seq_aux_loss_adds_to_loss_and_has_gradient():
    model = tiny(seq_aux_loss_coef=0.1)
    model.train()
    ids = torch.randint(0, 256, (2, 16))
    with_aux = model(ids, labels=ids).loss
    model.eval()
    without = model(ids, labels=ids).loss
    assert with_aux > without
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.moe_layers()[0].gate.weight.grad.abs().sum() > 0


def _reference_max_logits(attn, x):
    """Explicit eager computation of scale * q.k per head (causal), from the layer's own weights."""
    B, T, _ = x.shape
    H = attn.n_heads
    q = attn._queries(x).view(B, T, H, attn.qk_dim)
    ckv, k_pe = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(ckv)).view(B, T, H, -1)
    from openk2.model.rope import apply_rope, rope_cos_sin, rope_inv_freq

    inv, fac = rope_inv_freq(attn_cfg)
    cos, sin = rope_cos_sin(inv, torch.arange(T)[None], fac, x.dtype)
    q_pe = apply_rope(q[..., attn.nope_dim:], cos[:, :, None], sin[:, :, None])
    k_pe = apply_rope(k_pe[:, :, None], cos[:, :, None], sin[:, :, None])
    qf = torch.cat([q[..., :attn.nope_dim], q_pe], -1)
    kf = torch.cat([kv[..., :attn.nope_dim], k_pe.expand(B, T, H, -1)], -1)
    s = torch.einsum("bthd,bshd->bhts", qf, kf) * attn.scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.amax(dim=(0, 2, 3))


attn_cfg = get_preset("tiny")


def test_max_logit_recording_matches_explicit_computation():
    model = tiny()
    x = torch.randn(2, 20, 64)
    attn = model.attention_layers()[0]
    attn.record_max_logits = True
    cos, sin = model._cos_sin(torch.arange(20)[None], x.dtype)
    attn(x, cos, sin)
    first = attn.max_logit_H.clone()
    assert torch.allclose(first, _reference_max_logits(attn, x), atol=1e-5)
    attn(x * 0.01, cos, sin)  # a smaller second micro-batch keeps the running max
    assert torch.equal(attn.max_logit_H, first)


def test_recording_context_manager_restores_flag():
    model = tiny()
    with model.recording_max_logits():
        model(torch.randint(0, 256, (1, 8)))
    assert all(a.max_logit_H is not None and not a.record_max_logits for a in model.attention_layers())


def _greedy_uncached(model, ids, n):
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None},
                                       {"rope_scaling": {"type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 16,
                                                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                                         "mscale_all_dim": 1.0}}])
def test_greedy_cached_equals_uncached(overrides):
    model = tiny(**overrides).eval()
    ids = torch.randint(0, 256, (3, 9))
    assert torch.equal(model.generate(ids, 24), _greedy_uncached(model, ids, 24))


def test_batched_prompts_of_different_lengths_match_single_prompts():
    model = tiny().eval()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    batched = model.generate(prompts, 10)
    for row, p in zip(batched, prompts, strict=True):
        single = model.generate([p], 10)[0]
        assert row[-(len(p) + 10):].tolist() == single.tolist()


def test_eos_stops_and_pads():
    model = tiny().eval()
    ids = torch.randint(0, 256, (2, 5))
    free = model.generate(ids, 8)
    eos = int(free[0, 7])  # the third generated token of row 0
    out = model.generate(ids, 8, eos_token_id=eos, pad_token_id=0)
    row = out[0, 5:].tolist()
    cut = row.index(eos)
    assert all(t == 0 for t in row[cut + 1:])


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny().eval()
    ids = torch.randint(0, 256, (2, 4))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = model.generate(ids, 6, temperature=1.0, top_k=5, generator=g1)
    b = model.generate(ids, 6, temperature=1.0, top_k=5, generator=g2)
    assert torch.equal(a, b)
    from openk2.model.generate import sample_next
    logits = torch.randn(4, 50)
    for _ in range(20):
        tok = sample_next(logits, temperature=1.0, top_k=3)
        assert all(t in logits[i].topk(3).indices for i, t in enumerate(tok))
        tok = sample_next(logits, temperature=1.0, top_p=1e-6)
        assert torch.equal(tok, logits.argmax(-1))


def test_kv_cache_is_latent_only():
    model = tiny()
    cache = model.new_cache(1, 10)
    cfg = model.config
    assert cache.bytes_per_token == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_training_step_lowers_loss():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(10):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5 and math.isfinite(losses[-1])


def test_k2model_exposes_hf_names():
    keys = K2Model(get_preset("tiny", first_k_dense_replace=1)).state_dict().keys()
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in keys
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in keys
