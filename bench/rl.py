"""RL benchmark: rollout throughput of the in-process engine vs `generate`, and the split of an RL step.

    .venv/bin/python bench/rl.py [--config A] [--batches 1 8 32] [--compile off on] [--rounds 3] [--quick]
    .venv/bin/python bench/rl.py --metrics runs/<name>/rl/metrics.jsonl      # the RL step split of a run

Rollout: `--batches` prompts of `--prompt-len` random tokens, `--new-tokens` sampled tokens each (T = 1,
no stop tokens, so every sequence runs to the budget), on the bench model (config A of `bench/model.py` by
default, seed 0):

* `TorchEngine`: that many concurrent `generate` calls from asyncio, batched by the engine (continuous
  batching over the slot cache, behaviour logprobs per token);
* `generate`: one call of `openk2.model.generate` on the left-padded batch (no logprobs).

Tokens/s = generated tokens / wall time of the whole rollout (prefill included). Each (system, compile)
pair is warmed once per batch size first; with compile on, that warm-up, which compiles the decode graphs,
is reported separately as the compile time. Then `--rounds` interleaved rounds (every system and batch size
once per round, so machine load hits all alike); medians are reported, and the engine / generate ratio
within the run.

RL step split: the controller (`openk2.rl.controller`) writes `time/rollout`, `time/reward`, `time/update` and
`time/sync` per step into `metrics.jsonl`; `rl_step_split` summarises them (median seconds and share of the
step per phase). Extend it with new phases by writing more `time/<phase>` keys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch and openk2 are imported where the rollout needs them: `--metrics` alone starts in a fraction of a second.
if TYPE_CHECKING:
    from openk2.model.transformer import K2Model
    from openk2.rl.engine import TorchEngine


# ------------------------------------------------------------------------------------------- rollout
def prompts_for(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_len), generator=g).tolist()


def engine_rollout(engine: TorchEngine, prompts: list[list[int]], new_tokens: int) -> tuple[int, float]:
    """(generated tokens, seconds) of one batched rollout through the engine."""
    from openk2.rl.types import SamplingParams

    async def go():
        return await asyncio.gather(*(
            engine.generate(p, SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i), f"r{i}")
            for i, p in enumerate(prompts)))

    t0 = time.perf_counter()
    outs = asyncio.run(go())
    seconds = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs), seconds


def generate_rollout(model: K2Model, prompts: list[list[int]], new_tokens: int, compile: bool
                     ) -> tuple[int, float]:
    import torch

    from openk2.model.generate import generate

    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    out = generate(model, prompts, new_tokens, temperature=1.0, generator=g, compile=compile)
    seconds = time.perf_counter() - t0
    return (out.shape[1] - len(prompts[0])) * len(prompts), seconds


def bench_rollout(model: K2Model, batches: list[int], compiles: list[bool], prompt_len: int, new_tokens: int,
                  rounds: int) -> dict[str, Any]:
    from openk2.model.decode import decode_step, window_size
    from openk2.rl.engine import TorchEngine

    if True in compiles:
        # Continuous batching pads the batch to powers of two (1 .. max batch) over two key windows, and
        # `generate` adds its own cache layout: let every one of them compile, so no shape falls back to eager.
        decode_step(model, True).raise_budget(32)
    # A power of two: the engine's key windows (64, 128, ...) are then the ones `generate` uses, so the two share
    # compiled graphs instead of overrunning the decode step's graph budget.
    max_len = window_size(prompt_len + new_tokens)
    engines = {c: TorchEngine(model, max_batch=max(batches), max_len=max_len, compile=c) for c in compiles}
    prompts = {b: prompts_for(b, prompt_len, model.config.vocab_size) for b in batches}
    runs: dict[tuple[str, bool, int], Any] = {}
    for c in compiles:
        for b in batches:
            runs[("engine", c, b)] = lambda c=c, b=b: engine_rollout(engines[c], prompts[b], new_tokens)
            runs[("generate", c, b)] = lambda c=c, b=b: generate_rollout(model, prompts[b], new_tokens, c)
    warmup_s = {}
    for key, run in runs.items():  # first call: compiles the decode graphs when compile is on
        warmup_s[key] = run()[1]
    samples: dict[tuple[str, bool, int], list[float]] = {k: [] for k in runs}
    for r in range(rounds):
        for key, run in runs.items():
            n, s = run()
            samples[key].append(n / s)
        print(f"  round {r + 1}/{rounds} done", flush=True)
    for e in engines.values():
        e.close()
    graphs = {}
    if True in compiles:
        step = decode_step(model, True)
        graphs = {"compiled_graphs": len(step._graphs), "compile_s": sum(step.compile_seconds.values()),
                  "eager_fallbacks": step.eager_fallbacks}
    rows = []
    for (system, c, b), tps in samples.items():
        rows.append({"system": system, "compile": c, "batch": b, "tok_s": statistics.median(tps),
                     "tok_s_all": tps, "first_call_s": warmup_s[(system, c, b)]})
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds, "rows": rows, **graphs}


def rollout_table(result: dict[str, Any]) -> str:
    by = {(r["system"], r["compile"], r["batch"]): r for r in result["rows"]}
    lines = ["| batch | compile | TorchEngine tok/s | generate tok/s | engine / generate | first call (engine, "
             "generate) s |", "|---:|---|---:|---:|---:|---:|"]
    for (system, c, b), row in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if system != "engine":
            continue
        gen = by[("generate", c, b)]
        lines.append(f"| {b} | {'on' if c else 'off'} | {row['tok_s']:,.0f} | {gen['tok_s']:,.0f} | "
                     f"{row['tok_s'] / gen['tok_s']:.2f} | {row['first_call_s']:.1f}, {gen['first_call_s']:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- RL step split
WALL_KEY = "time/wall_this_process"  # cumulative seconds since the process started (not a phase)


def rl_step_split(metrics: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{phase: {"median_s", "share", "steps"}} over the steps' `time/<phase>` entries (rows without them are
    skipped). With the controller's cumulative `time/wall_this_process`, each step's wall time is the difference
    to the previous row, and "other" is what the phases leave of it (evaluation, checkpoints, logging); share is
    then of the summed step wall time, else of the phases' total."""
    per_phase: dict[str, list[float]] = {}
    previous_wall: float | None = None
    for row in metrics:
        phases = {k.removeprefix("time/"): float(v) for k, v in row.items()
                  if k.startswith("time/") and k != WALL_KEY and isinstance(v, int | float)}
        if not phases:
            continue
        for phase, value in phases.items():
            per_phase.setdefault(phase, []).append(value)
        wall = row.get(WALL_KEY)
        if isinstance(wall, int | float):
            step_s = wall - previous_wall if previous_wall is not None else float(wall)
            previous_wall = float(wall)
            per_phase.setdefault("other", []).append(max(0.0, step_s - sum(phases.values())))
    total = sum(sum(v) for v in per_phase.values()) or 1.0
    return {phase: {"median_s": statistics.median(v), "share": sum(v) / total, "steps": len(v)}
            for phase, v in per_phase.items()}


