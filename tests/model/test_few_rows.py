"""The few-row product kernel (`openk2.model.few_rows`): its products, routed experts, decode, prefill and training
attention (with its backward) equal float64 references at every row count, tail and stride they meet, independent
of the thread count; compiled code calls it without a graph break; and a machine where it cannot build falls back
with one warning."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from openk2.model import build_model, few_rows, get_preset

needs_kernel = pytest.mark.skipif(not few_rows.cpu_supports(), reason="the kernel needs x86-64 with AVX2 and FMA")


def _threads(n: int):
    class _Threads:
        def __enter__(self):
            self.before = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.before)

    return _Threads()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13, 32])
# At one row, k_in <= 256 streams the rows one after another, (300, 1001) 8 rows at a time.
@pytest.mark.parametrize("n_out, k_in", [(1, 1), (7, 9), (25, 64), (300, 1001), (1000, 256), (1100, 256)])
def test_product_equals_float64_reference(rows, n_out, k_in):
    assert few_rows.available(), few_rows._state.get("error")
    gen = torch.Generator().manual_seed(rows * 1000 + n_out)
    x = torch.randn(rows, k_in, generator=gen)
    w = torch.randn(n_out, k_in, generator=gen)
    ref = x.double() @ w.double().t()
    outs = []
    for threads in (1, 2):
        with _threads(threads):
            outs.append(few_rows.mm(x, w))
    assert outs[0].shape == (rows, n_out) and outs[0].dtype == torch.float32
    assert torch.allclose(outs[0].double(), ref, atol=1e-4 * k_in**0.5, rtol=1e-5)
    assert torch.equal(outs[0], outs[1])  # each output is one thread's dot product: no thread-count dependence


@needs_kernel
@pytest.mark.parametrize("k_in", [256, 1001])
def test_product_rows_do_not_depend_on_the_tile(k_in):
    """Every tile (one row: short rows one by one or 8 at a time; several rows: 4 x 3) sums each output the same
    way, so a row's result does not depend on how many rows came with it (decode batches give the same tokens)."""
    gen = torch.Generator().manual_seed(k_in)
    x = torch.randn(8, k_in, generator=gen)
    w = torch.randn(100, k_in, generator=gen)
    assert torch.equal(few_rows.mm(x[:1], w), few_rows.mm(x, w)[:1])
    assert torch.equal(few_rows.mm(x[5:6], w), few_rows.mm(x[4:7], w)[1:2])


@needs_kernel
def test_product_strided_operands():
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(96, 200, generator=gen)
    w = wide[:, 10:138]  # rows 200 apart, unit stride along K
    x = torch.randn(128, 6, generator=gen).t()  # stride (1, 6): copied to rows first
    assert not x.is_contiguous() and w.stride() == (200, 1)
    assert torch.allclose(few_rows.mm(x, w), x @ w.t(), atol=1e-4)
    assert torch.allclose(few_rows.mm(x, w.t().contiguous().t()), x @ w.t(), atol=1e-4)  # K-strided weight
    assert few_rows.mm(torch.randn(0, 128), w).shape == (0, 96)


@needs_kernel
def test_product_rejects_bad_input():
    with pytest.raises(RuntimeError, match=r"expected x \[M, K\] and w \[N, K\]"):
        few_rows.mm(torch.randn(2, 5), torch.randn(3, 6))
    with pytest.raises(RuntimeError, match="fp32 CPU tensors only"):
        few_rows.mm(torch.randn(2, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64))


def _experts_reference(x, ids, gates, gate_w, up_w, down_w):
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e, x_d = ids[t, k], x[t].double()
            h = F.silu(gate_w[e].double() @ x_d) * (up_w[e].double() @ x_d)
            y[t] += gates[t, k].double() * (down_w[e].double() @ h)
    return y


@needs_kernel
@pytest.mark.parametrize("tokens, top_k, experts, ffn, hidden", [(1, 2, 16, 128, 256), (8, 2, 4, 96, 64),
                                                                 (5, 3, 8, 50, 77), (32, 6, 64, 16, 40),
                                                                 (24, 2, 16, 128, 256)])  # 2 MiB: prefetching
