"""One arm of the SFT stage's ablation (docs/experiments.md, "SFT stage: looking for the gain"): the stage's own
functions (`sft_records`, `sft_config` with `SFT_OVERRIDES` + the arm's overrides, `run_sft`, `evaluate_model`) on a
copy of a finished pretraining run, with single-thread CPU seconds per phase (wall time means little on shared
cores) and `world-agent` success at every kept checkpoint.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/sft_stage_ablation.py y100 --base /tmp/nano --n-train 1920 \\
        train.max_steps=100 train.batch_size=4 train.lr=1e-2 train.keep_last=2

Writes <out>/<name>/result.json and episodes.json (the final checkpoint's transcripts).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--base", required=True, help="a finished pretraining run directory (it is not modified)")
    p.add_argument("--out", default="/tmp/sft_ablation")
    p.add_argument("--n-train", type=int, default=1920, help="requests in the SFT data")
    p.add_argument("--registry-worlds", type=int, default=4)
    p.add_argument("--tasks-per-dialog", type=int, default=2)
    p.add_argument("--own-fraction", type=float, default=0.25)
    p.add_argument("--n-eval", type=int, default=40)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--before", action="store_true", help="also evaluate the pretrained model")
    p.add_argument("overrides", nargs="*", help="SFT config overrides after the stage's own (key=value)")
    a = p.parse_intermixed_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from openk2.agentic.world_sft import sft_records
    from openk2.data.world import World
    from openk2.eval.benchmarks.world_agent import evaluate_model
    from openk2.train.metrics import read_metrics
    from openk2.train.sft import run_sft, sft_config
    from openk2.train.sft_stage import SFT_OVERRIDES, write_jsonl

    base, run = Path(a.base), Path(a.out) / a.name
    shutil.rmtree(run, ignore_errors=True)
    out: dict = {"args": vars(a)}

    def evaluate(model_dir: Path) -> dict:
        t0, c0 = time.perf_counter(), cpu_s()
        r = evaluate_model(model_dir, n=a.n_eval, seed=a.eval_seed, concurrency=a.n_eval)
        return {"success": r["success"], "by_kind": r["by_kind"], "made_tool_calls": r["made_tool_calls"],
                "wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0, "episodes": r["episodes"]}

    t0, c0 = time.perf_counter(), cpu_s()
    records = sft_records(World.generate(seed=0, n_people=100), a.n_train, registry_worlds=a.registry_worlds,
                          tasks_per_dialog=a.tasks_per_dialog, own_fraction=a.own_fraction)
    write_jsonl(run / "data" / "train.jsonl", records)
    out["synthesis"] = {"dialogs": len(records), "wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0}
    if a.before:
        out["before"] = {k: v for k, v in evaluate(base).items() if k != "episodes"}
    t0, c0 = time.perf_counter(), cpu_s()
    cfg = sft_config(base, [run / "data" / "train.jsonl"], run_dir=run / "sft",
                     overrides=[*SFT_OVERRIDES, "run.progress=false", *a.overrides])
    last = run_sft(cfg)
    out["sft"] = {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0, "loss": last.get("loss"),
                  "data": last["data"]["train"],
                  "val_loss": [(r["step"], r["val_loss"]) for r in read_metrics(run / "sft" / "metrics.jsonl")
                               if "val_loss" in r]}
    checkpoints = sorted((run / "sft" / "checkpoints").glob("step_*"))
    for ck in checkpoints[:-1]:  # an earlier checkpoint: a run directory that holds only it
        d = run / f"at_{ck.name}"
        (d / "checkpoints").mkdir(parents=True, exist_ok=True)
        os.symlink(ck, d / "checkpoints" / ck.name)
        os.symlink(run / "sft" / "tokenizer", d / "tokenizer")
        shutil.copy(run / "sft" / "train_config.json", d / "train_config.json")
        out[f"after_{ck.name}"] = {k: v for k, v in evaluate(d).items() if k != "episodes"}
    final = evaluate(run / "sft")
    (run / "episodes.json").write_text(json.dumps(final.pop("episodes"), indent=1, default=str))
    out["after"] = final
    (run / "result.json").write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
