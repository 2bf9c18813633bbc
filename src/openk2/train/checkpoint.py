"""Atomic, rotating checkpoints: `<run>/checkpoints/step_000123/` holding model, optimizer, loader, RNG, step.

A checkpoint directory is written under a temporary name and renamed into place only when complete (after
fsync), so a crash or full disk mid-write never leaves a broken latest checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openk2.utils.io import fsync_path

_STEP_DIR = re.compile(r"^step_(\d{9})$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    # state.pt: single-process checkpoints; dcp.json: distributed ones (openk2.parallel.dist_checkpoint).
    return sorted(p for p in root.iterdir()
                  if _STEP_DIR.match(p.name) and ((p / "state.pt").is_file() or (p / "dcp.json").is_file()))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` (anything torch.save takes) for `step`; keep the newest `keep_last` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:09d}"
    tmp = root / f".tmp_step_{step:09d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):  # leftovers of killed writers
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(path) / "state.pt", map_location=map_location, weights_only=False)


def load_model_from_run(run_dir: Path, device: str | torch.device = "cpu"):
    """The model of a run directory's latest checkpoint (a `K2Model` in eval mode)."""
    from openk2.model import ModelConfig, build_model

    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint (expected {Path(run_dir) / 'checkpoints'}/step_*)")
    if (ckpt / "dcp.json").is_file():  # written by a parallel run: gathered from its shards in this process
        from openk2.parallel.dist_checkpoint import load_full_model

        return load_full_model(ckpt, device=device)
    state = load_checkpoint(ckpt, map_location=device)
    model = build_model(ModelConfig.from_hf_dict(state["model_config"]), device=device)
    model.load_state_dict(state["model"])
    return model.eval()
