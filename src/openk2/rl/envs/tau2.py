"""τ²-bench's train split as a multi-turn RL environment: an adapter from `openk2.eval.tau2.gym.Tau2GymEnv`
(assistant message in, gym 5-tuple out) to the RL `Env` protocol (raw policy text in, `StepResult` out).

    env = Tau2ToolEnv("retail", user=user_chat, tool_parser=fmt.tool_parser)   # split="train" always
    obs = await env.reset(task_id); result = await env.step(model_text)

The user simulator (any `ChatFn`, e.g. an `openk2.llm` client on an OpenAI-compatible endpoint) is part of the
environment. Observations carry only the messages added since the policy's last turn (tool results, user turns).
"""

from __future__ import annotations

from typing import Any

from openk2.data.tool_parsers import ToolCallParser
from openk2.eval.task import ChatFn
from openk2.eval.tau2.gym import Tau2GymEnv
from openk2.rl.types import Observation, StepResult


class Tau2ToolEnv:
    def __init__(self, domain: str, user: ChatFn, tool_parser: ToolCallParser | None, judge: ChatFn | None = None,
                 **gym_kwargs: Any) -> None:
        self.gym = Tau2GymEnv(domain, user=user, split="train", judge=judge, **gym_kwargs)
        self.tool_parser = tool_parser
        self.task_type = f"tau2:{domain}"
        self._seen = 0
        self._n_calls = 0

    def task_ids(self) -> list[str]:
        return [t.id for t in self.gym.tasks]

    def _new_messages(self, obs: dict[str, Any]) -> list[dict[str, Any]]:
        messages = obs["messages"][self._seen:]
        self._seen = len(obs["messages"])
        return messages

    async def reset(self, task: str, seed: int | None = None) -> Observation:
        obs = await self.gym.areset(task)
        self._seen, self._n_calls = 0, 0
        return Observation(messages=self._new_messages(obs), tools=obs["tools"], info={"task_id": task})

    async def step(self, action_text: str) -> StepResult:
        if self.tool_parser is None:
            action: dict[str, Any] = {"role": "assistant", "content": action_text}
        else:
            action = self.tool_parser.parse(action_text, first_index=self._n_calls).to_message()
        self._n_calls += len(action.get("tool_calls") or [])
        obs, reward, terminated, truncated, info = await self.gym.astep(action)
        self._seen += 1  # the assistant message itself is the policy's, not part of the observation
        new = self._new_messages(obs)
        done = terminated or truncated
        return StepResult(None if done else Observation(messages=new, tools=obs["tools"]), reward, terminated,
                          truncated, {**info, "assistant_message": action})

    async def close(self) -> None:
        self.gym.env = None


__all__ = ["Tau2ToolEnv"]
