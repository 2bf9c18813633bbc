"""One arm of the SFT stage's ablation (docs/experiments.md, "SFT stage: looking for the gain"): the stage's own
functions (`stage_records`, `sft_config` with `SFT_OVERRIDES` + the arm's overrides, `run_sft`, `evaluate_model`)
on a copy of a finished pretraining run, with single-thread CPU seconds per phase (wall time means little on shared
cores), `world-agent` success at every kept checkpoint and, with `--facts`, greedy pass@1 on the RL stage's
held-out `facts` questions (the `world-facts` benchmark's tasks and scorer) after SFT.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/sft_stage_ablation.py y100 --base /tmp/nano --n-train 1920 \\
        train.max_steps=100 train.batch_size=4 train.lr=1e-2 train.keep_last=2

`--warm-start` mixes in the RL stage's facts warm-start records as the speedrun does (`--extra-repeats` times);
`--ptx N` adds N pretraining documents as plain text, `--copy-docs N` N copy documents
(`openk2.data.copy_text`). Writes <out>/<name>/result.json and episodes.json (the final
checkpoint's transcripts).
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


def facts_heldout(model_dir: Path, world_dir: Path, batch: int = 64) -> dict:
    """Greedy pass@1 on every held-out `facts` task of the run's world, as `openk2 eval --bench world-facts`."""
    import asyncio
    from collections import defaultdict

    from openk2.eval.benchmarks.world import resolve_world
    from openk2.llm import LLMClient
    from openk2.llm.local import LocalBackend
    from openk2.rl.envs.facts import fact_reward, fact_tasks

    src = resolve_world(world_dir, None)
    tasks = fact_tasks(src.world, src.qa_fraction, "heldout")

    async def run_all() -> list[str]:
        backend = LocalBackend.from_model_dir(model_dir, max_batch=batch, compile=False)
        client = LLMClient(backend, model=backend.model_name)
        try:
            replies = await asyncio.gather(*(client.chat(t.messages(), temperature=0.0, max_tokens=16) for t in tasks))
        finally:
            await client.aclose()
        return [str(r.message.get("content") or "") for r in replies]

    texts = asyncio.run(run_all())
    by_kind: dict[str, list[float]] = defaultdict(list)
    for t, text in zip(tasks, texts, strict=True):
        by_kind[t.attribute].append(fact_reward(src.world, t, text))
    scores = [v for vs in by_kind.values() for v in vs]
    return {"n": len(scores), "pass@1": sum(scores) / len(scores),
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "examples": [(t.question, t.answer, x) for t, x in list(zip(tasks, texts, strict=True))[:6]]}


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
    p.add_argument("--warm-start", action="store_true", help="mix in the RL stage's facts warm start (as speedrun)")
    p.add_argument("--extra-repeats", type=int, default=None, help="copies of the warm start (default: the stage's)")
    p.add_argument("--facts-per-question", action="store_true",
                   help="the warm start as one record per question (the stage's default: one per person)")
    p.add_argument("--ptx", type=int, default=None, help="pretraining documents as PTX text (default: the stage's)")
    p.add_argument("--copy-docs", type=int, default=0,
                   help="copy documents (openk2.data.copy_text) mixed in as plain text, trained on every token")
    p.add_argument("--facts", action="store_true", help="evaluate facts held-out pass@1 (greedy) after SFT")
    p.add_argument("overrides", nargs="*", help="SFT config overrides after the stage's own (key=value)")
    a = p.parse_intermixed_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from openk2.eval.benchmarks.world_agent import evaluate_model
    from openk2.train import sft_stage
    from openk2.train.metrics import read_metrics
    from openk2.train.rl_stage import warm_start_records
    from openk2.train.sft import run_sft, sft_config

    base, run = Path(a.base), Path(a.out) / a.name
    shutil.rmtree(run, ignore_errors=True)
    out: dict = {"args": vars(a)}

    def evaluate(model_dir: Path) -> dict:
        t0, c0 = time.perf_counter(), cpu_s()
        r = evaluate_model(model_dir, n=a.n_eval, seed=a.eval_seed, concurrency=a.n_eval)
        return {"success": r["success"], "by_kind": r["by_kind"], "made_tool_calls": r["made_tool_calls"],
                "wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0, "episodes": r["episodes"]}

    t0, c0 = time.perf_counter(), cpu_s()
    extra = warm_start_records(0, 100, 0.5, per_person=not a.facts_per_question) if a.warm_start else []
    dialogs, records = sft_stage.stage_records(
        base, n_train=a.n_train, registry_worlds=a.registry_worlds, tasks_per_dialog=a.tasks_per_dialog,
        extra_records=extra, extra_repeats=sft_stage.EXTRA_REPEATS if a.extra_repeats is None else a.extra_repeats,
        ptx_documents=sft_stage.N_PTX_DOCUMENTS if a.ptx is None else a.ptx, own_fraction=a.own_fraction)
    if a.copy_docs:
        from openk2.data.copy_text import copy_documents
        from openk2.data.world import World

        people = {p.name for p in World.generate(seed=0, n_people=100).people}
        records += [{"text": t, "metadata": {"source": "copy_text"}} for t in copy_documents(a.copy_docs,
                                                                                             exclude=people)]
    sft_stage.write_jsonl(run / "data" / "train.jsonl", records)
    out["synthesis"] = {"dialogs": len(dialogs), "records": len(records), "wall_s": time.perf_counter() - t0,
                        "cpu_s": cpu_s() - c0}
    if a.before:
        out["before"] = {k: v for k, v in evaluate(base).items() if k != "episodes"}
    t0, c0 = time.perf_counter(), cpu_s()
    cfg = sft_config(base, [run / "data" / "train.jsonl"], run_dir=run / "sft",
                     overrides=[*sft_stage.SFT_OVERRIDES, "run.progress=false", *a.overrides])
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
    if a.facts:
        t0, c0 = time.perf_counter(), cpu_s()
        facts = facts_heldout(run / "sft", base)
        out["facts_after"] = {**facts, "wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0}
    (run / "result.json").write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
