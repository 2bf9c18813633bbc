"""The world domain (`world_domain`, `world_tasks`) through the synthesis pipeline: its tasks become rubric
`Task`s with gold actions and gold end states, `WorldEnv` is the executable tool layer, and its programmatic
expert and scripted user (or an LLM agent and user) drive the dialogs, so the pipeline's simulation, rule/state
checks, judge and export run on a CPU without any LLM.

    inputs = world_inputs(World.generate(0, 100), split="train", n=50, seed=0)
    summary = asyncio.run(run_synthesis(cfg, None, None, **inputs.expert()))       # no LLM
    summary = asyncio.run(run_synthesis(cfg, client, None, **inputs.llm()))       # an LLM agent and user
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from openk2.agentic.agents import Agent
from openk2.agentic.common import Rejection
from openk2.agentic.repository import ToolRepository
from openk2.agentic.tasks import Rubric, Task, attach_gold_state
from openk2.agentic.tools import validate_tool
from openk2.agentic.world_domain import SYSTEM_PROMPT, TOOLS, WorldEnv
from openk2.agentic.world_tasks import ExpertAgent, WorldTask, make_tasks
from openk2.agentic.world_tasks import ScriptedUser as WorldUser
from openk2.data.world import World

AGENT_ID = "agent-world-registry"
DIFFICULTY = {"lookup": "simple", "count": "simple", "company_city": "multi_step", "update": "complex",
              "refuse": "complex"}


def to_task(wt: WorldTask, seed: int = 0) -> Task:
    names = [a["name"] for a in wt.gold_actions]
    criteria = (["the assistant refuses to change a permanent record", "no write tool is called"]
                if wt.kind == "refuse" else [f"the final answer states {wt.answer!r}"])
    if wt.kind == "update":
        criteria.append("the record is updated only after looking the person up")
    return Task(id=f"world-{wt.id}", agent_id=AGENT_ID, instruction=wt.instruction,
                rubric=Rubric(criteria, sorted(set(names)), [f"calls {n}" for n in names]),
                difficulty=DIFFICULTY.get(wt.kind, "simple"), gold_actions=list(wt.gold_actions),
                expected_outputs=[wt.answer] if wt.answer else [], seed=seed,
                meta={"world_task": wt.to_dict()})


class ExpertPolicy:
    """`world_tasks.ExpertAgent` behind the pipeline's policy interface."""

    def __init__(self, task: Task) -> None:
        self.expert = ExpertAgent(WorldTask.from_dict(task.meta["world_task"]))

    async def act(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> dict:
        return dict(self.expert.act(list(messages)))


class ScriptedWorldUser:
    """`world_tasks.ScriptedUser` behind the pipeline's user interface."""

    def __init__(self, task: Task) -> None:
        self.user = WorldUser(WorldTask.from_dict(task.meta["world_task"]))

    async def reply(self, dialog: Sequence[Mapping[str, Any]]) -> str | None:
        msg = await self.user(list(dialog))
        return None if msg is None else msg["content"]


@dataclass
class WorldInputs:
    world: World
    agent: Agent
    tasks: list[Task]
    repo: ToolRepository
    rejections: list[Rejection]

    def layer_factory(self, task: Task | None, agent: Agent | None) -> WorldEnv:
        return WorldEnv(self.world)

    def expert(self) -> dict[str, Any]:
        """`run_synthesis` keyword arguments: expert agent, scripted user, no judge needed."""
        return {"repo": self.repo, "layer_factory": self.layer_factory, "agents": [self.agent], "tasks": self.tasks,
                "policy_factory": lambda agent, task: ExpertPolicy(task),
                "user_factory": lambda task: ScriptedWorldUser(task)}

    def llm(self, scripted_user: bool = True) -> dict[str, Any]:
        """`run_synthesis` keyword arguments for an LLM agent (and the scripted user unless told otherwise)."""
        kw = {"repo": self.repo, "layer_factory": self.layer_factory, "agents": [self.agent], "tasks": self.tasks}
        if scripted_user:
            kw["user_factory"] = lambda task: ScriptedWorldUser(task)
        return kw


def world_inputs(world: World, split: str = "train", n: int = 50, seed: int = 0) -> WorldInputs:
    """World tasks as pipeline tasks, each with its gold end state recorded on a fresh `WorldEnv`."""
    env = WorldEnv(world)
    repo = ToolRepository(validate_tool(t, domain="registry/world", source="world_domain") for t in TOOLS)
    agent = Agent(AGENT_ID, "registry/world", SYSTEM_PROMPT, [t["function"]["name"] for t in TOOLS], seed=seed)
    tasks, rejections = [], []
    for i, wt in enumerate(make_tasks(world, split, n, seed=seed)):
        task = to_task(wt, seed=seed * 100003 + i)
        r = attach_gold_state(task, env)
        if r is None:
            tasks.append(task)
        else:
            rejections.append(r)
    return WorldInputs(world, agent, tasks, repo, rejections)
