"""Sandbox overhead: per-sample cost of `openk2.sandbox` over a bare subprocess, at each isolation level.

    .venv/bin/python bench/sandbox.py [--iters 40] [--levels bwrap,unshare,rlimits-only] [--humaneval DATA_DIR]
                                      [--json out.json]

Per sample = everything `Sandbox.run` does: a private directory with the program written into it (and chowned to
the run's uid when root), limits, the namespaces of the level, a wait that wakes on exit (pidfd), output read back,
cleanup. "Bare" = `subprocess.run` of the same argv with captured output in an existing directory. Two programs:
`true` (pure overhead) and a Python file that does nothing (the interpreter start every Python sample pays; the
same interpreter both ways). Bare and sandboxed runs alternate so load from other jobs hits both alike; the table
shows medians and the overhead = median(sandbox) - median(bare). Target: <= 50 ms.

`--humaneval DATA_DIR` also times the 164 HumanEval canonical solutions through the benchmark's scorer with the
shared sandbox's parallelism (all must pass).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from openk2.sandbox import Limits, Sandbox, SandboxUnavailable


def _time(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(level: str, iters: int) -> list[dict[str, object]]:
    sandbox = Sandbox(Limits(wall_s=10), isolation=level, parallel=1)
    rows = []
    with tempfile.TemporaryDirectory() as bare_dir:
        Path(bare_dir, "main.py").write_text("pass\n")
        programs = {
            "true": (["true"], {"argv": ["true"]}),
            "python pass": ([sandbox.python, "-E", "-s", "-B", "main.py"], {"code": "pass\n"}),
        }
        for name, (bare_argv, sandbox_args) in programs.items():
            bare, boxed = [], []
            for i in range(iters + 2):
                b = _time(partial(subprocess.run, bare_argv, cwd=bare_dir, capture_output=True, check=True))
                s = _time(partial(sandbox.run, sandbox_args.get("argv"), code=sandbox_args.get("code")))
                if i >= 2:  # warm-up: page cache, probe caches
                    bare.append(b)
                    boxed.append(s)
            rows.append({
                "level": level, "program": name, "iters": iters,
                "bare_ms": 1000 * statistics.median(bare), "sandbox_ms": 1000 * statistics.median(boxed),
                "overhead_ms": 1000 * (statistics.median(boxed) - statistics.median(bare)),
                "sandbox_p90_ms": 1000 * sorted(boxed)[int(0.9 * (len(boxed) - 1))],
            })  # fmt: skip
    return rows


def humaneval(data_dir: Path) -> dict[str, object]:
    from openk2.eval.benchmarks.code import BENCHMARKS, code_sandbox
    from openk2.eval.task import Completion

    bench = next(b for b in BENCHMARKS if b.name == "humaneval")
    samples = bench.load(data_dir)
    with gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        canonical = {row["task_id"]: row["canonical_solution"] for row in map(json.loads, f)}
    sandbox = code_sandbox()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=sandbox.parallel) as pool:
        scores = list(pool.map(lambda s: bench.score(s, Completion(canonical[s.id])).value, samples))
    return {"problems": len(samples), "passed": int(sum(scores)), "seconds": time.perf_counter() - start,
            "parallel": sandbox.parallel, "isolation": sandbox.isolation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--levels", default="bwrap,unshare,rlimits-only")
    parser.add_argument("--humaneval", type=Path, default=None, metavar="DATA_DIR")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--ballast-mb", type=int, default=0,
                        help="touch this much memory in the harness process first, as a harness holding torch "
                             "does (a fork()-based launcher would pay for it on every sample)")
    args = parser.parse_args()
    ballast = bytearray(args.ballast_mb << 20)
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1

    print(f"machine: {os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}, "
          f"uid {os.geteuid()}, harness ballast {args.ballast_mb} MB")
    rows: list[dict[str, object]] = []
    for level in args.levels.split(","):
        try:
            rows += measure(level, args.iters)
        except SandboxUnavailable as exc:
            print(f"{level}: unavailable ({exc})")
    print("\n| level | program | bare (ms) | sandbox (ms) | overhead (ms) | sandbox p90 (ms) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['level']} | {r['program']} | {r['bare_ms']:.1f} | {r['sandbox_ms']:.1f} | "
              f"**{r['overhead_ms']:.1f}** | {r['sandbox_p90_ms']:.1f} |")
    result: dict[str, object] = {"rows": rows}
    if args.humaneval is not None:
        he = humaneval(args.humaneval)
        result["humaneval"] = he
        print(f"\nHumanEval canonical: {he['passed']}/{he['problems']} passed in {he['seconds']:.1f} s "
              f"({he['isolation']}, parallel {he['parallel']})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    sys.exit(0)


if __name__ == "__main__":
    main()
