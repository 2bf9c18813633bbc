"""Model benchmark: openk2 vs transformers' DeepseekV3ForCausalLM at identical config and weights.

    .venv/bin/python bench/model.py [--configs A B] [--steps 3] [--rounds 3] [--decode-tokens 64] [--quick]

Reports training tokens/s (fwd + bwd + AdamW step), MFU against the fp32 matmul peak measured in the same
run (2048^3 matmul, best of the measurements before, between and after the configs), the cost of max-logit
recording, decode tokens/s at batch 1 and 8, and KV-cache bytes per token (also against transformers 4.x,
which cached MLA's decompressed per-head keys and values).

The machine may be shared, so every comparison is interleaved: each round times openk2 then transformers
back to back; the table reports the median over all timed calls of all rounds, then (`*_best`) the fastest
call, the least disturbed by other processes. The matmul peak is the best of several measurements: a low,
contended peak would inflate MFU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from openk2.model import build_model
from openk2.model.hf import save_hf

sys.path.insert(0, str(Path(__file__).parent))
from common import BATCH, SEQ, bench_config, machine_info, matmul_peak_flops, timeit, train_flops_per_token  # noqa: E402


def train_step_fn(model, ids_BT, forward):
    # The same optimizer for both models; fused is torch's fastest CPU AdamW (~8x faster than foreach here).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        loss = forward(model, ids_BT)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours_loss(model, ids_BT):
    # The call the README documents: with labels, the chunked linear + cross-entropy (no [B, T, V] logits).
    return model(ids_BT[:, :-1], labels=ids_BT[:, 1:]).loss


def hf_loss(model, ids_BT):
    # HF shifts labels internally: pass the full row.
    return model(input_ids=ids_BT, labels=ids_BT).loss


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, calls: int, warmup: int = 1) -> dict:
    """(median, min) seconds per call of each fn; each round runs every fn `calls` times, one after the other."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def hf_cache_bytes_per_token(hf_model, ids_BT) -> float:
    with torch.no_grad():
        out = hf_model(input_ids=ids_BT[:1], use_cache=True)
    cache = out.past_key_values
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / ids_BT.shape[1]


