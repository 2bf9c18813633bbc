"""The speedrun's RL stage: the SFT model -> `openk2 rl` (the K1.5/K2 loss on verifiable tasks) -> held-out
greedy pass@1 before and after, with the reward curve.

    result = rl_stage(run_dir="runs/nano")      # <run>/sft -> <run>/rl (a run directory eval/serve accept)

Training tasks are the procedural `digits` family (the SFT stage adds its warm-start examples: `warm_start_records`);
evaluation covers the digits held-out split and the world tool domain's held-out tasks (`world-agent`'s tasks).
Settings are `recipes/rl-nano.toml`'s with the stage's shorter budget (`RL_OVERRIDES`). Results go to
`<run>/rl_stage.json` and `<run>/rl_stage.png`; `speedrun.write_report` adds a section (`report_lines`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

#: The stage's settings on top of openk2.rl.config's defaults (recipes/rl-nano.toml documents each knob).
#: recipes/rl-nano.toml's settings, but 12 steps instead of 50, to keep the stage near its ~3-minute budget on an
#: idle 2-core machine (~7.6 s per step plus two evaluations): too few for a gain (docs/experiments.md, "RL on the
#: nano model": +17.5 points needed ~50 steps).
RL_OVERRIDES = [
    "train.steps=12", "rollout.group_size=8", "rollout.prompts_per_step=16", "rollout.temperature=1.0",
    "rollout.temperature_min=0.7", "rollout.temperature_decay_steps=40", "train.lr=5e-5", "train.optimizer='adamw'",
    "train.loss='kimi_k15'", "train.tau=0.05", "eval.every=0", "eval.n_heldout={default = 200, world = 20}",
    "eval.families=['digits', 'world']", "run.checkpoint_every=6", "run.threads=1", "run.tensorboard=false",
    "sampler.curriculum=false", "tasks.digits_partial_credit=true", "tasks.digits_kinds=['reverse', 'sort']",
    "train.minibatches=4",
]
#: Digits SFT examples the SFT stage mixes in, so RL starts from a policy that sometimes succeeds (rl-design §7).
N_WARM_START = 3000


def warm_start_records(n: int = N_WARM_START, seed: int = 0) -> list[dict[str, Any]]:
    from openk2.rl.envs.procedural import sft_records

    return sft_records(n, seed=seed)


def rl_stage(run_dir: str | Path, *, overrides: list[str] = (), progress: bool = True, log: Any = print
             ) -> dict[str, Any]:
    from openk2.rl.config import load_rl_config
    from openk2.rl.controller import run_rl
    from openk2.train.metrics import read_metrics

    run_dir = Path(run_dir)
    rl_dir = run_dir / "rl"
    cfg = load_rl_config(None, [f"run.init={json.dumps(str(run_dir / 'sft'))}", f"run.dir={json.dumps(str(rl_dir))}",
                                *RL_OVERRIDES, f"run.progress={'true' if progress else 'false'}", *overrides])
    t0 = time.perf_counter()
    summary = run_rl(cfg, log=log)
    wall = time.perf_counter() - t0
    rows = read_metrics(rl_dir / "metrics.jsonl")
    evals = [json.loads(line) for line in (rl_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    timings: dict[str, float] = {}
    for key in ("time/rollout", "time/reward", "time/update", "time/sync"):
        timings[key.removeprefix("time/")] = sum(r.get(key, 0.0) for r in rows)
    result = {
        "steps": summary["steps"], "loss": cfg.train.loss, "group_size": cfg.rollout.group_size,
        "prompts_per_step": cfg.rollout.prompts_per_step,
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
    axes[1].set_xticks(list(x), labels, rotation=30, fontsize=7)
    axes[1].set(title="held-out greedy pass@1 (%)", ylim=(0, 100))
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(run_dir / "rl_stage.png", dpi=110)
    plt.close(fig)
    return "rl_stage.png"


def report_lines(result: dict[str, Any]) -> list[str]:
    b, a = result["before"], result["after"]
    lines = ["", "## RL stage: verifiable rewards", "",
             f"{result['steps']} RL steps of `{result['loss']}` (K = {result['group_size']} samples for each of "
             f"{result['prompts_per_step']} prompts per step) on the procedural digits tasks, from the SFT model; "
             "greedy pass@1 on held-out tasks (`openk2 eval --model <run>/rl --bench digits` scores the same way on "
             "all three digits kinds, add included).", "",
             "| held-out tasks | after SFT | after RL |", "|---|---:|---:|"]
    for k in sorted(b, key=lambda k: (k.split("/")[1], k.count("/"), k)):  # each family's total, then its kinds
        lines.append(f"| {k.removeprefix('eval/').removesuffix('/pass@1')} | {b[k]:.1%} | {a.get(k, 0):.1%} |")
    lines += ["", f"![rl stage]({result.get('plot', 'rl_stage.png')})", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["timings_s"].items()]
    lines.append(f"| total (with evaluations) | {result['total_s']:.1f} |")
    return lines


__all__ = ["N_WARM_START", "RL_OVERRIDES", "report_lines", "rl_stage", "warm_start_records"]
