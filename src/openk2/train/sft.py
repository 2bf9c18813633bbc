"""`openk2 sft`: supervised fine-tuning on chat JSONL with the one training loop (`openk2.train.trainer.Trainer`).

    cfg = sft_config("runs/nano", ["data/train.jsonl"], run_dir="runs/nano/sft", config="recipes/sft-nano.toml")
    run_sft(cfg)          # -> runs/nano/sft: checkpoints, metrics.jsonl, tokenizer/ (a model dir eval/serve accept)

SFT is pretraining's trainer with another data source (`openk2.train.sft_data`): conversations rendered with the
starting checkpoint's chat format, loss on assistant tokens only (tool calls included; user turns, tool results
and role headers masked), conversations packed into rows; MuonClip, the WSD schedule, validation loss on held-out
conversations, atomic DCP checkpoints and exact resume are the trainer's. The starting point is
`init.from_checkpoint`: a pretraining run directory (its model section is copied, so the shapes match) or a HF
checkpoint directory (its config.json defines the model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from openk2.train.config import TrainConfig, TrainConfigError, load_config


def sft_config(init: str | os.PathLike, train_files: list[str | os.PathLike], *, run_dir: str | os.PathLike,
               config: str | os.PathLike | None = None, overrides: list[str] = (),
               val_files: list[str | os.PathLike] = ()) -> TrainConfig:
    """The SFT config: `config` (e.g. recipes/sft-nano.toml) + `overrides`, starting from `init`, on the files."""
    files = [str(f) for f in train_files]
    cfg = load_config(config, [f"run.dir={json.dumps(str(run_dir))}", f"init.from_checkpoint={json.dumps(str(init))}",
                               f"sft.train_files={json.dumps(files)}",
                               *([f"sft.val_files={json.dumps([str(f) for f in val_files])}"] if val_files else []),
                               *overrides])
    return inherit_model(cfg)


def inherit_model(cfg: TrainConfig) -> TrainConfig:
    """Copy the model section of the starting run (its train_config.json), so the weights load into equal shapes."""
    init = Path(cfg.init.from_checkpoint) if cfg.init.from_checkpoint else None
    if init is None:
        raise TrainConfigError("SFT needs init.from_checkpoint: a pretraining run directory or a HF checkpoint")
    if not init.exists():
        raise TrainConfigError(f"init.from_checkpoint={init} does not exist")
    stored = init / "train_config.json"
    if stored.is_file():
        model = json.loads(stored.read_text()).get("model", {})
        cfg.model.preset = model.get("preset", cfg.model.preset)
        cfg.model.overrides = dict(model.get("overrides", {}))
    if not cfg.sft.train_files:
        raise TrainConfigError("SFT needs sft.train_files (chat JSONL in the OpenAI messages format)")
    cfg.validate()
    return cfg


def run_sft(cfg: TrainConfig, extra_eval: Any = None) -> dict[str, Any]:
    """Train (or resume) the SFT run of `cfg`; returns the last step's record plus the data statistics."""
    from openk2.train.trainer import Trainer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    trainer = Trainer(cfg, extra_eval=extra_eval)
    last = trainer.train()
    stats = getattr(trainer.data, "sft_stats", {})
    if trainer.is_main:
        (Path(cfg.run.dir) / "sft_data.json").write_text(json.dumps(stats, indent=2))
    return {**last, "data": stats, "step": trainer.step}


__all__ = ["inherit_model", "run_sft", "sft_config"]
