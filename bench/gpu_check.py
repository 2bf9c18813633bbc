"""GPU check (run by bench/gpu_check.sh): bf16 training throughput and MFU of a ~1B-parameter K2-shaped model, and
peak memory with and without the activation-memory switches. One process, one GPU, under 8 minutes.

    .venv/bin/python bench/gpu_check.py [--out DIR]          # on a CUDA machine
    .venv/bin/python bench/gpu_check.py --cpu-smoke          # the same code path on CPU with the tiny preset

The model ("k2-1b") keeps K2's shape at 1/1000 of its size: MLA with q/kv LoRA, 64 routed experts top-4 plus one
shared expert (K2: 384 top-8 + 1), the first layer dense. Training is the single-process trainer's step (fp32
master weights, bf16 autocast, fused chunked cross-entropy, MuonClip). MFU = model FLOPs per token (6 x activated
matmul parameters + attention, bench/common.py) x tokens/s over the GPU's dense bf16 peak (spec sheet for
H100/H200/A100, else a measured bf16 matmul peak; both are reported).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--configs", default=",".join(SWITCHES))
    ap.add_argument("--cpu-smoke", action="store_true", help="run the code path on CPU with the tiny preset")
    ap.add_argument("--out", type=Path, help="directory for gpu_check.json")
    args = ap.parse_args()
    if args.cpu_smoke:
        device = torch.device("cpu")
        cfg = get_preset("tiny", vocab_size=256)
        args.batch, args.seq, args.warmup, args.steps = 2, 64, 1, 1
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
    rows = []
    t_start = time.perf_counter()
    for c in args.configs.split(","):
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
        "peak_flops_measured_matmul": measured_peak, "rows": rows, "wall_s": time.perf_counter() - t_start,
    }
    model_name = "tiny (CPU smoke run: nothing measured)" if args.cpu_smoke else "k2-1b"
    dtype = "fp32" if args.cpu_smoke else "bf16 autocast"
    print(f"\n{name}: {model_name} {counts.total / 1e9:.2f}B total / {counts.activated / 1e9:.3f}B activated, "
          f"batch {args.batch} x {args.seq}, {dtype}, MuonClip")
    print("| config | tokens/s | MFU | peak memory GiB | step s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_mem_gib']:.2f} | "
              f"{r['step_s']:.3f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
