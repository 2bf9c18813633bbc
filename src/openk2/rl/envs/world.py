"""The world tool domain as a multi-turn RL environment (`openk2.agentic.world_domain.WorldEnv` + `world_tasks`).

    env = WorldToolEnv(world, tool_parser)
    obs = await env.reset(task)                 # system prompt + the scripted user's request, with the tool schemas
    result = await env.step(model_text)         # tool calls -> tool results (episode continues); text -> scored

The policy's raw text is parsed with the model's tool-call parser (`openk2.data.tool_parsers`). Tool calls run on
the real tools and their results come back as tool messages; a text answer ends the episode (the scripted user has
nothing more to say) and is scored as `world-agent` scores it: end state and final answer (`score_episode`).
Episodes longer than `max_turns` model turns end truncated with reward 0.

Training tasks may also come from *registry worlds* (`world_train_tasks(..., registry_worlds=R)`): other draws of
the world generator, whose people are in no pretraining document, like the held-out people. A request about one of
them can only be served by copying the name from the request and the value from the tool's result, which is the
skill the held-out tasks test (the SFT model names a memorised person instead). Such a task is a `RegistryTask`,
and the env runs it on its own world's tools and checker.

`partial_credit` (training only; pass@1 stays exact task success): a failed episode earns 0.5 x the share of the
task's gold tool-call arguments it got right (`gold_call_credit`), so a group whose samples all fail still ranks
the one that copied the request's name into its call above the one that invented a name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from openk2.agentic.world_domain import SYSTEM_PROMPT, WorldEnv
from openk2.agentic.world_tasks import WorldTask, make_tasks, score_episode
from openk2.data.tool_parsers import ToolCallParser
from openk2.data.world import World
from openk2.rl.types import Observation, StepResult

#: Registry world k of the RL train pool is `World.generate(RL_REGISTRY_SEED + k, ...)`: other worlds than the SFT
#: data's (`openk2.agentic.world_sft.REGISTRY_SEED` = 1000 + k), so RL asks about names no training step has seen.
RL_REGISTRY_SEED = 2000


@dataclass(frozen=True)
class RegistryTask:
    """A world-domain task about a person of another world than the env's own: run on `world`'s tools."""

    world: World
    task: WorldTask

    @property
    def id(self) -> str:
        return f"w{self.world.seed}-{self.task.id}"

    @property
    def kind(self) -> str:
        return self.task.kind


def world_train_tasks(world: World, n: int, seed: int = 0, registry_worlds: int = 0,
                      kinds: dict[str, float] | None = None) -> list[WorldTask | RegistryTask]:
    """`n` train tasks: about `world`'s training people only (registry_worlds = 0), or spread evenly over `world`
    and `registry_worlds` registry worlds of the same size, interleaved so that any prefix mixes them. Tasks that
    name a held-out person of `world` (a registry person may share the name) are dropped, so none is trained on.
    `kinds`: task-kind weights (`world_tasks.KIND_WEIGHTS` when None or empty)."""
    if registry_worlds < 0:
        raise ValueError(f"registry_worlds must be >= 0, got {registry_worlds}")
    if registry_worlds == 0:
        return list(make_tasks(world, "train", n, seed=seed, kinds=kinds or None))
    heldout = {p.name for p in world.heldout_people}
    per_world = -(-n // (1 + registry_worlds))
    columns: list[list[WorldTask | RegistryTask]] = [list(make_tasks(world, "train", per_world, seed=seed,
                                                                     kinds=kinds or None))]
    for k in range(registry_worlds):
        other = World.generate(seed=RL_REGISTRY_SEED + k, n_people=len(world.people))
        columns.append([RegistryTask(other, t) for t in make_tasks(other, "train", per_world, seed=seed,
                                                                   kinds=kinds or None)
                        if not any(h in t.instruction for h in heldout)])
    mixed = [col[i] for i in range(per_world) for col in columns if i < len(col)]
    return mixed[:n]


def _arguments(raw: Any) -> Any:
    try:
        return json.loads(raw) if isinstance(raw, str) else dict(raw or {})
    except (ValueError, TypeError):
        return None


def gold_call_credit(task: WorldTask, messages: Sequence[dict[str, Any]]) -> float:
    """How much of `task`'s gold tool calls the transcript made: for each gold call, the largest fraction of its
    arguments (name, attribute, value, ...) that one call of the same tool got exactly right, averaged over the gold
    calls; 0 for a task without tool calls (refuse). Per argument, so that copying the request's name into an
    otherwise wrong call already counts (the SFT model picks the tool and attribute but invents the name)."""
    if not task.gold_actions:
        return 0.0
    made = [(str((c.get("function") or {}).get("name")), _arguments((c.get("function") or {}).get("arguments")))
            for m in messages if m.get("role") == "assistant" for c in (m.get("tool_calls") or [])]
    total = 0.0
    for gold in task.gold_actions:
        want = gold["arguments"]
        total += max((sum(isinstance(args, dict) and args.get(k) == v for k, v in want.items()) / max(len(want), 1)
                      for tool, args in made if tool == gold["name"]), default=0.0)
    return total / len(task.gold_actions)


class WorldToolEnv:
    task_type = "world"

    def __init__(self, world: World, tool_parser: ToolCallParser | None, max_turns: int = 4,
                 partial_credit: bool = False) -> None:
        self.world, self.tool_parser, self.max_turns = world, tool_parser, max_turns
        self.partial_credit = partial_credit
        self.home_world = world
        self.tools = WorldEnv(world)
        self.task: WorldTask | None = None
        self.messages: list[dict[str, Any]] = []
        self.turns = 0

    async def reset(self, task: WorldTask | RegistryTask, seed: int | None = None) -> Observation:
        world = task.world if isinstance(task, RegistryTask) else self.home_world
        if world is not self.world:
            self.world, self.tools = world, WorldEnv(world)
        task = task.task if isinstance(task, RegistryTask) else task
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
                return StepResult(None, self._partial(), terminated=False, truncated=True,
                                  info={"reason": f"no answer after {self.max_turns} turns", "correct": False})
            return StepResult(Observation(messages=results, tools=self.tools.tools()), 0.0, terminated=False,
                              truncated=False, info={"assistant_message": reply})
        reward, details = score_episode(self.world, self.task, self.messages)
        details["correct"] = reward >= 1.0
        return StepResult(None, reward if reward >= 1.0 else self._partial(), terminated=True, truncated=False,
                          info=details)

    def _partial(self) -> float:
        return 0.5 * gold_call_credit(self.task, self.messages) if self.partial_credit and self.task else 0.0

    async def close(self) -> None:
        self.task = None


__all__ = ["RL_REGISTRY_SEED", "RegistryTask", "WorldToolEnv", "world_train_tasks"]
