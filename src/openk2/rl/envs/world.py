"""The world tool domain as a multi-turn RL environment (`openk2.agentic.world_domain.WorldEnv` + `world_tasks`).

    env = WorldToolEnv(world, tool_parser)
    obs = await env.reset(task)                 # system prompt + the scripted user's request, with the tool schemas
    result = await env.step(model_text)         # tool calls -> tool results (episode continues); text -> scored

The policy's raw text is parsed with the model's tool-call parser (`openk2.data.tool_parsers`). Tool calls run on
the real tools and their results come back as tool messages; a text answer ends the episode (the scripted user has
nothing more to say) and is scored as `world-agent` scores it: end state and final answer (`score_episode`).
Episodes longer than `max_turns` model turns end truncated with reward 0.
"""

from __future__ import annotations

from typing import Any

from openk2.agentic.world_domain import SYSTEM_PROMPT, WorldEnv
from openk2.agentic.world_tasks import WorldTask, score_episode
from openk2.data.tool_parsers import ToolCallParser
from openk2.data.world import World
from openk2.rl.types import Observation, StepResult


class WorldToolEnv:
    task_type = "world"

    def __init__(self, world: World, tool_parser: ToolCallParser | None, max_turns: int = 4) -> None:
        self.world, self.tool_parser, self.max_turns = world, tool_parser, max_turns
        self.tools = WorldEnv(world)
        self.task: WorldTask | None = None
        self.messages: list[dict[str, Any]] = []
        self.turns = 0

    async def reset(self, task: WorldTask, seed: int | None = None) -> Observation:
        self.task, self.turns = task, 0
        self.task_type = f"world/{task.kind}"
        self.tools.reset()
        self.messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.instruction}]
        return Observation(messages=list(self.messages), tools=self.tools.tools(), info={"task_id": task.id})

    def _parse(self, text: str) -> dict[str, Any]:
        if self.tool_parser is None:
            return {"role": "assistant", "content": text}
        n_before = sum(len(m.get("tool_calls") or []) for m in self.messages)
        return self.tool_parser.parse(text, first_index=n_before).to_message()

    async def step(self, action_text: str) -> StepResult:
        if self.task is None:
            raise RuntimeError("call reset(task) before step()")
        self.turns += 1
        reply = self._parse(action_text)
        self.messages.append(reply)
        if reply.get("tool_calls"):
            results = [{"role": "tool", "tool_call_id": c.get("id") or "",
                        "content": self.tools.call(str(c["function"].get("name")), c["function"].get("arguments"))}
                       for c in reply["tool_calls"]]
            self.messages += results
            if self.turns >= self.max_turns:
                return StepResult(None, 0.0, terminated=False, truncated=True,
                                  info={"reason": f"no answer after {self.max_turns} turns"})
            return StepResult(Observation(messages=results, tools=self.tools.tools()), 0.0, terminated=False,
                              truncated=False, info={"assistant_message": reply})
        reward, details = score_episode(self.world, self.task, self.messages)
        return StepResult(None, reward, terminated=True, truncated=False, info=details)

    async def close(self) -> None:
        self.task = None


__all__ = ["WorldToolEnv"]
