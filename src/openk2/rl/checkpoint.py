"""RL checkpoints: the whole RL state in `<run>/checkpoints/step_N/state.pt`, so a killed run resumes exactly.

    save_rl_checkpoint(run_dir, step, RLState(...), keep_last=2)
    state = load_rl_checkpoint(run_dir)          # None when the run has no checkpoint yet

The file is the training checkpoint's layout (`openk2.train.checkpoint`, atomic rename, rotation) with the keys
`load_model_from_run` reads (`model_config`, `model`), so `<run>` is a run directory that `openk2 eval --model`,
`openk2 serve` and `load_model_dir` accept; the RL extras ride along: optimizer, policy version, sampler state,
the partial-rollout buffer (groups with paused or unfinished members, as plain dicts), the PTX loader's position
and every RNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openk2.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state

FORMAT = "openk2.rl/1"


@dataclass
class RLState:
    step: int
    version: int
    model: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    optimizer: dict[str, Any]
    sampler: dict[str, Any]
    buffer: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)
    ptx: dict[str, Any] = field(default_factory=dict)   # the PTX loader's state ({} without a PTX loss)
    rng: dict[str, Any] = field(default_factory=rng_state)


def save_rl_checkpoint(run_dir: str | Path, state: RLState, keep_last: int) -> Path:
    return save_checkpoint(Path(run_dir), state.step, {
        "format": FORMAT, "step": state.step, "version": state.version, "model": state.model,
        "model_config": state.model_config, "optimizer": state.optimizer, "sampler": state.sampler,
        "buffer": state.buffer, "counters": state.counters, "ptx": state.ptx, "rng": state.rng}, keep_last)


def load_rl_checkpoint(run_dir: str | Path) -> RLState | None:
    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None:
        return None
    d = load_checkpoint(ckpt)
    if d.get("format") != FORMAT:
        raise ValueError(f"{ckpt}: not an RL checkpoint (format {d.get('format')!r}); use a new --out directory")
    return RLState(step=d["step"], version=d["version"], model=d["model"], model_config=d["model_config"],
                   optimizer=d["optimizer"], sampler=d["sampler"], buffer=d["buffer"], counters=d["counters"],
                   ptx=d.get("ptx", {}), rng=d["rng"])


def restore_rng(state: RLState) -> None:
    set_rng_state(state.rng)


__all__ = ["FORMAT", "RLState", "load_rl_checkpoint", "restore_rng", "save_rl_checkpoint"]
