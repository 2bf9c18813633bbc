"""Warmup-stable-decay (WSD) learning-rate schedule, as K2: linear warm-up, constant, then decay."""

from __future__ import annotations

import math


def wsd_multiplier(
    step: int, max_steps: int, warmup_steps: int, decay_fraction: float, final_fraction: float,
    shape: str = "cosine",
) -> float:
    """lr multiplier for optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(round(decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if decay_steps <= 0 or step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    if shape == "cosine":
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - final_fraction) * progress
