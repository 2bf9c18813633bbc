"""GPU check (run by bench/gpu_check.sh): bf16 training throughput and MFU of a ~1B-parameter K2-shaped model, peak
memory with and without the activation-memory switches, and the compiled decode step (CUDA graphs) against the eager
path. One process, one GPU, under 9 minutes.

    .venv/bin/python bench/gpu_check.py [--out DIR]          # on a CUDA machine
    .venv/bin/python bench/gpu_check.py --parts decode       # only the decode check
    .venv/bin/python bench/gpu_check.py --cpu-smoke          # the same code path on CPU with the tiny preset

The model ("k2-1b") keeps K2's shape at 1/1000 of its size: MLA with q/kv LoRA, 64 routed experts top-4 plus one
shared expert (K2: 384 top-8 + 1), the first layer dense. Training is the single-process trainer's step (fp32
master weights, bf16 autocast, fused chunked cross-entropy, MuonClip). MFU = model FLOPs per token (6 x activated
matmul parameters + attention, bench/common.py) x tokens/s over the GPU's dense bf16 peak (spec sheet for
H100/H200/A100, else a measured bf16 matmul peak; both are reported).

Decode: the same model in the serving dtype (bf16 weights on CUDA, `openk2.model.dtype`), greedy `generate` of
`--decode-tokens` tokens after a 16-token prompt at batch 1 and 8, compiled (`DecodeStep`: Inductor with
`mode="reduce-overhead"`, i.e. CUDA graphs) and eager. It reports tokens/s of each, the first (compiling) call's
seconds, and how many greedy tokens the two paths share before they first differ (bf16 rounding may flip a near-tie
between random weights' logits; the CPU tests hold the paths to equal tokens in fp32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import matmul_peak_flops, train_flops_per_token  # noqa: E402

from openk2.model import build_model, count_params, get_preset  # noqa: E402
from openk2.model.generate import generate  # noqa: E402
from openk2.optim import MuonClip  # noqa: E402
from openk2.parallel.activation import apply_activation_memory  # noqa: E402
from openk2.parallel.layout import ParallelLayout  # noqa: E402

K2_1B = dict(
    vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=384, num_hidden_layers=12,
    num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=4, n_shared_experts=1,
    first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=4096, rope_scaling=None,
    bos_token_id=None, eos_token_id=None,
)
SWITCHES = {
    "baseline": {},
    "recompute": dict(recompute="selective"),
    "recompute+fp8": dict(recompute="selective", fp8_activations=True),
    "recompute+fp8+offload": dict(recompute="selective", fp8_activations=True, offload_activations=True),
}
# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendor spec sheets.
SPEC_PEAKS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}


def spec_peak(name: str) -> float | None:
    return next((v for k, v in SPEC_PEAKS.items() if k in name), None)


def run_config(name: str, switches: dict, cfg, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg, device=device, seed=0)
    apply_activation_memory(model, ParallelLayout(**switches).resolve(1))
    model.train()
    opt = MuonClip(model, lr=2e-3)
    gen = torch.Generator(device="cpu").manual_seed(1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
        with autocast:
            loss = model(x[:, :-1], labels=x[:, 1:], reduction="sum", return_logits=False).loss
        (loss / (args.batch * args.seq)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()) / (args.batch * args.seq)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    step_s = statistics.median(times)
    out = {"config": name, "switches": switches, "step_s": step_s, "tokens_per_s": args.batch * args.seq / step_s,
           "peak_mem_gib": peak / 2**30, "loss_last": losses[-1]}
    return out


def _timed_generate(model, prompt_BT: torch.Tensor, n: int, compile: bool, device: torch.device
                    ) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out_BT = generate(model, prompt_BT, max_new_tokens=n, compile=compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out_BT, time.perf_counter() - t0


def run_decode(cfg, args, device: torch.device) -> list[dict]:
    """Compiled vs eager greedy decode at batch 1 and 8 (see the module docstring)."""
    model = build_model(cfg, device=device, seed=0).eval()
    if device.type == "cuda":
        model.to(torch.bfloat16)
    gen = torch.Generator(device="cpu").manual_seed(2)
    rows = []
    for batch in (1, 8):
        prompt_BT = torch.randint(0, cfg.vocab_size, (batch, 16), generator=gen).to(device)
        r: dict = {"batch": batch, "new_tokens": args.decode_tokens}
        new_BN = {}
        for label, compiled in (("compiled", True), ("eager", False)):
            _, r[f"{label}_first_call_s"] = _timed_generate(model, prompt_BT, args.decode_tokens, compiled, device)
            times = []
            for _ in range(args.decode_rounds):
                out_BT, seconds = _timed_generate(model, prompt_BT, args.decode_tokens, compiled, device)
                times.append(seconds)
            r[f"{label}_tokens_per_s"] = batch * args.decode_tokens / statistics.median(times)
            new_BN[label] = out_BT[:, 16:].cpu()
        same_BN = (new_BN["compiled"] == new_BN["eager"]).long()
        r["greedy_tokens_shared"] = int(same_BN.cumprod(dim=1).sum(dim=1).min())  # the shortest shared prefix
        r["compiled_over_eager"] = r["compiled_tokens_per_s"] / r["eager_tokens_per_s"]
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--configs", default=",".join(SWITCHES))
    ap.add_argument("--parts", default="train,decode", help="train, decode or both (comma-separated)")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--cpu-smoke", action="store_true", help="run the code path on CPU with the tiny preset")
    ap.add_argument("--out", type=Path, help="directory for gpu_check.json")
    args = ap.parse_args()
    if args.cpu_smoke:
        device = torch.device("cpu")
        cfg = get_preset("tiny", vocab_size=256)
        args.batch, args.seq, args.warmup, args.steps = 2, 64, 1, 1
        args.decode_tokens, args.decode_rounds = 8, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --cpu-smoke to check the script, or on a GPU machine")
        device = torch.device("cuda")
        cfg = get_preset("nano", **K2_1B)
    counts = count_params(cfg)
    flops_per_token = train_flops_per_token(cfg, args.seq)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    measured_peak = matmul_peak_flops(4096 if device.type == "cuda" else 256,
                                      torch.bfloat16 if device.type == "cuda" else torch.float32)
    peak = spec_peak(name) or measured_peak
    parts = set(args.parts.split(","))
    if not parts <= {"train", "decode"}:
        sys.exit(f"--parts takes train and/or decode, got {args.parts!r}")
    rows, decode_rows = [], []
    t_start = time.perf_counter()
    if "decode" in parts:
        decode_rows = run_decode(cfg, args, device)
    for c in (args.configs.split(",") if "train" in parts else []):
        r = run_config(c, SWITCHES[c], cfg, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous config's model and optimizer are gone
        r["mfu"] = r["tokens_per_s"] * flops_per_token / peak
        r["mfu_vs_measured_matmul"] = r["tokens_per_s"] * flops_per_token / measured_peak
        rows.append(r)
        print(json.dumps(r), flush=True)
    result = {
        "device": name, "torch": torch.__version__, "params_total": counts.total, "params_activated": counts.activated,
        "batch": args.batch, "seq": args.seq, "flops_per_token": flops_per_token, "peak_flops_spec": spec_peak(name),
        "peak_flops_measured_matmul": measured_peak, "rows": rows, "decode": decode_rows,
        "wall_s": time.perf_counter() - t_start,
    }
    model_name = "tiny (CPU smoke run: nothing measured)" if args.cpu_smoke else "k2-1b"
    dtype = "fp32" if args.cpu_smoke else "bf16 autocast"
    print(f"\n{name}: {model_name} {counts.total / 1e9:.2f}B total / {counts.activated / 1e9:.3f}B activated")
    if rows:
        print(f"training: batch {args.batch} x {args.seq}, {dtype}, MuonClip")
        print("| config | tokens/s | MFU | peak memory GiB | step s |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['config']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_mem_gib']:.2f} | "
                  f"{r['step_s']:.3f} |")
    if decode_rows:
        print(f"\ngreedy decode, {args.decode_tokens} tokens after a 16-token prompt, "
              f"{'bf16' if device.type == 'cuda' else 'fp32'} weights")
        print("| batch | compiled tok/s | eager tok/s | compiled / eager | first call s (compiled / eager) | "
              "greedy tokens shared |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in decode_rows:
            print(f"| {r['batch']} | {r['compiled_tokens_per_s']:,.0f} | {r['eager_tokens_per_s']:,.0f} | "
                  f"{r['compiled_over_eager']:.2f}x | {r['compiled_first_call_s']:.1f} / "
                  f"{r['eager_first_call_s']:.1f} | {r['greedy_tokens_shared']} of {r['new_tokens']} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
