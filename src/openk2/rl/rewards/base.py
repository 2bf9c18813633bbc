"""What every reward shares: result normalisation, text of a trajectory, failure isolation, composition.

A reward is any `async (trajectory, task) -> float | {"score": float, **info}` (`openk2.rl.types.Reward`);
plain functions are accepted too. `SafeReward` is the robustness wrapper the RL loop scores through: a reward
that raises, hangs past `timeout_s` or returns a non-finite score gives `failure_score` for that sample with the
reason in `reward_info["error"]`, and the run continues. `GroupReward`s (the rubric critic, K1.5's length penalty) need
the K responses of one prompt together; `score_group` runs both kinds over a group.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from openk2.rl.types import Trajectory

RewardFn = Callable[[Trajectory, Any], Any]  # sync or async, returns float | dict


@runtime_checkable
class GroupReward(Protocol):
    """Scores the K responses of one prompt together (pairwise critics, length penalties)."""

    async def score_group(self, trajectories: Sequence[Trajectory], task: Any) -> list[float | dict[str, Any]]: ...


def as_score(result: Any) -> tuple[float, dict[str, Any]]:
    """(score, info) from a reward's return value: a number, a bool, or a dict with "score"."""
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"a reward returned a dict without 'score' (keys: {', '.join(result) or 'none'})")
        info = {k: v for k, v in result.items() if k != "score"}
        score = result["score"]
    else:
        score, info = result, {}
    if isinstance(score, bool):
        score = float(score)
    if not isinstance(score, (int, float)):
        raise TypeError(f"a reward returned {type(score).__name__}, expected a number or {{'score': number}}")
    if not math.isfinite(score):
        raise ValueError(f"a reward returned a non-finite score ({score})")
    return float(score), info


def response_text(trajectory: Trajectory, tokenizer: Any = None) -> str:
    """The response as text: `metadata["response_text"]` when the rollout recorded it (multi-turn rollouts record
    the final answer there), else the policy tokens decoded with `tokenizer`."""
    text = trajectory.metadata.get("response_text")
    if text is not None:
        return str(text)
    if tokenizer is None:
        raise ValueError("the trajectory has no metadata['response_text']; give the reward a tokenizer to decode "
                         "its response_ids")
    ids = [t for t, m in zip(trajectory.response_ids, trajectory.loss_mask, strict=False) if m]
    return tokenizer.decode(ids)


async def call_reward(fn: Any, *args: Any) -> Any:
    """Await an async reward; run a sync one in a worker thread (so a timeout can stop waiting for it)."""
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):  # noqa: B004
        return await fn(*args)
    result = await asyncio.to_thread(fn, *args)
    return await result if inspect.isawaitable(result) else result


@dataclass
class SafeReward:
    """Failure isolation around any reward: exceptions, timeouts and bad return values score `failure_score`
    with `{"error": reason}` in the info (the key the episode driver uses for failed env steps). A sync reward
    that hangs keeps its worker thread until it returns (Python cannot kill a thread); the sample is scored at
    the timeout regardless."""

    reward: RewardFn
    timeout_s: float = 60.0
    failure_score: float = 0.0
    name: str = ""

    async def __call__(self, trajectory: Trajectory, task: Any) -> dict[str, Any]:
        label = self.name or getattr(self.reward, "__name__", type(self.reward).__name__)
        try:
            result = await asyncio.wait_for(call_reward(self.reward, trajectory, task), self.timeout_s)
            score, info = as_score(result)
        except TimeoutError:
            return {"score": self.failure_score, "error": f"{label}: timed out after {self.timeout_s:g} s"}
        except Exception as exc:  # noqa: BLE001 (any failure of user reward code is that sample's failure)
            return {"score": self.failure_score, "error": f"{label}: {type(exc).__name__}: {exc}"}
        return {"score": score, **info}


@dataclass
class CompositeReward:
    """A weighted sum of rewards, each isolated by `SafeReward`; the info keeps every part's score under its
    name (`parts`), so metrics can show which term moved."""

    parts: list[tuple[str, RewardFn, float]]
    timeout_s: float = 60.0
    failure_score: float = 0.0
    _safe: list[SafeReward] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = [name for name, _, _ in self.parts]
        if len(set(names)) != len(names):
            raise ValueError(f"reward part names must be unique, got {names}")
        self._safe = [SafeReward(fn, self.timeout_s, self.failure_score, name) for name, fn, _ in self.parts]

    async def __call__(self, trajectory: Trajectory, task: Any) -> dict[str, Any]:
        results = await asyncio.gather(*(safe(trajectory, task) for safe in self._safe))
        total, info, parts = 0.0, {}, {}
        for (name, _, weight), result in zip(self.parts, results, strict=True):
            total += weight * result["score"]
            parts[name] = result["score"]
            info.update({k if k not in info else f"{name}.{k}": v for k, v in result.items() if k != "score"})
        return {"score": total, **info, "parts": parts}


async def score_group(trajectories: Sequence[Trajectory], task: Any, reward: RewardFn | None = None,
                      group_rewards: Sequence[tuple[GroupReward, float]] = (), timeout_s: float = 60.0,
                      failure_score: float = 0.0, mark_failed: bool = False) -> None:
    """Score one prompt's trajectories in place: `reward` per sample (isolated), then each group reward's scores
    added with its weight. A sample whose reward failed keeps `failure_score` and `reward_info["error"]`; with
    `mark_failed` its status also becomes "failed" (the controller then leaves it out of its group). A failing
    group reward adds nothing and records why in every sample's `reward_info["group_reward_error"]`."""
    if reward is not None:
        safe = reward if isinstance(reward, (SafeReward, CompositeReward)) else SafeReward(reward, timeout_s,
                                                                                         failure_score)
        results = await asyncio.gather(*(safe(t, task) for t in trajectories))
    else:
        results = [{"score": 0.0} for _ in trajectories]
    for trajectory, result in zip(trajectories, results, strict=True):
        trajectory.reward = result["score"]
        trajectory.reward_info.update({k: v for k, v in result.items() if k != "score"})
        if mark_failed and "error" in result:
            trajectory.status = "failed"
    for group_reward, weight in group_rewards:
        label = type(group_reward).__name__
        try:
            scores = await asyncio.wait_for(group_reward.score_group(trajectories, task), timeout_s)
            if len(scores) != len(trajectories):
                raise ValueError(f"returned {len(scores)} scores for {len(trajectories)} trajectories")
            parsed = [as_score(s) for s in scores]
        except Exception as exc:  # noqa: BLE001
            reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            for trajectory in trajectories:
                trajectory.reward_info.setdefault("group_reward_error", f"{label}: {reason}")
            continue
        for trajectory, (score, info) in zip(trajectories, parsed, strict=True):
            trajectory.reward = (trajectory.reward or 0.0) + weight * score
            trajectory.reward_info[label] = {"score": score, **info}


__all__ = ["CompositeReward", "GroupReward", "RewardFn", "SafeReward", "as_score", "call_reward", "response_text",
           "score_group"]
