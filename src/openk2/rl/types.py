"""The RL stage's data model and interfaces (`../shared/docs/rl-design.md` §6, binding), token-in/token-out.

    Trajectory        one response (possibly several segments of a multi-turn episode) with everything the loss needs
    Env               reset(task, seed) -> Observation; step(action_text) -> StepResult   (gymnasium naming)
    Reward            async (trajectory, task) -> float | {"score": float, **info}
    RolloutEngine     async generate(prompt_ids, SamplingParams, request_id) -> GenOut; weights, version, pause/abort
    WeightSync        send(named tensors, version) / receive()

Shapes borrowed from verl (AgentLoopOutput, register_policy_loss), slime (Sample) and AReaL (per-token versions),
so a cluster run swaps the backend (vLLM engine, checkpoint-engine sync) instead of rewriting the loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

Status = Literal["completed", "truncated", "aborted", "failed"]


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None


@dataclass
class GenOut:
    """What an engine returns for one request. `finish_reason`: "stop" (a stop token, included in token_ids),
    "length" (max_new_tokens reached) or "abort" (paused/aborted; token_ids holds the part generated so far)."""

    token_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each token under the sampling distribution's policy (T applied)
    finish_reason: Literal["stop", "length", "abort"]
    version: int = 0


@dataclass
class Trajectory:
    """One sample of a group. `response_ids` interleaves policy tokens (loss_mask 1) and environment tokens (tool
    results, user turns; loss_mask 0). `behav_logprobs` and `versions` are per response token (0.0 / -1 for env
    tokens). `reward` is set by the Reward stage; `status` "aborted" marks a partial rollout to resume."""

    group_id: str
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    behav_logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    reward: float | None = None
    reward_info: dict[str, Any] = field(default_factory=dict)
    status: Status = "completed"
    n_segments: int = 1
    task_type: str = "default"
    metadata: dict[str, Any] = field(default_factory=dict)

    def append(self, token_ids: list[int], logprobs: list[float] | None, version: int, policy: bool) -> None:
        """Append a segment: policy tokens (with their behaviour log-probs) or environment tokens."""
        self.response_ids += token_ids
        self.loss_mask += [int(policy)] * len(token_ids)
        self.behav_logprobs += list(logprobs) if policy and logprobs is not None else [0.0] * len(token_ids)
        self.versions += [version if policy else -1] * len(token_ids)

    @property
    def n_policy_tokens(self) -> int:
        return sum(self.loss_mask)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        return cls(**d)


@dataclass
class Observation:
    """What the policy sees: chat messages (rendered with the chat template by the rollout) or raw prompt tokens."""

    messages: list[dict[str, Any]] | None = None
    prompt_ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    observation: Observation | None
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    """A task environment: single-turn verifiable tasks return the reward on the first step; tool environments
    answer tool calls with tool results until the episode ends."""

    task_type: str

    async def reset(self, task: Any, seed: int | None = None) -> Observation: ...

    async def step(self, action_text: str) -> StepResult: ...

    async def close(self) -> None: ...


@runtime_checkable
class Reward(Protocol):
    async def __call__(self, trajectory: Trajectory, task: Any) -> float | dict[str, Any]: ...


@runtime_checkable
class RolloutEngine(Protocol):
    version: int

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> GenOut: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def abort(self) -> list[str]: ...


@runtime_checkable
class WeightSync(Protocol):
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]: ...


__all__ = ["Env", "GenOut", "Observation", "Reward", "RolloutEngine", "SamplingParams", "Status", "StepResult",
           "Trajectory", "WeightSync"]
