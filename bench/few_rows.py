"""The few-row product kernel (`openk2.model.few_rows`) beside oneDNN and aten's linear on the decode step's
weight shapes: time per product and the weight's read bandwidth, at 1, 2, 4, 8 and 32 rows.

    PYTHONPATH=src .venv/bin/python bench/few_rows.py [--threads 2] [--config C]

Shapes are the bench config's (bench/common.py): the LM head, the dense MLP's up and down projections, an expert's
and the attention's largest matrices. Each timing is the median of `--iters` calls after a warm-up; the weight is
bigger than the last-level cache for the large shapes, so those read DRAM on every call.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from openk2.model import few_rows

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_config, machine_info, timeit  # noqa: E402

PRODUCTS = {
    "kernel": few_rows.mm,
    "onednn": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
    "aten": F.linear,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="C")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not few_rows.available():
        sys.exit(f"the few-row kernel is unavailable here: {few_rows._state.get('error', 'CPU without AVX2/FMA')}")
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
