"""The speedrun's SFT stage: world-domain trajectories -> SFT of the pretrained model -> `world-agent` before/after.

    result = sft_stage(run_dir="runs/nano", world_seed=0, world_people=100)

1. Synthesis: `n_train` requests, `tasks_per_dialog` per dialog, solved by the programmatic expert against the real
   tools with a scripted user (`openk2.agentic.world_sft.sft_records`): a quarter about the pretraining world's
   training people, the rest about the people of `registry_worlds` other generated worlds (so the model learns to
   copy names rather than memorise ~90 of them); plus `extra_records` (the RL stage's facts warm start) repeated
   `extra_repeats` times and `ptx_documents` pretraining documents as plain text (`ptx_records`: K2's PTX loss, so
   SFT keeps what pretraining stored), written as chat JSONL to `<run>/sft/data/`. The expert dialogs are written
   copy-friendly (`openk2.agentic.world_sft.copy_friendly`: every name or value the model must copy has the same
   tokens where it is copied from and where it is written).
2. SFT: `recipes/sft-nano.toml` settings (built in as `SFT_OVERRIDES`) from the pretraining run's latest checkpoint
   into `<run>/sft`, a run directory that `openk2 eval --model`, `openk2 serve` and `load_model_dir` accept.
3. Evaluation: the `world-agent` benchmark's episodes on `n_eval` held-out tasks (people in no pretraining document
   and in no SFT trajectory), in process, greedy, for the pretrained model and for the SFT model.

Results go to `<run>/sft_stage.json` and a plot `<run>/sft_stage.png`; `speedrun.write_report` adds a section.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

#: Requests in the SFT data, extra registry worlds, requests per dialog (see `openk2.agentic.world_sft`).
N_TRAIN_TASKS, REGISTRY_WORLDS, TASKS_PER_DIALOG = 1920, 4, 2
#: The stage's SFT settings (the same as recipes/sft-nano.toml, which documents them). With the chat-aware
#: tokenizer (`data.tokenizer_chat_dialogs`) a two-request dialog is ~480 tokens, so rows of 512; YaRN (factor 2
#: over pretraining's 256 positions) because a world-agent prompt puts the request at positions ~260-450. 108 steps
#: (was 72): 72 learnt the tool-call format from one pretrained model (tool calls in 82.5% of episodes) and not from
#: another that differs only in rounding (7.5%); 108 did from both (77.5-80%) in less time than 72 took before
#: training's dense products moved to oneDNN (docs/experiments.md, "SFT steps: 72 was at the edge").
SFT_OVERRIDES = [
    "train.max_steps=108", "train.batch_size=8", "train.seq_len=512", "train.lr=1e-2", "train.warmup_steps=3",
    "train.decay_fraction=0.5", "train.eval_every=54", "train.eval_batches=2", "train.checkpoint_every=54",
    "train.keep_last=1", "run.tensorboard=false",
    "init.rope_scaling={type='yarn', factor=2.0, original_max_position_embeddings=256}",
]
#: Knowledge kept through SFT: 600 pretraining documents mixed in as PTX text (~41k tokens) and the RL stage's facts
#: warm start (`extra_records`: 270 chat Q/A about the Q/A-document people, one 6-question record per person) 8 times
#: (~56k tokens, 7.9k trained answer tokens): ~18% of the SFT data's tokens, at the same SFT compute. One record per
#: question 4 times (the same tokens, half the answers) kept the held-out facts in chat form in some data orders
#: (71%) and not in others (15-16%); per person x8 in every order measured (docs/experiments.md, "SFT stage:
#: held-out facts ...").
N_PTX_DOCUMENTS, EXTRA_REPEATS = 600, 8


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def ptx_records(run_dir: str | Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` of the pretraining run's training documents (drawn without replacement with `seed`) as `{"text": ...}`
    SFT records: trained on every token, as K2's PTX loss. The documents are the run's own training sources, rebuilt
    from its `train_config.json` by `openk2.train.data_setup.build_sources` (the embedded world corpus only)."""
    from openk2.data.sources import iter_documents
    from openk2.train.config import TrainConfig
    from openk2.train.data_setup import build_sources

    cfg = TrainConfig.from_dict(json.loads((Path(run_dir) / "train_config.json").read_text()))
    sources, world = build_sources(cfg)
    if world is None:
        raise ValueError(f"{run_dir}: PTX records need a run on the embedded world corpus (data.sources = []); "
                         "pass ptx_documents=0 for other runs")
    docs = [d for src in sources if src.split != "val" for d in iter_documents(src)]
    return [{"text": d, "metadata": {"source": "ptx"}} for d in random.Random(seed).sample(docs, min(n, len(docs)))]


