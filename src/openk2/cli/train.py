"""Training commands: `pretrain` and `speedrun`."""

from __future__ import annotations

from pathlib import Path

import typer

from openk2.cli.app import app, fail


@app.command()
def pretrain(
    config: Path = typer.Option(None, "--config", "-c", help="A TOML recipe, e.g. recipes/nano.toml."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override, e.g. --set train.lr=3e-4 (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Parse the config and build the model on meta only."),
) -> None:
    """Pretrain (or resume: the same command on an existing run directory continues from its latest checkpoint)."""
    from openk2.train.config import TrainConfigError, load_config

    try:
        cfg = load_config(config, overrides)
        if dry_run:
            _dry_run(cfg)
            return
        from openk2.train.trainer import run_pretrain

        run_pretrain(cfg)
    except (TrainConfigError, ValueError, FileNotFoundError) as e:
        fail(str(e))


def _dry_run(cfg) -> None:
    import torch

    from openk2.model import K2Model, count_params, get_preset

    mcfg = get_preset(cfg.model.preset, **{"vocab_size": cfg.data.vocab_size, **cfg.model.overrides})
    with torch.device("meta"):
        K2Model(mcfg)
    c = count_params(mcfg)
    t = cfg.train
    print(f"config OK: {cfg.model.preset} ({c.total / 1e9:.1f}B total, {c.activated / 1e9:.2f}B activated), "
          f"{t.batch_size * t.seq_len:,} tokens per step (global batch {t.batch_size} x {t.seq_len}), "
          f"{t.max_steps:,} steps, lr {t.lr}, optimizer {t.optimizer}")


@app.command()
def speedrun(
    name: str = typer.Option("nano", help="Run name: writes runs/<name>/."),
    config: Path = typer.Option(None, "--config", "-c", help="A TOML recipe (default: the nano settings)."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override (repeatable)."),
    sft: bool = typer.Option(True, "--sft/--no-sft", help="Run the SFT stage (world tool use) after pretraining."),
    rl: bool = typer.Option(True, "--rl/--no-rl", help="Run the RL stage (verifiable rewards) after the SFT stage."),
) -> None:
    """The main job: world corpus -> tokenizer -> pretraining with MuonClip -> evaluation -> SFT stage -> RL stage
    -> report."""
    from openk2.train.config import TrainConfigError
    from openk2.train.speedrun import speedrun as run

    try:
        run(name, config, overrides, sft=sft, rl=rl and sft)
    except (TrainConfigError, ValueError, FileNotFoundError) as e:
        fail(str(e))
