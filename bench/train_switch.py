"""A training-step switch measured across processes: each setting of an environment variable in its own process.

    .venv/bin/python bench/train_switch.py OPENK2_BLOCK_CACHE [--values 0 1] [--configs A B] [--repeats 3]
        [--steps 10] [--with-transformers]

Why separate processes: a switch that changes what the process keeps (the training steps' block cache keeps freed
memory; `GLIBC_TUNABLES` or `mallopt` change the C library's thresholds) also changes what the other setting finds
in the same process, so an in-process A/B measures the two settings' interaction, not each. Here every (config,
value) pair runs in a fresh process, the pairs alternate `--repeats` times, and each process reports its median
step (fwd + bwd + fused AdamW through `model(x, labels=y)`, as `bench/model.py` times it), its minor page faults and
its system CPU time per step. `--with-transformers` also builds transformers' model from the same weights in each
process and runs one of its steps after every openk2 step, as `bench/model.py` interleaves them; the process then
reports both medians and their ratio.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import BATCH, SEQ, bench_config  # noqa: E402
from model import hf_loss, ours_loss, train_step_fn  # noqa: E402


def _one_process(config: str, steps: int, with_transformers: bool) -> str:
    from openk2.model import build_model

    torch.set_num_threads(2)
    cfg = bench_config(config)
    ours = build_model(cfg, seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    ours_step, hf_step = train_step_fn(ours, ids, ours_loss), None
    if with_transformers:
        from transformers import AutoModelForCausalLM

        from openk2.model.hf import save_hf

        with tempfile.TemporaryDirectory() as d:
            save_hf(ours, d, dtype=torch.float32)
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").train()
        hf_step = train_step_fn(hf, ids, hf_loss)
    for _ in range(2):  # warm-up: lazy buffers, the kernel library, the heap's first growth
        ours_step()
        if hf_step:
            hf_step()
    ours_s, hf_s, faults, system_s = [], [], 0, 0.0
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        ours_step()
        ours_s.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults += after.ru_minflt - before.ru_minflt
        system_s += after.ru_stime - before.ru_stime
        if hf_step:
            start = time.perf_counter()
            hf_step()
            hf_s.append(time.perf_counter() - start)
    line = (f"openk2 {statistics.median(ours_s) * 1e3:.0f} ms/step, {faults / steps:,.0f} faults, "
            f"{system_s / steps * 1e3:.0f} ms system")
    if hf_s:
        ratio = statistics.median(hf_s) / statistics.median(ours_s)
        line += f" | transformers {statistics.median(hf_s) * 1e3:.0f} ms/step | speedup {ratio:.3f}x"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variable", help="the environment variable to switch, e.g. OPENK2_BLOCK_CACHE")
    ap.add_argument("--values", nargs="+", default=["0", "1"])
    ap.add_argument("--configs", nargs="+", default=["A", "B"])
    ap.add_argument("--repeats", type=int, default=3, help="processes per (config, value), alternating")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per process")
    ap.add_argument("--with-transformers", action="store_true")
    ap.add_argument("--child", nargs=1, metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(_one_process(args.child[0], args.steps, args.with_transformers), flush=True)
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# commit {commit}, torch {torch.__version__}, 2 threads, {args.variable} in {args.values}")
    for config in args.configs:
        for repeat in range(args.repeats):
            for value in args.values:
                cmd = [sys.executable, __file__, args.variable, "--child", config, "--steps", str(args.steps)]
                if args.with_transformers:
                    cmd.append("--with-transformers")
                done = subprocess.run(cmd, env={**os.environ, args.variable: value}, capture_output=True,
                                      text=True)
                ok = done.returncode == 0
                result = done.stdout.strip().splitlines()[-1] if ok else f"failed: {done.stderr[-500:]}"
                print(f"{config} #{repeat + 1} {args.variable}={value}: {result}", flush=True)


if __name__ == "__main__":
    main()