def test_experts_equal_float64_reference(tokens, top_k, experts, ffn, hidden):
    assert few_rows.available(), few_rows._state.get("error")
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen)
    gate_w, up_w = (torch.randn(experts, ffn, hidden, generator=gen) / hidden**0.5 for _ in range(2))
    down_w = torch.randn(experts, hidden, ffn, generator=gen) / ffn**0.5
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    gates = torch.rand(tokens, top_k, generator=gen)
    outs = []
    for threads in (1, 2):
        with _threads(threads):
            outs.append(few_rows.experts(x, ids, gates, gate_w, up_w, down_w))
    assert torch.allclose(outs[0].double(), _experts_reference(x, ids, gates, gate_w, up_w, down_w), atol=1e-5)
    assert torch.equal(outs[0], outs[1])  # a token's experts are summed in expert order on one thread
    with pytest.raises(RuntimeError, match="out of range"):
        few_rows.experts(x, ids + experts, gates, gate_w, up_w, down_w)


def _latent_attention_reference(q_BHL, latent_BSL, key_valid_BS, new_BL, scale, c):
    q, lat, new = q_BHL.double(), latent_BSL.double(), new_BL.double()
    scores_BHS = (q @ lat.transpose(1, 2) * scale).masked_fill(~key_valid_BS[:, None, :], float("-inf"))
    own_BH1 = (q * new[:, None, :]).sum(-1, keepdim=True) * scale
    probs_BHX = torch.cat((scores_BHS, own_BH1), dim=-1).softmax(dim=-1)
    S = lat.shape[1]
    return probs_BHX[..., :S] @ lat[..., :c] + probs_BHX[..., S:] * new[:, None, :c]


@needs_kernel
@pytest.mark.parametrize("batch, heads, keys, latent, c", [(8, 4, 128, 80, 64), (1, 8, 256, 288, 256),
                                                            (3, 2, 13, 21, 5), (2, 3, 70, 80, 64)])
def test_latent_attention_equals_float64_reference(batch, heads, keys, latent, c):
    """Latents strided along rows and keys (a slot cache's live rows), masked keys, a row whose cached keys are all
    masked (only its own new key counts), tails of every loop; the same numbers on 1 and 2 threads."""
    assert few_rows.available(), few_rows._state.get("error")  # loads the library (run alone, nothing else has)
    gen = torch.Generator().manual_seed(batch * 100 + keys)
    cache_BSL = torch.randn(batch + 1, keys + 3, latent, generator=gen)
    latent_BSL = cache_BSL[1:, 2:keys + 2]
    q_BHL = torch.randn(batch, heads, latent, generator=gen)
    new_BL = torch.randn(batch, latent, generator=gen)
    key_valid_BS = torch.rand(batch, keys, generator=gen) < 0.8
    key_valid_BS[-1, :] = batch == 1  # the last row: nothing cached to see (but a single row sees everything)
    scale = latent**-0.5
    outs = []
    for threads in (1, 2):
        with _threads(threads):
            outs.append(few_rows.latent_attention(q_BHL, latent_BSL, key_valid_BS, new_BL, scale, c))
    assert outs[0].shape == (batch, heads, c)
    ref = _latent_attention_reference(q_BHL, latent_BSL, key_valid_BS, new_BL, scale, c)
    assert torch.allclose(outs[0].double(), ref, atol=1e-5)
    assert torch.equal(outs[0], outs[1])  # each (row, head) pair on one thread
    with pytest.raises(RuntimeError, match="shapes do not match"):
        few_rows.latent_attention(q_BHL, latent_BSL[:, :-1], key_valid_BS, new_BL, scale, c)


@needs_kernel
@pytest.mark.parametrize("batch, heads, queries, keys, qk, v", [(1, 4, 512, 512, 48, 32), (2, 3, 37, 50, 20, 13),
                                                                (3, 2, 5, 70, 96, 64), (1, 1, 1, 1, 8, 8)])
