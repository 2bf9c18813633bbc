"""Reward shaping on top of correctness: K2's budget control and K1.5's length penalty.

BudgetPenalty (K2 §3.2.3): each task type has a token budget; the rollout truncates at it (`max_new_tokens`) and
a truncated response gets `−penalty` added. K2 publishes neither budgets nor penalty (rl-design §9): configure.

LengthPenalty (K1.5 §2.3.3), over the K responses of a prompt: λ_i = 0.5 − (len_i − min_len)/(max_len − min_len);
a correct response gets λ_i, a wrong one min(0, λ_i), all-equal lengths give 0; scaled by `weight` and off for
the first `warmup_steps` RL steps (K1.5 warms it up because it slows early training).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from openk2.rl.types import Trajectory


@dataclass
class BudgetPenalty:
    """Budgets per task type ("family/kind" or "family": the most specific entry wins, then `default_budget`) and
    the penalty of a response the rollout truncated at its budget (or at the context limit). An episode the
    environment ended (e.g. a turn limit: reason "env") is not over budget, nor is a paused partial rollout.
    The RL controller's reward shaping (`openk2.rl.controller`) is this reward."""

    budget_by_task_type: dict[str, int]
    penalty: float = 0.5
    default_budget: int | None = None

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.budget_by_task_type.items() if not isinstance(v, int) or v <= 0}
        if bad or (self.default_budget is not None and self.default_budget <= 0):
            raise ValueError(f"token budgets must be positive integers, got {bad or self.default_budget}")

    def max_new_tokens(self, task_type: str) -> int:
        """The generation cap for a task type (what the rollout passes as SamplingParams.max_new_tokens)."""
        family = task_type.split("/", 1)[0].split(":", 1)[0]
        for key in (task_type, family):
            if key in self.budget_by_task_type:
                return self.budget_by_task_type[key]
        if self.default_budget is None:
            raise KeyError(f"no token budget for task type {task_type!r}; configured: "
                           f"{', '.join(sorted(self.budget_by_task_type))} (or set default_budget)")
        return self.default_budget

    def over_budget(self, trajectory: Trajectory) -> bool:
        return trajectory.status == "truncated" and trajectory.reward_info.get("truncated") != "env"

    def score(self, trajectory: Trajectory) -> float:
        """The penalty term: −penalty for a response over its budget, else 0."""
        return -self.penalty if self.over_budget(trajectory) else 0.0

    async def __call__(self, trajectory: Trajectory, task: Any) -> dict[str, Any]:
        return {"score": self.score(trajectory), "over_budget": self.over_budget(trajectory),
                "budget": self.max_new_tokens(trajectory.task_type)}


def k15_length_rewards(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """K1.5's λ-based length reward for one group (module docstring)."""
    if len(lengths) != len(correct):
        raise ValueError(f"{len(lengths)} lengths but {len(correct)} correctness flags")
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    if high == low:
        return [0.0] * len(lengths)
    lam = [0.5 - (n - low) / (high - low) for n in lengths]
    return [x if ok else min(0.0, x) for x, ok in zip(lam, correct, strict=True)]


@dataclass
class LengthPenalty:
    """A GroupReward: `score_group` gives each response weight·λ-reward once `step >= warmup_steps` (set `step`
    from the loop each iteration). Correctness: `reward_info[correct_key]` when present, else reward ≥ threshold
    (so score the verifiable reward first)."""

    weight: float = 1.0
    warmup_steps: int = 0
    correct_key: str = "correct"
    threshold: float = 1.0
    step: int = field(default=0)

    async def score_group(self, trajectories: Sequence[Trajectory], task: Any) -> list[dict[str, Any]]:
        if self.step < self.warmup_steps:
            return [{"score": 0.0, "length_penalty_active": False} for _ in trajectories]
        correct = [bool(t.reward_info.get(self.correct_key, (t.reward or 0.0) >= self.threshold))
                   for t in trajectories]
        values = k15_length_rewards([t.n_policy_tokens for t in trajectories], correct)
        return [{"score": self.weight * v, "length_penalty_active": True} for v in values]


__all__ = ["BudgetPenalty", "LengthPenalty", "k15_length_rewards"]