def run_config(name: str, steps: int, rounds: int, decode_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = bench_config(name)
    torch.manual_seed(0)
    ours = build_model(cfg, seed=0)
    with tempfile.TemporaryDirectory() as d:
        save_hf(ours, d, dtype=torch.float32)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    ids_BT = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1))
    tokens = BATCH * SEQ
    r: dict = {"config": name}
    ours.train()
    hf.train()
    step_s = interleaved_times(
        {"ours": train_step_fn(ours, ids_BT, ours_loss), "hf": train_step_fn(hf, ids_BT, hf_loss)},
        rounds, steps, warmup=2,
    )
    for label, (median, best) in step_s.items():
        r[f"{label}_train_tok_s"] = tokens / median
        r[f"{label}_train_tok_s_best"] = tokens / best
    r["train_flops_per_token"] = train_flops_per_token(cfg, SEQ)
    r["train_speedup"] = r["ours_train_tok_s"] / r["hf_train_tok_s"]
    r["train_speedup_best"] = r["ours_train_tok_s_best"] / r["hf_train_tok_s_best"]

    # Max-logit recording cost (QK-Clip's input) on the training forward.
    x = ids_BT[:, :-1]
    with torch.no_grad():
        plain = timeit(lambda: ours(x), warmup=2, iters=steps * rounds)
        with ours.recording_max_logits():
            rec = timeit(lambda: ours(x), warmup=2, iters=steps * rounds)
    r["max_logit_recording_overhead"] = rec / plain - 1

    ours.eval()
    hf.eval()
    hf.generation_config.pad_token_id = 0

    def hf_generate(ids, n):
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    for batch in (1, 8):
        ids = torch.randint(0, cfg.vocab_size, (batch, 32))
        ours.generate(ids, decode_tokens)  # warm-up at the timed shape: compiles the decode step
        hf_generate(ids[:, :8], 4)
        gen_s = interleaved_times(
            {"ours": lambda ids=ids: ours.generate(ids, decode_tokens),
             "hf": lambda ids=ids: hf_generate(ids, decode_tokens)},
            rounds, 1, warmup=0,
        )
        for label, (median, best) in gen_s.items():
            r[f"{label}_decode_tok_s_b{batch}"] = batch * decode_tokens / median
            r[f"{label}_decode_tok_s_b{batch}_best"] = batch * decode_tokens / best
        for suffix in ("", "_best"):
            r[f"decode_speedup_b{batch}{suffix}"] = (r[f"ours_decode_tok_s_b{batch}{suffix}"]
                                                     / r[f"hf_decode_tok_s_b{batch}{suffix}"])
    r["ours_kv_bytes_per_token"] = ours.new_cache(1, 1).bytes_per_token
    r["hf_kv_bytes_per_token"] = hf_cache_bytes_per_token(hf, ids_BT)
    # transformers 4.x cached MLA's decompressed per-head keys and values (fp32 here).
    r["hf4_kv_bytes_per_token"] = (cfg.num_hidden_layers * cfg.num_attention_heads
                                   * (cfg.qk_head_dim + cfg.v_head_dim) * 4)
    r["kv_ratio_vs_hf"] = r["ours_kv_bytes_per_token"] / r["hf_kv_bytes_per_token"]
    r["kv_ratio_vs_hf4"] = r["ours_kv_bytes_per_token"] / r["hf4_kv_bytes_per_token"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["A", "B"])
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per model per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ours, then transformers)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="a fast smoke run: 1 step, 1 round, 16 decode tokens")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds, args.decode_tokens = 1, 1, 16
    # The peak is measured before, between and after the configs; the best is the least contended.
    peaks = [matmul_peak_flops()]
    results = []
    for c in args.configs:
        results.append(run_config(c, args.steps, args.rounds, args.decode_tokens))
        peaks.append(matmul_peak_flops())
    peak = max(peaks)
    for r in results:
        for label in ("ours", "hf"):
            for suffix in ("", "_best"):
                r[f"{label}_mfu{suffix}"] = r["train_flops_per_token"] * r[f"{label}_train_tok_s{suffix}"] / peak
    print(f"# {machine_info()}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(best of {', '.join(f'{p / 1e9:.0f}' for p in peaks)})")
    cols = ["config", "ours_train_tok_s", "hf_train_tok_s", "train_speedup", "ours_mfu", "hf_mfu",
            "max_logit_recording_overhead", "ours_decode_tok_s_b1", "hf_decode_tok_s_b1", "decode_speedup_b1",
            "ours_decode_tok_s_b8", "hf_decode_tok_s_b8", "decode_speedup_b8", "ours_kv_bytes_per_token",
            "hf_kv_bytes_per_token", "hf4_kv_bytes_per_token", "kv_ratio_vs_hf", "kv_ratio_vs_hf4"]
    # Medians, then the best (least contended) call of each kind: on a shared machine the two can differ a lot.
    best_cols = ["ours_train_tok_s_best", "hf_train_tok_s_best", "train_speedup_best", "ours_mfu_best", "hf_mfu_best",
                 "ours_decode_tok_s_b1_best", "hf_decode_tok_s_b1_best", "decode_speedup_b1_best",
                 "ours_decode_tok_s_b8_best", "hf_decode_tok_s_b8_best", "decode_speedup_b8_best"]
    print("| metric | " + " | ".join(r["config"] for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for c in cols[1:] + best_cols:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) and abs(r[c]) < 10 else f"{r[c]:.0f}" for r in results]
        print(f"| {c} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"peak_flops": peak, "results": results}, indent=2))


if __name__ == "__main__":
    main()