def test_masked_attention_equals_float64_reference(batch, heads, queries, keys, qk, v):
    """A cached prefill's masks (causal after a cached past, left padding, a row that sees no key), q and v strided
    as `MLA._expanded_cached` passes them, tails of every tile; the same numbers on 1 and 2 threads."""
    assert few_rows.available(), few_rows._state.get("error")
    gen = torch.Generator().manual_seed(batch * 1000 + keys)
    q_BHTQ = torch.randn(batch, queries, heads, qk, generator=gen).transpose(1, 2)
    k_BHSQ = torch.randn(batch, heads, keys, qk, generator=gen)
    v_BHSV = torch.randn(batch, keys, heads, v + 3, generator=gen).transpose(1, 2)[..., 3:]
    mask_BTS = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries).expand(batch, -1, -1).clone()
    mask_BTS[-1, :, : keys // 3] = False  # the last row is left-padded: its first queries see nothing
    scale = qk**-0.5
    outs = []
    for threads in (1, 2):
        with _threads(threads):
            outs.append(few_rows.masked_attention(q_BHTQ, k_BHSQ, v_BHSV, mask_BTS, scale))
    assert outs[0].shape == (batch, heads, queries, v)
    scores = (q_BHTQ.double() @ k_BHSQ.double().transpose(-1, -2) * scale).masked_fill(~mask_BTS[:, None],
                                                                                        float("-inf"))
    ref = torch.nan_to_num(scores.softmax(dim=-1)) @ v_BHSV.double()  # a row that sees no key: zeros
    assert torch.allclose(outs[0].double(), ref, atol=1e-5)
    assert torch.equal(outs[0], outs[1])  # each block of query rows on one thread
    with pytest.raises(RuntimeError, match="shapes do not match"):
        few_rows.masked_attention(q_BHTQ, k_BHSQ[:, :, :-1], v_BHSV, mask_BTS, scale)


@needs_kernel
@pytest.mark.parametrize("batch, heads, T, qk, v", [(8, 4, 256, 48, 32), (2, 3, 37, 20, 13), (1, 2, 1, 8, 8),
                                                   (1, 1, 70, 96, 64)])
def test_causal_attention_and_its_backward_equal_float64_reference(batch, heads, T, qk, v):
    """Training attention (`causal_attention` and its backward) against float64 autograd: the output, each query's
    log-sum-exp, each head's max logit and the gradients of q, k and v, with q and v strided as `MLA.forward` passes
    them and tails of every tile; the same numbers on 1 and 2 threads; the outputs laid out [B, T, H, *]."""
    assert few_rows.available(), few_rows._state.get("error")
    gen = torch.Generator().manual_seed(batch * 1000 + T)
    q_BHTQ = torch.randn(batch, T, heads, qk, generator=gen).transpose(1, 2)
    k_BHTQ = torch.randn(batch, heads, T, qk, generator=gen)
    v_BHTV = torch.randn(batch, T, heads, v + 3, generator=gen).transpose(1, 2)[..., 3:]
    grad_BHTV = torch.randn(batch, T, heads, v, generator=gen).transpose(1, 2)
    scale = qk**-0.5
    runs = []
    for threads in (1, 2):
        with _threads(threads):
            out, lse, max_logit = few_rows.causal_attention(q_BHTQ, k_BHTQ, v_BHTV, scale)
            grads = few_rows.causal_attention_backward(grad_BHTV, q_BHTQ, k_BHTQ, v_BHTV, out, lse, scale)
            runs.append((out, lse, max_logit, *grads))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q_BHTQ, k_BHTQ, v_BHTV))
    scores = (q64 @ k64.transpose(-1, -2) * scale).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1),
                                                               float("-inf"))
    ref_out = scores.softmax(dim=-1) @ v64
    ref_out.backward(grad_BHTV.double())
    refs = (ref_out.detach(), scores.logsumexp(dim=-1).detach(), scores.detach().amax(dim=(2, 3)), q64.grad, k64.grad,
            v64.grad)
    for got, ref in zip(runs[0], refs, strict=True):
        assert got.shape == ref.shape
        assert torch.allclose(got.double(), ref, atol=2e-5), (got.double() - ref).abs().max()
    for one, two in zip(*runs, strict=True):
        assert torch.equal(one, two)  # each head on one thread
    for t in (runs[0][0], *runs[0][3:]):
        assert t.transpose(1, 2).is_contiguous()
    with pytest.raises(RuntimeError, match="shapes do not match"):
        few_rows.causal_attention(q_BHTQ, k_BHTQ[:, :, :-1], v_BHTV, scale)


@needs_kernel
@pytest.mark.parametrize("rows, cols", [(2048, 128), (128, 2048), (16, 8), (17, 9), (37, 29), (8, 3), (1, 5), (40, 1)])
def test_transpose_copy_equals_contiguous(rows, cols):
    """The transposing copy oneDNN's left operands take (`matmul._onednn`): equal to `contiguous()` for transposed
    views with padded rows, whole 16 x 8 blocks and every tail, on 1 and 2 threads; other layouts pass through."""
    assert few_rows.available(), few_rows._state.get("error")
    base_CR = torch.randn(cols, rows + 3, generator=torch.Generator().manual_seed(rows * cols))[:, :rows]
    for threads in (1, 2):
        with _threads(threads):
            got_RC = few_rows.transpose_copy(base_CR.t())
            assert got_RC.is_contiguous() and torch.equal(got_RC, base_CR.t().contiguous())
    plain_RC = torch.randn(rows, cols)
    assert torch.equal(few_rows.transpose_copy(plain_RC), plain_RC)
    with pytest.raises(RuntimeError, match="2-D fp32 CPU tensor"):
        few_rows.transpose_copy(plain_RC.double())


