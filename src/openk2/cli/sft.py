"""`openk2 sft`: supervised fine-tuning on chat JSONL, from a pretraining run or a HF checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from openk2.cli.app import app, console, fail


@app.command()
def sft(
    init: Path = typer.Option(..., "--init", help="Starting model: a pretraining run directory or a HF checkpoint."),
    data: list[Path] = typer.Option(..., "--data", help="Chat JSONL (OpenAI messages + tools), repeatable."),
    out: Path = typer.Option(..., "--out", help="The SFT run directory (rerun the command to resume)."),
    val: list[Path] = typer.Option([], "--val", help="Validation chat JSONL (default: hold out sft.val_fraction)."),
    config: Path = typer.Option(None, "--config", "-c", help="A TOML recipe, e.g. recipes/sft-nano.toml."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override, e.g. --set train.lr=3e-3 (repeatable)."),
) -> None:
    """Fine-tune on chats: loss on assistant tokens only (tool calls included), packed, MuonClip, resumable."""
    from openk2.train.config import TrainConfigError
    from openk2.train.sft import run_sft, sft_config
    from openk2.train.sft_data import SFTDataError

    try:
        cfg = sft_config(init, list(data), run_dir=out, config=config, overrides=list(overrides), val_files=list(val))
        last = run_sft(cfg)
    except (TrainConfigError, SFTDataError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    d = last.get("data", {})
    console.print(f"sft: {out} at step {last.get('step')}, train loss {last.get('loss', float('nan')):.3f}, "
                  f"val loss {last.get('val_loss', float('nan')):.3f}; "
                  f"{d.get('train', {}).get('conversations', '?')} training conversations, "
                  f"{d.get('skipped_lines', 0)} bad lines skipped", markup=False, highlight=False)
