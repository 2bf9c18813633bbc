"""In-process A/B of the compiled decode step's options on a bench config (the per-change rows of
docs/benchmarks.md, "Per-token overhead cut").

    PYTHONPATH=src .venv/bin/python bench/decode_variants.py --variants default library-products python-wrapper eager
    PYTHONPATH=src .venv/bin/python bench/decode_variants.py --batch 16 --tokens 32 --variants gathered dense
    PYTHONPATH=src .venv/bin/python bench/decode_variants.py --prompt 1000 --decode-only \
        --variants default inductor-attention

Each variant is its own `DecodeStep` on the same model (its own compiled graphs); rounds alternate the variants'
`generate` calls, so machine load hits them alike, and the report is the median tokens/s and the median of each
round's ratio to the first variant. Greedy tokens are checked against the eager reference path.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import openk2.model.decode as decode_module
import openk2.model.moe as moe_module
from openk2.model import build_model
from openk2.model.decode import DecodeStep

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_config, machine_info  # noqa: E402

ROUTING, ONEDNN = decode_module._DENSE_ROUTING_MIN_FRACTION, decode_module._ONEDNN_MIN_ELEMENTS
# name -> (DecodeStep keyword arguments, gathered-routing threshold in multiples of the expert count,
#          smallest weight (elements) that goes through oneDNN, products as Inductor reductions where the step does)
VARIANTS: dict[str, tuple[dict, float, float, bool]] = {
    "default": ({}, ROUTING, ONEDNN, True),
    "library-products": ({}, ROUTING, ONEDNN, False),
    "bmm-library": ({}, ROUTING, ONEDNN, True),
    "lm-head-t": ({"transposed_lm_head": True}, ROUTING, ONEDNN, False),
    "no-onednn": ({}, ROUTING, float("inf"), False),
    "onednn-all": ({}, ROUTING, 0, False),
    "python-wrapper": ({"cpp_wrapper": False}, ROUTING, ONEDNN, True),
    "gathered": ({}, float("inf"), ONEDNN, True),
    "dense": ({}, 0.0, ONEDNN, True),
    "eager": ({"compile": False}, ROUTING, ONEDNN, True),
    "token-order-gather": ({}, ROUTING, ONEDNN, True),
    "no-few-rows": ({}, ROUTING, ONEDNN, True),
    "few-rows-dense-only": ({}, ROUTING, ONEDNN, True),
    "inductor-attention": ({}, ROUTING, ONEDNN, True),
    "experts-op": ({}, ROUTING, ONEDNN, True),
    "library-routing": ({}, ROUTING, ONEDNN, True),
    "dynamo-calls": ({}, ROUTING, ONEDNN, True),
    "small-pages": ({}, ROUTING, ONEDNN, True),  # a copy of the model whose weights stay on 4 KiB pages
}


def _timed(run, seconds: list[float]):
    def timed(*args):
        t0 = time.perf_counter()
        out = run(*args)
        seconds.append(time.perf_counter() - t0)
        return out
    return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="A")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["default", "library-products", "eager"], choices=list(VARIANTS))
    ap.add_argument("--decode-only", action="store_true",
                    help="tokens/s of the compiled decode steps alone (their calls' wall time, without the prefill)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = bench_config(args.config)
    model = build_model(cfg, seed=0).eval()
    small_pages_model = copy.deepcopy(model) if "small-pages" in args.variants else None
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    ref = model.generate(ids, args.tokens, compile=False)
    steps: dict[str, tuple[DecodeStep, torch.nn.Module]] = {}
    for name in args.variants:
        kwargs, fraction, onednn, reductions = VARIANTS[name]
        decode_module._DENSE_ROUTING_MIN_FRACTION = fraction  # all read when the graph is traced
        decode_module._ONEDNN_MIN_ELEMENTS = onednn
        decode_module._REDUCTION_PRODUCTS = reductions
        decode_module._BMM_REDUCTIONS = name != "bmm-library"
        moe_module._SORTED_GATHER = name != "token-order-gather"
        decode_module._FEW_ROWS = name != "no-few-rows"
        moe_module._FEW_ROWS_EXPERTS = name not in ("no-few-rows", "few-rows-dense-only")
        decode_module._LATENT_ATTENTION = name not in ("no-few-rows", "inductor-attention")
        moe_module._SMALL_EXPERTS_TO_INDUCTOR = name != "experts-op"
        decode_module._IN_GRAPH_ROUTING = moe_module._IN_GRAPH_ORDER = name != "library-routing"
        decode_module._DIRECT_CALLS = name != "dynamo-calls"
        decode_module._HUGE_PAGE_WEIGHTS = name != "small-pages"
        m = small_pages_model if name == "small-pages" else model
        step = DecodeStep(m, **{"compile": True, **kwargs})
        m.__dict__.setdefault("_decode_steps", {})[True] = step
        t0 = time.perf_counter()
        out = m.generate(ids, args.tokens, compile=True)
        print(f"# {name}: first call {time.perf_counter() - t0:.1f} s, greedy equal {torch.equal(out, ref)}",
              flush=True)
        steps[name] = (step, m)
    step_seconds: list[float] = []  # --decode-only: the wall time of each compiled step call
    for step, _ in steps.values():
        step._run = _timed(step._run, step_seconds)
    rates: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(args.rounds):
        for name, (step, m) in steps.items():
            m.__dict__["_decode_steps"][True] = step
            step_seconds.clear()
            t0 = time.perf_counter()
            m.generate(ids, args.tokens, compile=True)
            seconds, tokens = time.perf_counter() - t0, args.tokens
            if args.decode_only:
                seconds, tokens = sum(step_seconds), len(step_seconds)
            rates[name].append(args.batch * tokens / seconds)
    load = os.getloadavg()
    only = " (decode only)" if args.decode_only else ""
    print(f"# {machine_info()}; config {args.config}, batch {args.batch}, {args.tokens} tokens after {args.prompt}"
          f"{only}; {args.rounds} rounds; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    first = args.variants[0]
    print(f"| variant | tokens/s (median) | vs {first} (median of round ratios) |")
    print("|---|---:|---:|")
    for name, r in rates.items():
        ratio = statistics.median(a / b for a, b in zip(r, rates[first], strict=True))
        print(f"| {name} | {statistics.median(r):.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