@needs_kernel
def test_weight_gradients_through_the_transposing_copy_equal_aten_copies(monkeypatch):
    """A `Linear`'s gradients with oneDNN's transposed left operands copied by the kernel equal those with aten's
    copy, bit for bit (both forms of `matmul._weight_grad`: N < K and N >= K)."""
    from openk2.model import matmul
    from openk2.model.matmul import Linear

    if not matmul.ENABLED:
        pytest.skip("oneDNN is not built into this torch")
    grads = []
    for copy in (few_rows.transpose_copy, lambda x: x.contiguous()):
        monkeypatch.setattr(few_rows, "transpose_copy", copy)
        for n_in, n_out in ((512, 256), (256, 1024)):
            layer = Linear(n_in, n_out, bias=False)
            torch.nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(n_in))
            x = torch.randn(1024, n_in, generator=torch.Generator().manual_seed(n_out), requires_grad=True)
            layer(x).square().sum().backward()
            grads += [x.grad, layer.weight.grad]
    for kernel_copy, aten_copy in zip(grads[:4], grads[4:], strict=True):
        assert torch.equal(kernel_copy, aten_copy)


@needs_kernel
@pytest.mark.parametrize("rows, width", [(4096, 128), (33, 13), (7, 5), (1, 8)])
def test_swiglu_and_its_backward_equal_float64_reference(rows, width):
    """Training's SwiGLU (`swiglu`, `swiglu_backward`) against float64 autograd on the halves of one [S, 2F] tensor
    (row stride 2F, as the fused gate-up product leaves them) with vector tails; the same numbers on 1 and 2
    threads; shape errors named."""
    assert few_rows.available(), few_rows._state.get("error")
    gen = torch.Generator().manual_seed(rows + width)
    gate_SF, up_SF = (torch.randn(rows, 2 * width, generator=gen) * 4).chunk(2, dim=-1)
    grad_SF = torch.randn(rows, width, generator=gen)
    runs = []
    for threads in (1, 2):
        with _threads(threads):
            grad_S2F = torch.empty(rows, 2 * width)
            few_rows.swiglu_backward(grad_SF, gate_SF, up_SF, *grad_S2F.chunk(2, dim=-1))
            runs.append((few_rows.swiglu(gate_SF, up_SF), grad_S2F))
    gate64, up64 = gate_SF.double().requires_grad_(), up_SF.double().requires_grad_()
    ref_SF = F.silu(gate64) * up64
    ref_SF.backward(grad_SF.double())
    h_SF, grad_S2F = runs[0]
    assert h_SF.is_contiguous()
    assert torch.allclose(h_SF.double(), ref_SF.detach(), rtol=1e-6, atol=1e-6), (h_SF.double() - ref_SF).abs().max()
    ref_S2F = torch.cat((gate64.grad, up64.grad), dim=-1)
    assert torch.allclose(grad_S2F.double(), ref_S2F, rtol=1e-6, atol=1e-6), (grad_S2F.double() - ref_S2F).abs().max()
    for one, two in zip(*runs, strict=True):
        assert torch.equal(one, two)
    with pytest.raises(RuntimeError, match="up has shape"):
        few_rows.swiglu(gate_SF, up_SF[:, :-1])


@needs_kernel
def test_mlp_and_experts_through_the_swiglu_kernel_match_aten(monkeypatch):
    """A dense MLP and a training step's routed experts (the fused gate-up path) give the same outputs and gradients
    through the kernel as through aten's silu and mul, within fp32 rounding."""
    from openk2.model import moe

    cfg = get_preset("nano")
    layer = moe.MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
    x = torch.randn(2, 1024, cfg.hidden_size, generator=torch.Generator().manual_seed(0))  # >= 32 rows per expert
    results = []
    for kernel in (True, False):
        monkeypatch.setattr(moe, "_SWIGLU_KERNEL", kernel)
        layer.zero_grad()
        x_in = x.clone().requires_grad_()
        y = layer(x_in)
        y.square().sum().backward()
        results.append((y.detach(), x_in.grad, *(p.grad.clone() for p in layer.parameters() if p.grad is not None)))
    assert len(results[0]) > 4
    for got, ref in zip(*results, strict=True):
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (got - ref).abs().max() / ref.abs().max()