def stage_records(run_dir: str | Path, *, world_seed: int = 0, world_people: int = 100, n_train: int = N_TRAIN_TASKS,
                  registry_worlds: int = REGISTRY_WORLDS, tasks_per_dialog: int = TASKS_PER_DIALOG,
                  extra_records: list[dict[str, Any]] = (), extra_repeats: int = EXTRA_REPEATS,
                  ptx_documents: int = N_PTX_DOCUMENTS, own_fraction: float = 0.25
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(world-domain expert dialogs, all SFT records): the dialogs (`own_fraction` of the requests about the
    pretraining world's training people, `sft_records`), `extra_records` x `extra_repeats` and `ptx_documents` PTX
    records (the SFT loader shuffles them together)."""
    from openk2.agentic.world_sft import sft_records
    from openk2.data.world import World

    world = World.generate(seed=world_seed, n_people=world_people)
    dialogs = sft_records(world, n_train, registry_worlds=registry_worlds, tasks_per_dialog=tasks_per_dialog,
                          own_fraction=own_fraction, seed=0)
    ptx = ptx_records(run_dir, ptx_documents) if ptx_documents else []
    return dialogs, [*dialogs, *list(extra_records) * extra_repeats, *ptx]


def sft_stage(run_dir: str | Path, *, world_seed: int = 0, world_people: int = 100, n_train: int = N_TRAIN_TASKS,
              n_eval: int = 40, eval_seed: int = 0, overrides: list[str] = (), progress: bool = True,
              log: Any = print, registry_worlds: int = REGISTRY_WORLDS, tasks_per_dialog: int = TASKS_PER_DIALOG,
              extra_records: list[dict[str, Any]] = (), extra_repeats: int = EXTRA_REPEATS,
              ptx_documents: int = N_PTX_DOCUMENTS) -> dict[str, Any]:
    """`extra_records`: more chat records mixed into the SFT data (the RL stage's warm-start examples), repeated
    `extra_repeats` times; `ptx_documents`: pretraining documents mixed in as plain text (`ptx_records`)."""
    from openk2.eval.benchmarks.world_agent import evaluate_model
    from openk2.train.sft import run_sft, sft_config

    run_dir = Path(run_dir)
    sft_dir = run_dir / "sft"
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    data_dir = sft_dir / "data"
    records, everything = stage_records(run_dir, world_seed=world_seed, world_people=world_people, n_train=n_train,
                                        registry_worlds=registry_worlds, tasks_per_dialog=tasks_per_dialog,
                                        extra_records=extra_records, extra_repeats=extra_repeats,
                                        ptx_documents=ptx_documents)
    write_jsonl(data_dir / "train.jsonl", everything)
    timings["synthesis"] = time.perf_counter() - t0
    n_tasks = sum(len(r["metadata"]["tasks"]) for r in records)
    log(f"sft stage: {len(records)} expert dialogs ({n_tasks} requests), {len(everything) - len(records)} other "
        f"records -> {data_dir / 'train.jsonl'}")

    def evaluate(model_dir: Path) -> dict[str, Any]:
        # All episodes in one decode batch: 1/3 less CPU than batches of 16 (24.5 -> 16.6 CPU-s for the base model)
        return evaluate_model(model_dir, n=n_eval, seed=eval_seed, world_seed=world_seed, world_people=world_people,
                              concurrency=min(n_eval, 64))

    t0 = time.perf_counter()
    before = evaluate(run_dir)
    timings["world-agent eval, pretrained"] = time.perf_counter() - t0
    log(f"sft stage: world-agent before SFT {before['success']:.1%} (tool calls in {before['made_tool_calls']:.0%})")

    t0 = time.perf_counter()
    cfg = sft_config(run_dir, [data_dir / "train.jsonl"], run_dir=sft_dir,
                     overrides=[*SFT_OVERRIDES, f"run.progress={'true' if progress else 'false'}", *overrides])
    last = run_sft(cfg)
    timings["sft"] = time.perf_counter() - t0
    log(f"sft stage: SFT to step {last['step']}, train loss {last.get('loss', float('nan')):.3f}")

    t0 = time.perf_counter()
    after = evaluate(sft_dir)
    timings["world-agent eval, SFT"] = time.perf_counter() - t0
    log(f"sft stage: world-agent after SFT {after['success']:.1%}")

    from openk2.train.metrics import read_metrics

    rows = read_metrics(sft_dir / "metrics.jsonl")
    result = {
        "n_train_trajectories": len(records), "n_train_tasks": n_tasks, "registry_worlds": registry_worlds,
        "tasks_per_dialog": tasks_per_dialog, "n_eval_tasks": n_eval, "eval_seed": eval_seed,
        "n_extra_records": len(extra_records) * extra_repeats,
        "n_ptx_documents": len(everything) - len(records) - len(extra_records) * extra_repeats,
        "before": {k: v for k, v in before.items() if k != "episodes"},
        "after": {k: v for k, v in after.items() if k != "episodes"},
        "sft": {"steps": last["step"], "final_loss": last.get("loss"), "data": last.get("data", {}),
                "val_loss": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]},
        "timings_s": timings, "total_s": sum(timings.values()),
        "examples_after": [{k: e[k] for k in ("id", "kind", "score", "final_answer")} for e in after["episodes"][:8]],
    }
    (run_dir / "sft_stage.json").write_text(json.dumps(result, indent=2, default=str))
    (sft_dir / "eval_episodes.json").write_text(json.dumps({"before": before["episodes"], "after": after["episodes"]},
                                                           indent=1, default=str))
    result["plot"] = write_plot(run_dir, result, rows)
    return result


def write_plot(run_dir: Path, result: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    kinds = sorted(set(result["before"]["by_kind"]) | set(result["after"]["by_kind"]))
    labels = ["all", *kinds]
    b = [result["before"]["success"], *(result["before"]["by_kind"].get(k, 0) for k in kinds)]
    a = [result["after"]["success"], *(result["after"]["by_kind"].get(k, 0) for k in kinds)]
    x = range(len(labels))
    axes[0].bar([i - 0.2 for i in x], [100 * v for v in b], width=0.4, label="pretrained")
    axes[0].bar([i + 0.2 for i in x], [100 * v for v in a], width=0.4, label="after SFT")
    axes[0].set_xticks(list(x), labels, rotation=20)
    axes[0].set(title=f"world-agent success, {result['n_eval_tasks']} held-out tasks (%)", ylim=(0, 100))
    axes[0].legend()
    if rows:
        axes[1].plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train (assistant tokens)", lw=0.8)
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if val:
            axes[1].plot(*zip(*val, strict=True), "o-", label="held-out conversations")
        axes[1].set(title="SFT loss (nats/token)", xlabel="step", yscale="log")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(run_dir / "sft_stage.png", dpi=110)
    plt.close(fig)
    return "sft_stage.png"


def report_lines(result: dict[str, Any]) -> list[str]:
    """The report section of the stage (markdown lines)."""
    b, a = result["before"], result["after"]
    lines = ["", "## SFT stage: world-domain tool use", "",
             f"{result['n_train_trajectories']} expert dialogs of {result.get('tasks_per_dialog', 1)} requests each "
             f"(scripted user, programmatic expert, real tools) about people of the pretraining world and of "
             f"{result.get('registry_worlds', 0)} other generated worlds (copy-friendly: names and values copied as "
             f"the same tokens), plus {result.get('n_extra_records', 0)} chat Q/A records about the pretraining "
             f"world's Q/A people and {result.get('n_ptx_documents', 0)} pretraining documents as plain text (PTX); "
             f"SFT {result['sft']['steps']} steps; "
             f"`world-agent` on {result['n_eval_tasks']} held-out tasks about people in no document "
             f"(seed {result['eval_seed']}).", "",
             "| | pretrained | after SFT |", "|---|---:|---:|",
             f"| world-agent success | {b['success']:.1%} | {a['success']:.1%} |",
             f"| episodes with a tool call | {b['made_tool_calls']:.0%} | {a['made_tool_calls']:.0%} |"]
    for k in sorted(set(b["by_kind"]) | set(a["by_kind"])):
        lines.append(f"| success, {k} | {b['by_kind'].get(k, 0):.0%} | {a['by_kind'].get(k, 0):.0%} |")
    lines += ["", f"![sft stage]({result.get('plot', 'sft_stage.png')})", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["timings_s"].items()]
    return lines


__all__ = ["SFT_OVERRIDES", "ptx_records", "report_lines", "sft_stage", "stage_records", "write_jsonl"]
