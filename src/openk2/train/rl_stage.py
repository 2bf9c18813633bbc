"""The speedrun's RL stage: the SFT model -> `openk2 rl` (RL with verifiable rewards, `grpo` loss) -> held-out
greedy pass@1 before and after, with the reward curve.

    result = rl_stage(run_dir="runs/nano")      # <run>/sft -> <run>/rl (a run directory eval/serve accept)

Training tasks are the `facts_paraphrase` questions about the pretraining world's Q/A-document people
(`openk2.rl.envs.facts`: chat questions, no tools, in words that no document or SFT record uses; the SFT model knows
the facts in the documents' wording but mostly misreads these questions); evaluation is greedy pass@1 on the held-out
people's `facts_paraphrase` and `facts` questions (people whose facts pretraining stated in biographies only and whose
questions no document, SFT record or RL task holds; `facts` is `world-facts`) and on 60 held-out world tool-domain
tasks (`world-agent`'s tasks and scoring: the SFT stage's 40 tasks and the next 80 of the same draw), which RL does
not train on: they show whether RL keeps the SFT stage's knowledge and tool use. Against forgetting, each optimizer
step adds K2's PTX loss: the LM loss on a 512-token row of the SFT stage's own training data
(`<run>/sft/data/train.jsonl`: its world-domain dialogs with their refusals, the facts answers and the pretraining
documents), without which RL on these chat answers costs the SFT model about half its world refusals.
Settings are `recipes/rl-nano.toml`'s with the stage's shorter budget (`RL_OVERRIDES`). Results go to
`<run>/rl_stage.json` and `<run>/rl_stage.png`; `speedrun.write_report` adds a section (`report_lines`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

#: The stage's settings on top of openk2.rl.config's defaults (recipes/rl-nano.toml documents each knob): the
#: recipe's `facts_paraphrase` run, shortened to 30 steps. Training tasks are the facts questions about the
#: Q/A-document people in other words (a wrong answer of the right kind earns 0.25): from the demo's SFT model at
#: 567cf6c, 18% of samples right and 25% of groups mixed, held-out greedy 16.7% against 72.6% for the documents'
#: wording, so there is room; `facts` itself (85% of samples right, held-out 72.6%) has little. Groups whose K
#: samples all score alike are left out of the update. `grpo`: `kimi_k15` was as good at equal rollouts on this
#: family (one seed better, one worse). Evaluation: greedy pass@1 on all held-out `facts_paraphrase` and `facts`
#: questions and on 120 held-out world tasks (19 refusals; 60 tasks had 9, too few to see a drop), not trained: the
#: world tasks other than refusals need names copied from the request, which RL cannot find in ~1% of samples.
#: PTX (K2's guard against forgetting): each of the 4 optimizer steps per RL step adds 1.0 x the LM loss on one
#: 512-token row of the SFT stage's own training data (`ptx_overrides`). From the demo's SFT model at 567cf6c
#: (docs/experiments.md, "RL that keeps what SFT taught"): without PTX facts_paraphrase 16.7% -> 32.2% (270
#: questions) but world 12.5% -> 6.7% (refusals 15 -> 8 of 19) and facts 72.6% -> 71.1%; with it at seeds 0 / 1 / 2
#: facts_paraphrase +21.5 / +13.0 / +13.7 points (mean +16.1), facts +5.2 / +1.5 / +2.2, world 12.5% -> 12.5 / 15.8 /
#: 16.7% (refusals kept), 224-248 CPU-s at one thread. Two PTX rows per step: +23.7 / +16.7 at ~+40 CPU-s; world
#: refusal tasks in the mix instead: refusals kept but +12.6 at twice the cost.
RL_OVERRIDES = [
    "train.steps=30", "rollout.group_size=8", "rollout.prompts_per_step=16", "rollout.temperature=1.0",
    "rollout.temperature_min=0.7", "rollout.temperature_decay_steps=40", "train.lr=2e-4", "train.optimizer='adamw'",
    "train.loss='grpo'", "train.advantage='grpo'", "train.tau=0.05", "eval.every=0",
    "train.ptx_coef=1.0", "train.ptx_batch=1", "train.ptx_seq_len=512",
    "eval.n_heldout={default = 200, facts = 1000, facts_paraphrase = 1000, world = 120}",
    "tasks.mix={facts_paraphrase = 1.0}", "tasks.facts_partial_credit=true",
    "eval.families=['facts_paraphrase', 'facts', 'world']",
    "rollout.max_new_tokens={facts = 16, facts_paraphrase = 16, world = 128}", "train.drop_zero_advantage_groups=true",
    "run.checkpoint_every=10", "run.threads=1", "run.tensorboard=false", "sampler.curriculum=false",
    "train.minibatches=4",
]
#: Facts SFT examples the SFT stage mixes in (every train-split question, 270 questions in one multi-turn record
#: per person, repeated `sft_stage.EXTRA_REPEATS` times): they teach the chat answer format on the train people,
#: and keep the knowledge in chat form that the RL stage's `facts` evaluation measures.
N_WARM_START: int | None = None


def warm_start_records(world_seed: int = 0, world_people: int = 100, qa_fraction: float = 0.5,
                       n: int | None = N_WARM_START, seed: int = 0, per_person: bool = True
                       ) -> list[dict[str, Any]]:
    """The RL stage's warm-start SFT records for the world of `openk2.data.world.World.generate(world_seed,
    world_people)` pretrained with Q/A documents for `qa_fraction` of its people (the speedrun's data.world_*);
    `per_person` (the default): one multi-turn record per person holding all its questions, else one record per
    question (`openk2.rl.envs.facts.sft_records`; docs/experiments.md, "SFT stage: held-out facts ...")."""
    from openk2.data.world import World
    from openk2.rl.envs.facts import sft_records

    return sft_records(World.generate(seed=world_seed, n_people=world_people), qa_fraction, n, seed=seed,
                       per_person=per_person)


def world_overrides(run_dir: Path) -> list[str]:
    """tasks.world_* overrides naming the world `run_dir` was pretrained on (its train_config.json), if any."""
    path = run_dir / "train_config.json"
    data = json.loads(path.read_text()).get("data", {}) if path.is_file() else {}
    keys = {"world_seed": "world_seed", "world_people": "world_people", "world_qa_fraction": "world_qa_fraction"}
    return [f"tasks.{ours}={json.dumps(data[theirs])}" for theirs, ours in keys.items() if theirs in data]


def ptx_overrides(run_dir: Path) -> list[str]:
    """train.ptx_files naming the SFT stage's own training data (`<run>/sft/data/train.jsonl`: its world-domain
    dialogs, facts answers and pretraining documents) when the SFT stage wrote it; [] otherwise."""
    path = run_dir / "sft" / "data" / "train.jsonl"
    return [f"train.ptx_files={json.dumps([str(path)])}"] if path.is_file() and path.stat().st_size else []


def rl_stage(run_dir: str | Path, *, overrides: list[str] = (), progress: bool = True, log: Any = print
             ) -> dict[str, Any]:
    from openk2.rl.config import RLConfigError, load_rl_config
    from openk2.rl.controller import run_rl
    from openk2.train.metrics import read_metrics

    run_dir = Path(run_dir)
    rl_dir = run_dir / "rl"
    try:
        cfg = load_rl_config(None, [f"run.init={json.dumps(str(run_dir / 'sft'))}",
                                    f"run.dir={json.dumps(str(rl_dir))}", *RL_OVERRIDES, *world_overrides(run_dir),
                                    *ptx_overrides(run_dir), f"run.progress={'true' if progress else 'false'}",
                                    *overrides])
    except RLConfigError as e:
        if "ptx_files" not in str(e):
            raise
        raise RLConfigError(f"{e}: the stage's PTX data is the SFT stage's {run_dir / 'sft' / 'data' / 'train.jsonl'}, "
                            "which is missing or empty; run the SFT stage or pass overrides=['train.ptx_coef=0.0']"
                            ) from None
    t0 = time.perf_counter()
    summary = run_rl(cfg, log=log)
    wall = time.perf_counter() - t0
    rows = read_metrics(rl_dir / "metrics.jsonl")
    evals = [json.loads(line) for line in (rl_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    timings: dict[str, float] = {}
    for key in ("time/rollout", "time/reward", "time/update", "time/sync"):
        timings[key.removeprefix("time/")] = sum(r.get(key, 0.0) for r in rows)
    result = {
        "steps": summary["steps"], "loss": cfg.train.loss, "families": list(cfg.tasks.mix),
        "group_size": cfg.rollout.group_size,
        "ptx": {"coef": cfg.train.ptx_coef, "rows": cfg.train.ptx_batch, "seq_len": cfg.train.ptx_seq_len,
                "files": list(cfg.train.ptx_files)} if cfg.train.ptx_coef > 0 else None,
        "prompts_per_step": cfg.rollout.prompts_per_step,
        "n_heldout": heldout_counts(cfg),
        "before": {k: v for k, v in evals[0].items() if k.startswith("eval/")} if evals else {},
        "after": {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {},
        "evals": evals, "reward_curve": [(r["step"], r["reward/mean"], r["pass_rate"]) for r in rows],
        "timings_s": timings, "total_s": wall,
    }
    (run_dir / "rl_stage.json").write_text(json.dumps(result, indent=2))
    result["plot"] = write_plot(run_dir, result)
    for key, before in result["before"].items():
        if key.count("/") == 2:
            log(f"rl stage: {key.removeprefix('eval/').removesuffix('/pass@1')} held-out greedy pass@1 "
                f"{before:.1%} -> {result['after'].get(key, float('nan')):.1%}")
    return result


def heldout_counts(cfg: Any) -> dict[str, int]:
    """Held-out tasks each evaluation family has (eval.n_heldout caps them: facts' 1000 means all 270 there)."""
    from openk2.rl.envs import make_family

    sizes = cfg.eval.n_heldout
    return {f: len(make_family(f, cfg.tasks, None).heldout_tasks(sizes.get(f, sizes.get("default", 200)),
                                                                 cfg.eval.seed)) for f in cfg.eval.families}


def write_plot(run_dir: Path, result: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    if result["reward_curve"]:
        steps, reward, passed = zip(*result["reward_curve"], strict=True)
        axes[0].plot(steps, reward, label="mean reward (sampled)", lw=0.9)
        axes[0].plot(steps, passed, label="pass rate (sampled)", lw=0.9)
    for key in sorted({k for e in result["evals"] for k in e if k.startswith("eval/") and k.count("/") == 2}):
        pts = [(e["step"], e[key]) for e in result["evals"] if key in e]
        axes[0].plot(*zip(*pts, strict=True), "o--", label=f"held-out greedy pass@1: {key.split('/')[1]}")
    axes[0].set(title=f"RL ({result['loss']}, K={result['group_size']})", xlabel="step", ylim=(-0.05, 1.05))
    axes[0].legend(fontsize=8)
    keys = sorted(k for k in result["before"] if k.count("/") >= 2)
    labels = [k.removeprefix("eval/").removesuffix("/pass@1") for k in keys]
    x = range(len(keys))
    axes[1].bar([i - 0.2 for i in x], [100 * result["before"][k] for k in keys], width=0.4, label="SFT")
    axes[1].bar([i + 0.2 for i in x], [100 * result["after"].get(k, 0) for k in keys], width=0.4, label="after RL")
    axes[1].set_xticks(list(x), labels, rotation=30, fontsize=7, ha="right")  # labels end under their bars
    axes[1].set(title="held-out greedy pass@1 (%)", ylim=(0, 100))
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(run_dir / "rl_stage.png", dpi=110)
    plt.close(fig)
    return "rl_stage.png"


#: What the report says each training family is, and each evaluation family's held-out tasks.
TRAINED_ON = {
    "facts_paraphrase": "the `facts_paraphrase` questions (the `facts` questions about the people whose Q/A documents "
                        "pretraining saw, asked in words no document or SFT record uses: \"When was X born?\"), "
                        "rewarded 1 for the right value and no other value of its kind",
    "facts": "the `facts` questions (chat questions about the pretraining world's people whose Q/A documents "
             "pretraining saw, no tools), rewarded 1 for the right value and no other value of its kind",
    "world": "the world tool domain's tasks (multi-turn episodes on the real tools, about the pretraining world's "
             "training people and registry worlds' people), rewarded 1 when the end state and the final answer are "
             "right (`world-agent`'s check)",
}
HELDOUT = {
    "facts_paraphrase": "`facts_paraphrase` questions about the other people in the documents (no document, SFT "
                        "record or RL task holds a question about them)",
    "facts": "`facts` questions about the other people in the documents, whose questions no document, SFT record or "
             "RL task contains (`openk2 eval --model <run>/rl --bench world-facts` scores the same way)",
    "world": "world tasks about people in no pretraining document, no SFT dialog and no RL task (`--bench "
             "world-agent` scores the same way)",
}