def split_table(split: dict[str, dict[str, float]]) -> str:
    lines = ["| phase | median s/step | share of the step |", "|---|---:|---:|"]
    for phase, s in split.items():
        lines.append(f"| {phase} | {s['median_s']:.3f} | {s['share']:.0%} |")
    return "\n".join(lines)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="A", help="bench/common.py config (default A)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off", "on"])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="batches 1 8, compile off, 16 new tokens, 1 round")
    ap.add_argument("--metrics", type=Path, help="summarise the RL step split of a run's metrics.jsonl instead")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.metrics is not None:
        if not args.metrics.is_file():
            ap.error(f"{args.metrics} does not exist (an `openk2 rl` run writes <run>/rl/metrics.jsonl)")
        split = rl_step_split(read_metrics(args.metrics))
        if not split:
            ap.error(f"{args.metrics} has no time/<phase> entries")
        print(split_table(split))
        return
    import torch

    from openk2.model import build_model
    from openk2.model.decode import compile_enabled

    sys.path.insert(0, str(Path(__file__).parent))
    from common import bench_config, machine_info

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batches, args.compile, args.new_tokens, args.rounds = [1, 8], ["off"], 16, 1
    compiles = [c == "on" for c in args.compile]
    if True in compiles and not compile_enabled(True):
        print("compile is unavailable here (see openk2.model.decode); measuring eager only")
        compiles = [False]
    cfg = bench_config(args.config)
    model = build_model(cfg, seed=0).eval()
    print(f"# RL rollout, config {args.config}: {machine_info()}")
    result = bench_rollout(model, args.batches, compiles, args.prompt_len, args.new_tokens, args.rounds)
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per sequence, T = 1, medians of "
          f"{args.rounds} interleaved rounds")
    print(rollout_table(result))
    if "compiled_graphs" in result:
        print(f"compiled decode graphs: {result['compiled_graphs']} ({result['compile_s']:.0f} s compiling in all), "
              f"eager fallbacks: {result['eager_fallbacks']} steps")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "config": args.config, **result}, indent=1))


if __name__ == "__main__":
    main()
