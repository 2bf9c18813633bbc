"""`openk2 rl`: reinforcement learning from an SFT run (the K1.5/K2 loss, verifiable environments, partial rollouts)."""

from __future__ import annotations

from pathlib import Path

import typer

from openk2.cli.app import app, console, fail


@app.command()
def rl(
    config: Path = typer.Option(None, "--config", "-c", help="A TOML recipe, e.g. recipes/rl-nano.toml."),
    init: Path = typer.Option(None, "--init", help="Starting model (run.init): an SFT run directory or HF checkpoint."),
    out: Path = typer.Option(None, "--out", help="The RL run directory (run.dir); rerun the command to resume."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override, e.g. --set train.lr=3e-4 (repeatable)."),
) -> None:
    """RL with verifiable rewards: rollouts -> rewards -> advantages -> update -> weight sync; resumable; the output
    directory is a run directory `openk2 eval --model` and `openk2 serve` accept."""
    import json

    from openk2.model_dir import ModelSourceError
    from openk2.rl.config import RLConfigError, load_rl_config
    from openk2.rl.controller import run_rl

    extra = [*([f"run.init={json.dumps(str(init))}"] if init else []),
             *([f"run.dir={json.dumps(str(out))}"] if out else [])]
    try:
        cfg = load_rl_config(config, [*extra, *overrides])
        summary = run_rl(cfg)
    except (RLConfigError, ModelSourceError, FileNotFoundError) as e:
        fail(str(e))
    before = {k: v for k, v in summary["before"].items() if k.startswith("eval/") and k.count("/") == 2}
    after = summary["after"]
    for key, value in before.items():
        name = key.removeprefix("eval/").removesuffix("/pass@1")
        console.print(f"rl: {name} held-out greedy pass@1 {value:.1%} -> {after.get(key, float('nan')):.1%}",
                      markup=False, highlight=False)
    console.print(f"rl: {cfg.run.dir} at step {summary['steps']} (policy version {summary['version']}), "
                  f"{summary['skipped_updates']} updates skipped", markup=False, highlight=False, soft_wrap=True)