def ptx_sentence(result: dict[str, Any]) -> str:
    """The report's words for the PTX loss (K2's guard against forgetting), '' without one."""
    ptx = result.get("ptx")
    if not ptx:
        return ""
    return (f", plus K2's PTX loss ({ptx['coef']} x the LM loss on {ptx['rows']} row(s) of {ptx['seq_len']} tokens "
            "of the SFT stage's own training data per optimizer step: its tool-use dialogs, facts answers and "
            "pretraining documents) so that RL keeps what SFT taught")


def report_lines(result: dict[str, Any]) -> list[str]:
    b, a = result["before"], result["after"]
    lines = ["", "## RL stage: verifiable rewards", "",
             f"{result['steps']} RL steps of `{result['loss']}` (K = {result['group_size']} samples for each of "
             f"{result['prompts_per_step']} prompts per step) from the SFT model on "
             + " and ".join(TRAINED_ON.get(f, f"`{f}` tasks") for f in result["families"]) + ptx_sentence(result)
             + ". Greedy pass@1 on "
             "held-out tasks: " + "; ".join(HELDOUT.get(f, f"`{f}`") + f" ({n} tasks)"
                                            for f, n in result.get("n_heldout", {}).items()) + ".", "",
             "| held-out tasks | after SFT | after RL |", "|---|---:|---:|"]
    for k in sorted(b, key=lambda k: (k.split("/")[1], k.count("/"), k)):  # each family's total, then its kinds
        lines.append(f"| {k.removeprefix('eval/').removesuffix('/pass@1')} | {b[k]:.1%} | {a.get(k, 0):.1%} |")
    lines += ["", f"![rl stage]({result.get('plot', 'rl_stage.png')})", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["timings_s"].items()]
    lines.append(f"| total (with evaluations) | {result['total_s']:.1f} |")
    return lines


__all__ = ["HELDOUT", "N_WARM_START", "RL_OVERRIDES", "TRAINED_ON", "report_lines", "rl_stage", "warm_start_records"]
