"""`openk2 speedrun`: the whole recipe on a laptop, each stage measured, ending in `runs/<name>/report.md`.

Stages today: world corpus -> tokenizer -> shards -> pretraining with MuonClip (optionally ending in a midtraining
phase of chat rows, `data.midtrain_*`, off by default: `openk2.train.midtrain`) -> evaluation (validation loss
and bits per byte, knowledge probes, samples) -> report with plots -> SFT stage (world-domain tool-use
trajectories -> `openk2 sft` into runs/<name>/sft -> `world-agent` success before and after, `sft_stage.py`)
-> RL stage (`openk2 rl` from the SFT model into runs/<name>/rl -> held-out greedy pass@1 before and after, the
reward curve, `rl_stage.py`). Later stages (benchmarks) append to the same run directory and report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from openk2.eval.benchmarks.world import PROBE_PEOPLE, select_probes
from openk2.model import K2Model, count_params
from openk2.train.config import TrainConfig, load_config
from openk2.train.data_setup import prepare_data
from openk2.train.evaluation import complete, probe_report
from openk2.train.metrics import read_metrics
from openk2.train.trainer import Trainer

#: How the report names the world's validation sources (`data_setup.build_sources`).
VAL_LABELS = {"world": "held-out documents (training styles)", "world-val": "held-out styles (same people)"}


def _val_label(key: str) -> str:
    """'val_loss/world' -> how the report names that validation source."""
    source = key.removeprefix("val_loss/")
    return VAL_LABELS.get(source, source)


PROBE_LABELS = {
    "seen/recall": "recall phrasing, people in the documents",
    "seen/qa": "Q/A phrasing, people in the documents whose questions were never trained on",
    "seen": "all phrasings, people in the documents",
    "unseen": "held-out people (chance level)",
}
PROBE_SHORT_LABELS = {"seen/recall": "recall, seen people", "seen/qa": "Q/A, untrained questions",
                      "unseen": "held-out people (chance)"}


def speedrun(name: str = "nano", config: str | Path | None = None, overrides: list[str] = (),
             sft: bool = True, sft_options: dict[str, Any] | None = None, rl: bool = True,
             rl_options: dict[str, Any] | None = None) -> Path:
    """Run (or resume) every stage into runs/<name>; `sft=False` skips the SFT stage, `sft_options` are keyword
    arguments of `openk2.train.sft_stage.sft_stage` (n_train requests, registry_worlds, tasks_per_dialog, n_eval,
    eval_seed, overrides of the SFT config); `rl=False` skips the RL stage (which needs the SFT stage), `rl_options`
    go to `openk2.train.rl_stage.rl_stage`."""
    cfg = load_config(config, [f"run.dir='runs/{name}'", *overrides])
    run_dir = Path(cfg.run.dir)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    data = prepare_data(cfg)
    timings["data (world, tokenizer, shards)"] = time.perf_counter() - t0

    # Knowledge probes at every validation step, so the report can plot accuracy over training.
    # The same probe set as `openk2 eval --bench world-recall,world-qa,world-unseen` on this run (seed 0).
    probe_set = select_probes(data.world, max_people=PROBE_PEOPLE, qa_fraction=cfg.data.world_qa_fraction) \
        if data.world else []
    reports: dict[int, dict[str, float]] = {}

    def probe_eval(model: K2Model) -> dict[str, float]:
        report = reports[trainer.step] = probe_report(model.eval(), data.tokenizer, probe_set)
        return {f"probe/{k}": report[k] for k in PROBE_LABELS if k in report}

    t0 = time.perf_counter()
    trainer = Trainer(cfg, data, extra_eval=probe_eval if probe_set else None)
    trainer.train()
    timings["pretrain (with periodic validation and probes)"] = time.perf_counter() - t0
    # The last logged step, also when this call resumed a finished run and trained nothing.
    rows = read_metrics(run_dir / "metrics.jsonl")
    last = rows[-1] if rows else {"step": trainer.step}

    t0 = time.perf_counter()
    model, tok = trainer.model.eval(), data.tokenizer
    if last.get("step") == trainer.step and "val_loss" in last:  # validated at the final step already
        final = {k: v for k, v in last.items() if k.startswith("val_")}
    else:
        final = trainer.evaluate()
    probes = reports.get(trainer.step) or (probe_report(model, tok, probe_set) if probe_set else {})
    person = data.world.train_people[0].name if data.world else "The"
    sample_prompts = [f"{person} was born", f"{person} studied", "The company", "Q: Where does"]
    samples = complete(model, tok, sample_prompts, max_new_tokens=40, temperature=0.7)
    timings["evaluation"] = time.perf_counter() - t0

    summary = {"name": name, "config": cfg.to_dict(), "last_step": last, "final_eval": final, "probes": probes,
               "samples": dict(zip(sample_prompts, samples, strict=True)), "timings_s": timings,
               "params": count_params(trainer.model_config).as_dict()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plots = write_plots(run_dir, cfg.train.qk_clip_tau if cfg.train.optimizer == "muonclip" else None)
    write_report(run_dir, cfg, summary, plots)
    if sft and data.world is not None:  # world-domain tool use: synthesis -> SFT -> world-agent before/after
        from openk2.train.rl_stage import warm_start_records
        from openk2.train.sft_stage import report_lines, sft_stage

        del trainer, model
        t0 = time.perf_counter()
        warm_start = warm_start_records(cfg.data.world_seed, cfg.data.world_people, cfg.data.world_qa_fraction) \
            if rl else []
        stage = sft_stage(run_dir, world_seed=cfg.data.world_seed, world_people=cfg.data.world_people,
                          progress=cfg.run.progress, extra_records=warm_start,
                          **(sft_options or {}))
        timings["sft stage (synthesis, SFT, world-agent before/after)"] = time.perf_counter() - t0
        summary["sft_stage"] = {k: v for k, v in stage.items() if k != "examples_after"}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        extra = report_lines(stage)
        write_report(run_dir, cfg, summary, plots, extra=extra)
        if rl:  # RL on verifiable tasks from the SFT model: held-out pass@1 before/after, reward curve
            from openk2.train.rl_stage import report_lines as rl_report_lines
            from openk2.train.rl_stage import rl_stage

            t0 = time.perf_counter()
            rl_result = rl_stage(run_dir, progress=cfg.run.progress, **(rl_options or {}))
            timings["rl stage (rollouts, updates, held-out evaluations)"] = time.perf_counter() - t0
            summary["rl_stage"] = {k: v for k, v in rl_result.items() if k not in ("evals", "reward_curve")}
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            write_report(run_dir, cfg, summary, plots, extra=[*extra, *rl_report_lines(rl_result)])
    print(f"report: {run_dir / 'report.md'}")
    return run_dir / "report.md"


def write_plots(run_dir: Path, qk_clip_tau: float | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        return []
    steps = [r["step"] for r in rows]
    probe_keys = [k for k in PROBE_LABELS if any(f"probe/{k}" in r for r in rows) and k != "seen"]
    fig, axes = plt.subplots(1, 4 if probe_keys else 3, figsize=(20 if probe_keys else 15, 4))
    axes[0].plot(steps, [r["loss"] for r in rows], label="train", lw=0.8)
    val_keys = sorted({k for r in rows for k in r if k.startswith("val_loss/")}) or ["val_loss"]
    for key in val_keys:
        val = [(r["step"], r[key]) for r in rows if key in r]
        axes[0].plot(*zip(*val, strict=True), "o-",
                     label=f"validation: {_val_label(key)}" if "/" in key else "validation")
    # Log scale: the held-out-style validation loss sits an order of magnitude above the training loss.
    axes[0].set(title="loss (nats/token)", xlabel="step", yscale="log")
    axes[0].legend(loc="center right", fontsize=8)
    axes[1].plot(steps, [r["lr"] for r in rows])
    axes[1].set(title="learning rate (WSD)", xlabel="step")
    per_layer = [r.get("max_logit_per_layer") or [] for r in rows]
    for layer in range(max(len(p) for p in per_layer)):
        axes[2].plot(steps, [p[layer] if layer < len(p) else float("nan") for p in per_layer], lw=0.8,
                     label=f"layer {layer}")
    if qk_clip_tau and qk_clip_tau > 0:
        axes[2].axhline(qk_clip_tau, color="gray", ls=":", label=f"QK-Clip tau = {qk_clip_tau:g}")
    axes[2].set(title="max attention logit per layer", xlabel="step")
    axes[2].legend(fontsize=7)
    for key in probe_keys:
        acc = [(r["step"], 100 * r[f"probe/{key}"]) for r in rows if f"probe/{key}" in r]
        axes[3].plot(*zip(*acc, strict=True), "o-", label=PROBE_SHORT_LABELS.get(key, key))
    if probe_keys:
        axes[3].set(title="knowledge probe accuracy (%)", xlabel="step", ylim=(0, 100))
        axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "training.png", dpi=110)
    plt.close(fig)
    return ["training.png"]


def write_report(run_dir: Path, cfg: TrainConfig, s: dict[str, Any], plots: list[str], extra: list[str] = ()
                 ) -> None:
    last, final, probes, params = s["last_step"], s["final_eval"], s["probes"], s["params"]
    lines = [
        f"# openk2 speedrun: {s['name']}", "",
        f"Model `{cfg.model.preset}`: {params['total'] / 1e6:.1f}M parameters, {params['activated'] / 1e6:.1f}M "
        f"activated per token. Optimizer {cfg.train.optimizer} (tau={cfg.train.qk_clip_tau}).", "",
        "| metric | value |", "|---|---:|",
        f"| steps | {last.get('step')} |",
        f"| tokens | {last.get('tokens', 0):,} |",
        f"| final train loss | {last.get('loss', float('nan')):.3f} |",
        f"| validation loss | {final.get('val_loss', float('nan')):.3f} |",
        f"| validation bits/byte | {final.get('val_bpb', float('nan')):.3f} |",
        *(f"| validation loss, {_val_label(k)} | {v:.3f} |" for k, v in final.items() if k.startswith("val_loss/")),
        f"| max attention logit (last step) | {last.get('max_logit', float('nan')):.1f} |",
        f"| throughput (tokens/s) | {last.get('tok_per_s', 0):.0f} |",
    ]
    for key, label in PROBE_LABELS.items():
        if key in probes:
            lines.append(f"| probe accuracy, {label} | {probes[key]:.1%} |")
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in s["timings_s"].items()]
    if plots:
        lines += ["", "## Training curves", ""] + [f"![{p}]({p})" for p in plots]
    if probes:
        lines += ["", "## Probe accuracy by attribute (seen people)", "", "| attribute | accuracy |", "|---|---:|"]
        lines += [f"| {k.split('/', 1)[1]} | {v:.1%} |" for k, v in probes.items()
                  if k.startswith("seen/") and k.count("/") == 1 and k.split("/")[1] not in ("recall", "qa")]
    lines += ["", "## Samples (temperature 0.7)", ""]
    lines += [f"- **{p}**{c!r}" for p, c in s["samples"].items()]
    lines += list(extra)
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
