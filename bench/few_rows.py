"""The few-row product kernel (`openk2.model.few_rows`) beside oneDNN and aten's linear on the decode step's
weight shapes: time per product and the weight's read bandwidth, at 1, 2, 4, 8 and 32 rows.

    PYTHONPATH=src .venv/bin/python bench/few_rows.py [--threads 2] [--config C]
    PYTHONPATH=src .venv/bin/python bench/few_rows.py --eager-model --config C   # the model's eager calls instead

Shapes are the bench config's (bench/common.py): the LM head, the dense MLP's up and down projections, an expert's
and the attention's largest matrices. Each timing is the median of `--iters` calls after a warm-up; the weight is
bigger than the last-level cache for the large shapes, so those read DRAM on every call.

`--eager-model`: the bench model's eager inference calls with the kernel and without it (its products on oneDNN,
its few tokens' experts dispatched), alternating in one process: a forward over a 16-token prompt (prefill) and
`generate(..., compile=False)` of 16 tokens.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from openk2.model import build_model, few_rows

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="C")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    ap.add_argument("--eager-model", action="store_true", help="time the bench model's eager calls instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not few_rows.available():
        sys.exit(f"the few-row kernel is unavailable here: {few_rows._state.get('error', 'CPU without AVX2/FMA')}")
    if args.eager_model:
        return eager_model(args.config)
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
