"""Evaluation-harness benchmark: samples/s of `openk2 eval`'s run loop against `openk2 serve`, concurrency 1 vs N.

    .venv/bin/python bench/eval.py [--samples 32] [--concurrency 8] [--max-tokens 64] [--max-batch 8]
                                   [--threads 1] [--repeats 2] [--json out.json]

Model: the `nano` preset with RANDOM weights (seed 0) and a 4096-token BPE trained on the standard library, as in
bench/serve.py: throughput does not depend on what the weights say. The server is a real `python -m openk2 serve`
subprocess on 127.0.0.1. The harness (`openk2.eval.harness.run_eval`, the code behind `openk2 eval`) runs in this
process with the `openai:` backend on a GSM8K-format benchmark of `--samples` generated arithmetic questions
(written to a temporary `--data-dir`, so no evaluation data is needed), `--max-tokens` per answer, math-verify
scoring, samples.jsonl/results.json/report.md output. Every scenario writes to a fresh output directory, so
nothing comes from the response cache.

samples/s = samples / wall time of one `run_eval` call (loading, requests, scoring, writing). The pair of
scenarios runs `--repeats` times, alternating; the table shows each scenario's best run; all runs are in the JSON.
Target: samples/s at concurrency N >= 3x concurrency 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from openk2.data.tokenizer import train_tokenizer
from openk2.eval.harness import EvalSettings, run_eval
from openk2.eval.models import open_model
from openk2.model import build_model, get_preset
from openk2.serve.testing import make_model_dir, serve_subprocess

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info  # noqa: E402
from tokenizer import stdlib_corpus  # noqa: E402


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def write_questions(data_dir: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    (data_dir / "gsm8k").mkdir(parents=True, exist_ok=True)
    with open(data_dir / "gsm8k" / "test.jsonl", "w") as f:
        for _ in range(n):
            a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
            f.write(json.dumps({"question": f"Ann has {a} apples and buys {c} bags of {b} apples. How many apples "
                                            "does she have now?", "answer": f"{a} + {c}*{b}\n#### {a + b * c}"}) + "\n")


async def scenario(url: str, data_dir: Path, out_dir: Path, concurrency: int, max_tokens: int) -> dict:
    handle = open_model(f"openai:{url}", model_name="nano", concurrency=concurrency, cache_dir=out_dir / "llm_cache")
    s = EvalSettings(benches=["gsm8k"], data_dir=data_dir, out_dir=out_dir, concurrency=concurrency,
                     max_tokens=max_tokens, progress=False)
    t0 = time.perf_counter()
    try:
        res = await run_eval(s, handle)
    finally:
        await handle.aclose()
    wall = time.perf_counter() - t0
    b = res["benchmarks"]["gsm8k"]
    usage = res["usage"]["total"]
    return {"concurrency": concurrency, "samples": b["samples"], "infra_errors": b["infra_errors"], "wall_s": wall,
            "samples_per_s": b["samples"] / wall, "completion_tokens": usage["completion_tokens"],
            "tokens_per_s": usage["completion_tokens"] / wall, "truncation_rate": b["truncation_rate"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (1 on shared CPUs)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    docs = stdlib_corpus(3.0)
    tok = train_tokenizer(docs, 4096, show_progress=False)
    model = build_model(get_preset("nano", vocab_size=4096), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_questions(root / "data", args.samples)
        model_dir = make_model_dir(root / "nano", model, tok)
        with serve_subprocess(model_dir, "--max-batch", str(args.max_batch), "--threads", str(args.threads),
                              "--device", "cpu", log_path=root / "server.log", startup_s=180) as (url, _):
            asyncio.run(scenario(url, root / "data", root / "warmup", 2, 8))
            load_before = _loadavg()
            singles, multis = [], []
            for r in range(args.repeats):
                singles.append(asyncio.run(scenario(url, root / "data", root / f"c1-{r}", 1, args.max_tokens)))
                multis.append(asyncio.run(scenario(url, root / "data", root / f"cN-{r}", args.concurrency,
                                                   args.max_tokens)))
            load_after = _loadavg()

    single = max(singles, key=lambda r: r["samples_per_s"])
    multi = max(multis, key=lambda r: r["samples_per_s"])
    paired = [m["samples_per_s"] / s["samples_per_s"] for s, m in zip(singles, multis, strict=True)]
    out = {"machine": machine_info(), "cpus": os.cpu_count(), "args": vars(args) | {"json": str(args.json)},
           "single_runs": singles, "multi_runs": multis, "speedup_best": multi["samples_per_s"] /
           single["samples_per_s"], "speedup_paired": paired, "loadavg_before": load_before,
           "loadavg_after": load_after}
    print(f"{machine_info()}; {os.cpu_count()} CPUs; load average before/after {load_before} / {load_after}")
    print("| concurrency | samples | wall s | samples/s | completion tokens/s | truncated | infra errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in (single, multi):
        print(f"| {r['concurrency']} | {r['samples']} | {r['wall_s']:.2f} | {r['samples_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {100 * (r['truncation_rate'] or 0):.0f}% | {r['infra_errors']} |")
    print(f"speedup (best runs): {out['speedup_best']:.2f}x; per repeat: "
          + ", ".join(f"{p:.2f}x" for p in paired))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