@needs_kernel
def test_compiled_code_calls_the_kernel_without_graph_break():
    """Dynamo sees `available()` as a constant of the trace and the ops through their fake kernels."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=gen), torch.randn(40, 64, generator=gen)

    def f(x_MK: torch.Tensor) -> torch.Tensor:
        y = few_rows.mm(x_MK, w) if few_rows.available() else x_MK @ w.t()
        return torch.relu(y) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), f(x)) and torch.allclose(f(x), torch.relu(x @ w.t()) * 2, atol=1e-5)


@needs_kernel
def test_cached_generation_through_the_kernel_equals_full_forwards():
    """Cached generation (one token's routed experts through the kernel's experts op) picks the same tokens as
    full forwards without a cache (dispatched experts); the compiled step is checked in tests/model/test_decode.py."""
    model = build_model(get_preset("tiny", initializer_range=0.1), seed=0).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    fast = model.generate(ids, 6, compile=False)
    with torch.no_grad():
        seq = ids
        for _ in range(6):
            seq = torch.cat((seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(fast, seq)


def test_unbuildable_kernel_falls_back_with_one_warning(tmp_path):
    """No compiler (CXX points at one that fails): one warning that names the reason, `available()` False, and
    the decode step still runs, on oneDNN's products."""
    code = (
        "import warnings, torch\n"
        "from openk2.model import build_model, few_rows, get_preset\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    ok = few_rows.available(); again = few_rows.available()\n"
        "    model = build_model(get_preset('tiny'), seed=0).eval()\n"
        "    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 4, compile=False)\n"
        "msgs = [str(w.message) for w in caught if 'few-row' in str(w.message)]\n"
        "print(ok, again, len(msgs), out.shape[1]); print(msgs[0] if msgs else '')\n"
    )
    env = {**os.environ, "CXX": "false", "OPENK2_KERNEL_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    first, reason = done.stdout.splitlines()[:2]
    if few_rows.cpu_supports():
        assert first == "False False 1 7" and "unavailable" in reason and "false failed" in reason
    else:
        assert first == "False False 0 7"
    assert not list(tmp_path.glob("*.so"))  # no half-written library left behind


def test_switched_off_by_environment():
    env = {**os.environ, "OPENK2_FEW_ROWS": "0"}
    code = "from openk2.model import few_rows; print(few_rows.available())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_warning_free_when_built():
    if not few_rows.cpu_supports():
        pytest.skip("the kernel needs x86-64 with AVX2 and FMA")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert few_rows.available()
    assert few_rows.library_path().exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_dtensors_keep_torch_ops():
    """A DTensor weight (tensor parallelism) is not a plain buffer the kernel may read: `takes` says no."""
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Replicate, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        w = distribute_tensor(torch.randn(8, 16), DeviceMesh("cpu", [0]), [Replicate()])
        x = torch.randn(2, 16)
        assert not few_rows.takes(x, w)
        assert few_rows.takes(x, w.to_local()) == few_rows.available()
    finally:
        dist.destroy_process_group()


@needs_kernel
def test_prefill_experts_take_the_op_up_to_the_slot_limit(monkeypatch):
    """An inference forward over many tokens (a prefill) runs its routed experts through the experts op while the
    slots per expert stay within `MAX_SLOTS_PER_EXPERT`, with the dispatched path's numbers; beyond, dispatch."""
    from openk2.model import moe as moe_module

    model = build_model(get_preset("tiny", initializer_range=0.1), seed=0).eval()
    moe = next(m for m in model.modules() if isinstance(m, moe_module.MoE))
    E, K = moe.n_experts, moe.top_k
    tokens = few_rows.MAX_SLOTS_PER_EXPERT * E // K  # exactly at the limit
    x = torch.randn(1, tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    calls = []
    real_experts = few_rows.experts
    monkeypatch.setattr(few_rows, "experts", lambda *a: calls.append(a[0].shape[0]) or real_experts(*a))
    with torch.inference_mode():
        ids, weights, _ = moe.gate(x[0])
        assert moe.experts.takes_few_rows_kernel(x[0], ids)
        assert not moe.experts.takes_few_rows_kernel(torch.cat((x[0], x[0, :1])), torch.cat((ids, ids[:1])))
        y = moe(x)
        assert calls == [tokens]
        routed = y[0] - moe.shared_experts(x[0]) if moe.shared_experts is not None else y[0]
        assert torch.allclose(routed, moe._dispatched(x[0], ids, weights), atol=1e-5)
        moe(torch.cat((x, x[:, :1]), dim=1))  # one token over the limit: dispatched
    assert calls == [tokens]
