"""Model benchmark: openk2 vs transformers' DeepseekV3ForCausalLM at identical config and weights.

    .venv/bin/python bench/model.py [--configs A B] [--steps 5] [--decode-tokens 64]

Reports training tokens/s (fwd + bwd + AdamW step), MFU against the fp32 matmul peak measured in the same
run, the cost of max-logit recording, decode tokens/s at batch 1 and 8, and KV-cache bytes per token.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from openk2.model import build_model
from openk2.model.hf import save_hf

sys.path.insert(0, str(Path(__file__).parent))
from common import BATCH, SEQ, bench_config, machine_info, matmul_peak_flops, timeit, train_flops_per_token  # noqa: E402


def train_step_fn(model, ids_BT, forward):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = forward(model, ids_BT)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours_loss(model, ids_BT):
    return model(ids_BT[:, :-1], labels=ids_BT[:, 1:]).loss


def hf_loss(model, ids_BT):
    # HF shifts labels internally: pass the full row.
    return model(input_ids=ids_BT, labels=ids_BT).loss


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


def decode_tps(generate, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (batch, prompt_len))
    generate(ids[:, :8], 4)  # warm-up
    t0 = time.perf_counter()
    generate(ids, new_tokens)
    return batch * new_tokens / (time.perf_counter() - t0)


def run_config(name: str, steps: int, decode_tokens: int, peak: float) -> dict:
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
    for label, model, fwd in (("ours", ours, ours_loss), ("hf", hf, hf_loss)):
        model.train()
        t = timeit(train_step_fn(model, ids_BT, fwd), warmup=2, iters=steps)
        r[f"{label}_train_tok_s"] = tokens / t
        r[f"{label}_mfu"] = train_flops_per_token(cfg, SEQ) * tokens / t / peak
    r["train_speedup"] = r["ours_train_tok_s"] / r["hf_train_tok_s"]

    # Max-logit recording cost (QK-Clip's input) on the training forward.
    x = ids_BT[:, :-1]
    with torch.no_grad():
        plain = timeit(lambda: ours(x), warmup=2, iters=steps)
        with ours.recording_max_logits():
            rec = timeit(lambda: ours(x), warmup=2, iters=steps)
    r["max_logit_recording_overhead"] = rec / plain - 1

    ours.eval()
    hf.eval()
    hf.generation_config.pad_token_id = 0

    def hf_generate(ids, n):
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    for batch in (1, 8):
        r[f"ours_decode_tok_s_b{batch}"] = decode_tps(ours.generate, batch, 32, decode_tokens, cfg.vocab_size)
        r[f"hf_decode_tok_s_b{batch}"] = decode_tps(hf_generate, batch, 32, decode_tokens, cfg.vocab_size)
        r[f"decode_speedup_b{batch}"] = r[f"ours_decode_tok_s_b{batch}"] / r[f"hf_decode_tok_s_b{batch}"]
    r["ours_kv_bytes_per_token"] = ours.new_cache(1, 1).bytes_per_token
    r["hf_kv_bytes_per_token"] = hf_cache_bytes_per_token(hf, ids_BT)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["A", "B"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    peak = matmul_peak_flops()
    print(f"# {machine_info()}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    results = [run_config(c, args.steps, args.decode_tokens, peak) for c in args.configs]
    cols = ["config", "ours_train_tok_s", "hf_train_tok_s", "train_speedup", "ours_mfu", "hf_mfu",
            "max_logit_recording_overhead", "ours_decode_tok_s_b1", "hf_decode_tok_s_b1", "decode_speedup_b1",
            "ours_decode_tok_s_b8", "hf_decode_tok_s_b8", "decode_speedup_b8", "ours_kv_bytes_per_token",
            "hf_kv_bytes_per_token"]
    print("| metric | " + " | ".join(r["config"] for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for c in cols[1:]:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) and abs(r[c]) < 10 else f"{r[c]:.0f}" for r in results]
        print(f"| {c} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"peak_flops": peak, "results": results}, indent=2))


if __name__ == "__main__":
    main()
