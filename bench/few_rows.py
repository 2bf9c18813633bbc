"""The few-row product kernel (`openk2.model.few_rows`) beside oneDNN and aten's linear on the decode step's
weight shapes: time per product and the weight's read bandwidth, at 1, 2, 4, 8 and 32 rows.

    PYTHONPATH=src .venv/bin/python bench/few_rows.py [--threads 2] [--config C]
    PYTHONPATH=src .venv/bin/python bench/few_rows.py --eager-model --config C   # the model's eager calls instead
    PYTHONPATH=src .venv/bin/python bench/few_rows.py --prefill --config A       # a prefill's experts and attention
    PYTHONPATH=src .venv/bin/python bench/few_rows.py --training-attention --config A   # training's attention
    PYTHONPATH=src .venv/bin/python bench/few_rows.py --training-ops --config A   # transposes, SwiGLU, RMSNorm

Shapes are the bench config's (bench/common.py): the LM head, the dense MLP's up and down projections, an expert's
and the attention's largest matrices. Each timing is the median of `--iters` calls after a warm-up; the weight is
bigger than the last-level cache for the large shapes, so those read DRAM on every call.

`--eager-model`: the bench model's eager inference calls with the kernel and without it (its products on oneDNN,
its few tokens' experts dispatched), alternating in one process: a forward over a 16-token prompt (prefill) and
`generate(..., compile=False)` of 16 tokens.

`--prefill`: a prefill's two CPU paths of our own against torch's, interleaved in one process: one MoE layer's
routed experts over 64-2048 tokens through the experts op vs dispatched (per-expert oneDNN products), and the
whole cached prefill of 512 tokens with the experts op and `blocked_masked_attention` vs dispatched experts and
SDPA under the cache's mask (what each replaced).

`--training-attention`: training's causal attention, forward + backward, at the config's heads (batch 8, 256-1,024
tokens) through the kernel library's `causal_attention`, `blocked_causal_attention` and SDPA, interleaved.

`--training-ops`: the training step's other kernels against the aten ops they replace, at the bench step's shapes
(batch 8 x 256 tokens), interleaved: the transposing copy oneDNN's weight gradients need, SwiGLU forward and
backward, RMSNorm forward + backward.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import openk2.model.attention as attention_module
from openk2.model import build_model, few_rows
from openk2.model.moe import MoE

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_config, machine_info, timeit  # noqa: E402

PRODUCTS = {
    "kernel": few_rows.mm,
    "onednn": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
    "aten": F.linear,
}


def eager_model(config: str, rounds: int = 3) -> None:
    cfg = bench_config(config)
    model = build_model(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    calls = {"prefill of 16 tokens": lambda: model(ids), "eager generate, 16 tokens": lambda: model.generate(
        ids, 16, compile=False)}
    best: dict[tuple[str, bool], float] = {}
    for _ in range(rounds):
        for on in (True, False):
            few_rows._state["available"] = on  # what `available()` answers, as if the build had failed
            with torch.inference_mode():
                for name, fn in calls.items():
                    t = timeit(fn, warmup=1, iters=5)
                    best[name, on] = min(best.get((name, on), t), t)
    few_rows._state["available"] = True
    print(f"# {machine_info()}; config {config}; best of {rounds} rounds of medians")
    print("| eager call | few-row kernel | without | speed-up |\n|---|---:|---:|---:|")
    for name in calls:
        on, off = best[name, True], best[name, False]
        print(f"| {name} | {on * 1e3:.1f} ms | {off * 1e3:.1f} ms | {off / on:.2f}x |")


def _sdpa_padded(q_BHTQ, k_BHSQ, v_BHSV, scale, mask_BTS=None):
    """SDPA with V padded to the QK dim for its fused kernel, under `mask_BTS` or causal: what cached prefill attention
    ran before `blocked_masked_attention`, and what `MLA.forward` runs beyond 1,024 tokens."""
    V = v_BHSV.shape[-1]
    v_BHSQ = F.pad(v_BHSV, (0, q_BHTQ.shape[-1] - V))
    mask = None if mask_BTS is None else mask_BTS[:, None]
    return F.scaled_dot_product_attention(q_BHTQ, k_BHSQ, v_BHSQ, attn_mask=mask, is_causal=mask is None,
                                          scale=scale)[..., :V]


def prefill(config: str, rounds: int = 5) -> None:
    cfg = bench_config(config)
    model = build_model(cfg, seed=0).eval()
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    ex = moe.experts
    print(f"# {machine_info()}; config {config}; medians of {rounds} interleaved rounds")
    print("| routed experts of one MoE layer | experts op | dispatched | speed-up |\n|---|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for tokens in (64, 128, 256, 512, 1024, 2048):
            x = torch.randn(tokens, cfg.hidden_size, generator=gen)
            ids, gates, _ = moe.gate(x)
            fns = {"op": partial(few_rows.experts, x, ids, gates, ex.gate_proj, ex.up_proj, ex.down_proj),
                   "dispatched": partial(moe._dispatched, x, ids, gates)}
            assert torch.allclose(fns["op"](), fns["dispatched"](), atol=1e-4)
            t = {k: [] for k in fns}
            for _ in range(rounds):
                for k, fn in fns.items():
                    t[k].append(timeit(fn, warmup=1, iters=3))
            op, disp = (sorted(v)[rounds // 2] for v in t.values())
            per_expert = tokens * moe.top_k / moe.n_experts
            print(f"| {tokens} tokens ({per_expert:.0f} slots per expert) | {op * 1e3:.2f} ms | {disp * 1e3:.2f} ms "
                  f"| {disp / op:.2f}x |", flush=True)
    ids = torch.randint(0, cfg.vocab_size, (1, 512), generator=gen)
    blocked, limit = attention_module.blocked_masked_attention, few_rows.MAX_SLOTS_PER_EXPERT

    def sdpa_under_mask(q_BHTQ, k_BHSQ, v_BHSV, mask_BTS, scale):
        return _sdpa_padded(q_BHTQ, k_BHSQ, v_BHSV, scale, mask_BTS)

    def run(ours: bool) -> torch.Tensor:
        attention_module.blocked_masked_attention = blocked if ours else sdpa_under_mask
        few_rows.MAX_SLOTS_PER_EXPERT = limit if ours else 0
        with torch.inference_mode():
            return model(ids, cache=model.new_cache(1, 512), last_logits_only=True).logits

    try:
        assert torch.allclose(run(True), run(False), atol=1e-4)
        t = {True: [], False: []}
        for _ in range(rounds):
            for ours in (True, False):
                t[ours].append(timeit(partial(run, ours), warmup=1, iters=3))
    finally:
        attention_module.blocked_masked_attention, few_rows.MAX_SLOTS_PER_EXPERT = blocked, limit
    ours, before = (sorted(t[k])[rounds // 2] for k in (True, False))
    print(f"\n| cached prefill, 512 tokens | experts op + blocked attention | dispatched + SDPA | speed-up |\n"
          f"|---|---:|---:|---:|\n| config {config} | {ours * 1e3:.1f} ms ({512 / ours:,.0f} tok/s) | "
          f"{before * 1e3:.1f} ms ({512 / before:,.0f} tok/s) | {before / ours:.2f}x |")


def _fwd_bwd(attend, q, k, v, grad) -> tuple[torch.Tensor, ...]:
    q.grad = k.grad = v.grad = None
    attend(q, k, v).backward(grad)
    return q.grad, k.grad, v.grad


def training_attention(config: str, rounds: int = 5) -> None:
    """Forward + backward of training's causal attention at the config's heads, batch 8: the kernel library's
    `causal_attention` (through `attention._KernelCausalAttention`), `blocked_causal_attention` (the reference) and
    SDPA, q and v strided as `MLA.forward` passes them; medians of interleaved rounds, and the rate over the causal
    half's FLOPs."""
    from common import BATCH

    cfg = bench_config(config)
    H, Q, V, scale = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim, cfg.softmax_scale
    paths = {"kernel": lambda q, k, v: attention_module._KernelCausalAttention.apply(q, k, v, scale)[0],
             "blocked": lambda q, k, v: attention_module.blocked_causal_attention(q, k, v, scale),
             "SDPA": lambda q, k, v: _sdpa_padded(q, k, v, scale)}
    print(f"# {machine_info()}; config {config} (B {BATCH}, H {H}, QK {Q}, V {V}); medians of {rounds} rounds")
    print("| T | kernel fwd + bwd | blocked_causal_attention | SDPA | kernel vs blocked | kernel GFLOP/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for T in (256, 512, 1024):
        q = torch.randn(BATCH, T, H, Q, generator=gen).transpose(1, 2).requires_grad_()
        k = torch.randn(BATCH, H, T, Q, generator=gen).requires_grad_()
        v = torch.randn(BATCH, T, H, V, generator=gen).transpose(1, 2).requires_grad_()
        grad = torch.randn(BATCH, H, T, V, generator=gen)

        operands = (q, k, v, grad)
        for got, ref in zip(_fwd_bwd(paths["kernel"], *operands), _fwd_bwd(paths["blocked"], *operands), strict=True):
            assert torch.allclose(got, ref, atol=1e-4)
        t = {p: [] for p in paths}
        for _ in range(rounds):
            for p, fn in paths.items():
                t[p].append(timeit(partial(_fwd_bwd, fn, *operands), warmup=1, iters=5))
        kernel, blocked, sdpa = (sorted(t[p])[rounds // 2] for p in paths)
        # Forward: scores and values; backward: scores again, dP, dq, dk, dv; over the T (T + 1) / 2 causal pairs.
        flops = 2 * BATCH * H * T * (T + 1) / 2 * (4 * Q + 3 * V)
        print(f"| {T} | {kernel * 1e3:.2f} ms | {blocked * 1e3:.2f} ms | {sdpa * 1e3:.2f} ms | "
              f"{blocked / kernel:.2f}x | {flops / kernel / 1e9:.0f} |", flush=True)


def training_ops(config: str, rounds: int = 7) -> None:
    """The transposing copy, SwiGLU and RMSNorm kernels against aten's ops at the config's training shapes; medians
    of interleaved rounds."""
    from common import BATCH, SEQ

    from openk2.model.norm import _KernelRMSNorm, _RMSNormFunction

    cfg = bench_config(config)
    N, D, F_ = BATCH * SEQ, cfg.hidden_size, cfg.moe_intermediate_size
    slots = N * cfg.num_experts_per_tok
    gen = torch.Generator().manual_seed(0)
    grad_NF, x_ND = torch.randn(N, F_, generator=gen), torch.randn(N, D, generator=gen)
    gate_up = torch.randn(slots, 2 * F_, generator=gen)
    gate, up = gate_up.chunk(2, dim=-1)
    grad_SF = torch.randn(slots, F_, generator=gen)
    grad_S2F = torch.empty(slots, 2 * F_)
    w_D = torch.rand(D, generator=gen) + 0.5
    x_req = x_ND.clone().requires_grad_()
    w_req = w_D.clone().requires_grad_()

    silu = F.silu(gate)  # aten's path saves it in the forward

    def aten_swiglu_backward():
        torch.ops.aten.silu_backward(grad_SF * up, gate, grad_input=grad_S2F[:, :F_])
        torch.mul(grad_SF, silu, out=grad_S2F[:, F_:])

    def norm(fn):
        x_req.grad = w_req.grad = None
        fn(x_req, w_req, 1e-6).backward(x_ND)

    cases = {
        f"transposed gradient [{N}, {F_}] made contiguous": (
            lambda: grad_NF.t().contiguous(), lambda: few_rows.transpose_copy(grad_NF.t())),
        f"transposed activations [{N}, {D}] made contiguous": (
            lambda: x_ND.t().contiguous(), lambda: few_rows.transpose_copy(x_ND.t())),
        f"SwiGLU forward, routed experts [{slots}, {F_}]": (
            lambda: F.silu(gate) * up, lambda: few_rows.swiglu(gate, up)),
        f"SwiGLU backward, routed experts [{slots}, {F_}]": (
            aten_swiglu_backward,
            lambda: few_rows.swiglu_backward(grad_SF, gate, up, grad_S2F[:, :F_], grad_S2F[:, F_:])),
        f"RMSNorm forward + backward [{N}, {D}]": (
            partial(norm, _RMSNormFunction.apply), partial(norm, _KernelRMSNorm.apply)),
    }
    assert torch.allclose(few_rows.swiglu(gate, up), F.silu(gate) * up, atol=1e-4)
    print(f"# {machine_info()}; config {config}; medians of {rounds} interleaved rounds")
    print("| op | aten | kernel | speedup |")
    print("|---|---:|---:|---:|")
    for name, (aten_fn, kernel_fn) in cases.items():
        t = {"aten": [], "kernel": []}
        for _ in range(rounds):
            t["aten"].append(timeit(aten_fn, warmup=2, iters=10))
            t["kernel"].append(timeit(kernel_fn, warmup=2, iters=10))
        aten, kernel = (sorted(v)[rounds // 2] for v in t.values())
        print(f"| {name} | {aten * 1e3:.3f} ms | {kernel * 1e3:.3f} ms | {aten / kernel:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="C")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    ap.add_argument("--eager-model", action="store_true", help="time the bench model's eager calls instead")
    ap.add_argument("--prefill", action="store_true", help="time a prefill's experts and attention instead")
    ap.add_argument("--training-attention", action="store_true",
                    help="time training's causal attention, forward + backward, instead")
    ap.add_argument("--training-ops", action="store_true",
                    help="time training's transposing copy, SwiGLU and RMSNorm kernels against aten instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not few_rows.available():
        sys.exit(f"the few-row kernel is unavailable here: {few_rows._state.get('error', 'CPU without AVX2/FMA')}")
    if args.eager_model:
        return eager_model(args.config)
    if args.prefill:
        return prefill(args.config)
    if args.training_attention:
        return training_attention(args.config)
    if args.training_ops:
        return training_ops(args.config)
    cfg = bench_config(args.config)
    D = cfg.hidden_size
    shapes = {"LM head": (cfg.vocab_size, D), "MLP up": (cfg.intermediate_size, D),
              "MLP down": (D, cfg.intermediate_size), "expert up": (cfg.moe_intermediate_size, D),
              "attention out": (D, cfg.num_attention_heads * cfg.v_head_dim)}
    print(f"# {machine_info()}; config {args.config}; median of {args.iters} calls")
    print("| weight [N, K] | rows | few-row kernel | oneDNN | aten linear | kernel / oneDNN speed |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape_name, (n_out, k_in) in shapes.items():
        w = torch.randn(n_out, k_in)
        gb = w.numel() * 4 / 1e9
        for rows in args.rows:
            x = torch.randn(rows, k_in)
            assert torch.allclose(few_rows.mm(x, w), x @ w.t(), atol=1e-3)
            t = {name: timeit(partial(fn, x, w), warmup=3, iters=args.iters) for name, fn in PRODUCTS.items()}
            cells = " | ".join(f"{v * 1e6:,.0f} us ({gb / v:.1f} GB/s)" for v in t.values())
            speed = t["onednn"] / t["kernel"]
            print(f"| {shape_name} [{n_out}, {k_in}] | {rows} | {cells} | {speed:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
