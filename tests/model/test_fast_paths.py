"""The performance paths equal the plain ones: chunked linear cross-entropy, gathered MoE for few tokens,
the absorbed cached attention, the gate/up-fused grouped matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import openk2.model.moe as moe_module
from openk2.model import K2Model, build_model, get_preset, transformer
from openk2.model.transformer import linear_cross_entropy, loss_chunk_rows


def _random_model(**overrides) -> K2Model:
    """Tiny model with non-trivial norms and router biases (the init leaves them 1 and 0)."""
    model = build_model(get_preset("tiny", initializer_range=0.1, **overrides), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.copy_(0.1 * torch.randn(m.gate.e_score_correction_bias.shape, generator=gen))
    return model


@pytest.mark.parametrize(("chunk_rows", "rows", "vocab"), [(None, 50, 30), (1, 50, 30), (7, 50, 30), (64, 50, 30),
                                                          (256, 1000, 1024)])  # the last: oneDNN's products
def test_linear_cross_entropy_matches_plain(chunk_rows, rows, vocab):
    torch.manual_seed(0)
    x = torch.randn(rows, 16, requires_grad=True)
    w = torch.randn(vocab, 16, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    labels[[0, 3, 4, rows - 1]] = -100
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = linear_cross_entropy(x, w, labels, chunk_rows)
    ref = F.cross_entropy(x2 @ w2.t(), labels, ignore_index=-100, reduction="sum")
    (loss * 0.3).backward()  # a non-unit upstream gradient
    (ref * 0.3).backward()
    assert torch.allclose(loss, ref, atol=1e-5, rtol=1e-6)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5) and torch.allclose(w.grad, w2.grad, atol=1e-5)
    assert x.grad[0].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize(("l3", "rows"), [(8 << 20, 256), (32 << 20, 512), (256 << 20, 512), (0, 64)])
def test_loss_chunks_fill_the_last_level_cache_up_to_16_mib(monkeypatch, l3, rows):
    """CPU chunks hold min(L3, 16 MiB) of fp32 logits (larger ones page-fault on every step), at least 64 rows; other
    devices 8 MiB."""
    monkeypatch.setattr(transformer, "_last_level_cache_bytes", lambda: l3)
    assert loss_chunk_rows(8192, torch.device("cpu")) == rows
    assert loss_chunk_rows(8192, torch.device("meta")) == 256


def test_last_level_cache_size_is_read_or_defaults(monkeypatch, tmp_path):
    transformer._last_level_cache_bytes.cache_clear()
    assert transformer._last_level_cache_bytes() >= 1 << 20
    reads = {"32768K": 32 << 20, "8M": 8 << 20, "0K": 8 << 20, "garbage": 8 << 20}
    for text, expected in reads.items():
        (tmp_path / "size").write_text(text + "\n")
        monkeypatch.setattr(transformer, "Path", lambda _: tmp_path / "size")
        transformer._last_level_cache_bytes.cache_clear()
        assert transformer._last_level_cache_bytes() == expected, text
    transformer._last_level_cache_bytes.cache_clear()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_model_loss_without_logits_matches_plain_path(reduction):
    model = _random_model(seq_aux_loss_coef=0.01).train()
    ids = torch.randint(0, 256, (3, 20))
    labels = torch.randint(0, 256, (3, 20))
    labels[0, :6] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels, reduction=reduction, return_logits=return_logits)
        out.loss.backward()
        assert (out.logits is None) == (not return_logits)
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5, rtol=1e-6)
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], atol=1e-5), name


def test_loss_without_logits_under_no_grad():
    model = _random_model().eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        plain = model(ids, labels=ids, return_logits=True)
        fused = model(ids, labels=ids)  # the default: the fast loss path, no logits
    assert plain.logits is not None and fused.logits is None
    assert torch.allclose(plain.loss, fused.loss, atol=1e-5)


@pytest.mark.parametrize("few_rows_kernel", [True, False])  # the kernel's experts op, or the gathered products
@pytest.mark.parametrize("n_tokens", [1, 3, 12])  # 12 x top-3 slots over 16 experts: tokens share experts
def test_gathered_moe_equals_dispatched(n_tokens, few_rows_kernel, monkeypatch):
    monkeypatch.setattr(moe_module, "_FEW_ROWS_EXPERTS", few_rows_kernel)
    model = _random_model(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    moe = model.moe_layers()[0]
    x = torch.randn(n_tokens, 64)
    with torch.no_grad():
        ids, weights, _ = moe.gate(x)
        gathered = moe.experts.forward_gathered(x, ids, weights)
        dispatched = moe._dispatched(x, ids, weights)
        assert torch.allclose(gathered, dispatched, atol=1e-6)
        # MoE.forward (gathered for 1 token: 2 * slots < experts; dispatched for 3) agrees too.
        full = moe(x[None])[0]
        assert torch.allclose(full, gathered + moe.shared_experts(x), atol=1e-6)


@pytest.mark.parametrize("n_tokens", [40, 160])  # 160 tokens x top-2 >= 32 rows per expert: gate/up fused
def test_dispatched_moe_matches_per_expert_reference(n_tokens):
    """The dispatched experts (gate weights applied before down_proj) equal the textbook MoE."""
    model = _random_model()
    moe = model.moe_layers()[0]
    x = torch.randn(n_tokens, 64)
    with torch.no_grad():
        ids, weights, _ = moe.gate(x)
        ex = moe.experts
        ref = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(ids.shape[1]):
                e = int(ids[t, k])
                h = F.silu(ex.gate_proj[e] @ x[t]) * (ex.up_proj[e] @ x[t])
                ref[t] += weights[t, k] * (ex.down_proj[e] @ h)
        assert torch.allclose(moe._dispatched(x, ids, weights), ref, atol=1e-5)


def test_fused_gate_up_has_the_same_gradients(monkeypatch):
    model = _random_model().train()
    ids = torch.randint(0, 256, (4, 40))
    grads = []
    for min_rows in (1, 10**9):  # always fused, never fused
        monkeypatch.setattr(moe_module, "_FUSED_GATE_UP_MIN_ROWS_PER_EXPERT", min_rows)
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


@pytest.mark.parametrize("shape", [(300, 256), (3, 5, 64)])
def test_swiglu_halves_is_bitwise_autograds_chunk_silu_mul(shape, monkeypatch):
    """The fused gate-up path's SwiGLU (one [S, 2F] gradient buffer) through aten's ops gives autograd's exact values
    and gradients, so switching to it left the pretraining losses bit-identical (the kernel library's path is
    checked against float64 in tests/model/test_few_rows.py)."""
    monkeypatch.setattr(moe_module, "_SWIGLU_KERNEL", False)
    a = torch.randn(*shape, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    grad = torch.randn(*shape[:-1], shape[-1] // 2)
    gate, up = a.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    out = moe_module._SwiGLUHalves.apply(b)
    ref.backward(grad)
    out.backward(grad)
    assert torch.equal(ref, out) and torch.equal(a.grad, b.grad)
    monkeypatch.setattr(moe_module, "_SWIGLU_KERNEL", True)  # the kernel library's path, where it builds
    c = a.detach().clone().requires_grad_(True)
    kernel_out = moe_module._SwiGLUHalves.apply(c)
    kernel_out.backward(grad)
    assert kernel_out.shape == ref.shape
    assert torch.allclose(kernel_out, ref, rtol=1e-5, atol=1e-6) and torch.allclose(c.grad, a.grad, rtol=1e-5,
                                                                                     atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}])
def test_cached_logits_match_uncached(overrides):
    """Prefill + decode through the absorbed cached path gives the uncached logits, with left-padded rows."""
    model = _random_model(**overrides).eval()
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    steps = [[11, 12], [13, 14], [15, 16]]
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts])
    cache = model.new_cache(2, T + len(steps))
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cached = [model(ids, position_ids_BT=positions, cache=cache, valid_BT=valid).logits]
        for i, step in enumerate(steps):
            pos = positions[:, -1:] + 1 + i
            cached.append(model(torch.tensor(step)[:, None], position_ids_BT=pos, cache=cache,
                                valid_BT=torch.ones(2, 1, dtype=torch.bool)).logits)
        cached_BTV = torch.cat(cached, dim=1)
        for b, p in enumerate(prompts):
            row = torch.tensor([p + [s[b] for s in steps]])
            ref = model(row).logits[0]
            assert torch.allclose(cached_BTV[b, T - len(p):], ref, atol=1e-4), b


def test_linear_cross_entropy_rejects_a_second_backward():
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy(x, w, torch.randint(0, 10, (6,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_cpu_training_attention_matches_sdpa(monkeypatch):
    """Training attention: the kernel library's causal attention (where it builds) and the blocked path equal SDPA
    (V padded for the flash kernel), with gradients and QK-Clip's recorded max logits, at a length that leaves a
    partial last block."""
    import openk2.model.attention as attention_module

    model = _random_model()
    attn = model.attention_layers()[0]
    x = torch.randn(2, 300, 64)
    cos, sin = model._cos_sin(torch.arange(300)[None], x.dtype)
    outs = []
    for kernel, max_len in ((True, 10**6), (False, 10**6), (False, 0)):  # kernel, blocked, then SDPA
        monkeypatch.setattr(attention_module, "_CAUSAL_ATTENTION_KERNEL", kernel)
        monkeypatch.setattr(attention_module, "_BLOCKED_ATTENTION_MAX_LEN", max_len)
        x_ = x.clone().requires_grad_()
        attn.record_max_logits, attn.max_logit_H = True, None
        y = attn(x_, cos, sin)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), x_.grad, {n: p.grad for n, p in attn.named_parameters()}, attn.max_logit_H))
        attn.zero_grad(set_to_none=True)
    for y, x_grad, grads, max_logit_H in outs[:2]:
        assert torch.allclose(y, outs[2][0], atol=1e-5)
        assert torch.allclose(max_logit_H, outs[2][3], atol=1e-5)
        assert torch.allclose(x_grad, outs[2][1], atol=1e-5)
        for name, grad in grads.items():
            assert torch.allclose(grad, outs[2][2][name], atol=1e-4), name


@pytest.mark.parametrize("B, T, S", [(1, 300, 300), (2, 130, 200), (3, 5, 9)])
@pytest.mark.parametrize("padding_sees_all", [False, True])
def test_blocked_masked_attention_matches_sdpa(B, T, S, padding_sees_all):
    """Cached prefill attention on CPU: equal to SDPA under the caches' masks (a cached prefix of S - T keys, left
    padding that attends to itself as `KVCache` has it, or padding queries that see every key as `SlotKVCache`)."""
    from openk2.model.attention import blocked_masked_attention

    gen = torch.Generator().manual_seed(B * T)
    q, k = torch.randn(B, 4, T, 24, generator=gen), torch.randn(B, 4, S, 24, generator=gen)
    v = torch.randn(B, 4, S, 16, generator=gen)
    q_pos_T, k_pos_S = torch.arange(S - T, S), torch.arange(S)
    valid_BS = torch.ones(B, S, dtype=torch.bool)
    valid_BS[0, : S // 3] = False  # row 0 left-padded
    mask_BTS = valid_BS[:, None, :] & (k_pos_S[None, :] <= q_pos_T[:, None])
    pad_BT = ~valid_BS[:, S - T:]
    mask_BTS |= pad_BT[:, :, None] if padding_sees_all else (k_pos_S[None, :] == q_pos_T[:, None])
    ref = F.scaled_dot_product_attention(q, k, F.pad(v, (0, 8)), attn_mask=mask_BTS[:, None], scale=0.3)[..., :16]
    assert torch.allclose(blocked_masked_attention(q, k, v, mask_BTS, 0.3), ref, atol=1e-5)


def test_sum_over_slots_equals_index_copy_and_sum_bit_for_bit():
    """The experts' combine (`moe.sum_over_slots`) against the plain autograd formula it replaced: same values and same
    gradient, exactly (the same sums in the same order)."""
    g = torch.Generator().manual_seed(3)
    N, K, D = 37, 3, 8
    order_S = torch.randint(0, 5, (N * K,), generator=g).argsort(stable=True)  # slots sorted by a random expert id
    y = torch.randn(N * K, D, generator=g)
    grad = torch.randn(N, D, generator=g)
    y_ours, y_ref = y.clone().requires_grad_(), y.clone().requires_grad_()
    ours = moe_module.sum_over_slots(y_ours, order_S, K)
    ref = y_ref.new_empty(y_ref.shape).index_copy(0, order_S, y_ref).view(N, K, D).sum(dim=1)
    ours.backward(grad)
    ref.backward(grad)
    assert torch.equal(ours, ref) and torch.equal(y_ours.grad, y_ref.grad)
