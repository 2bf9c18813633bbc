"""Tasks with rubrics (K2 §3.1.1 stage 2) and, where tools are executable, gold actions and end state (APIGen-MT).

A `Task` is what a user wants from an agent: the `instruction` (the user simulator's goal), a `persona`, the
`user_facts` the user knows and discloses only when asked (gradual disclosure), a difficulty ("simple": one tool
call; "multi_step": several calls; "complex": several calls that depend on each other, or a clarification),
and a `Rubric`: success criteria, the expected tool-use pattern (tools that must be called) and checkpoints.
Where the tool layer is executable, the task carries `gold_actions` (the reference calls) and `attach_gold_state`
runs them on a fresh layer to record `expected_state`: a trajectory passes only if it leaves the same state.

`generate_tasks` asks an LLM for tasks per difficulty level and checks each (`check_task`): rubric present,
expected tools and gold actions name the agent's tools, gold arguments satisfy the tool schemas. A task that
fails, or a reply that is not JSON, becomes a `Rejection` with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from openk2.agentic.agents import Agent
from openk2.agentic.common import Rejection, ReplyError, parse_json_reply, stable_hash
from openk2.agentic.tools import ToolSpec, validate_arguments
from openk2.llm import LLMClient, LLMError

DIFFICULTIES = ("simple", "multi_step", "complex")
_LEVELS = {"simple": "a single tool call answers it",
           "multi_step": "it needs two or three tool calls",
           "complex": "it needs several tool calls where later calls use earlier results, and the user must "
                      "be asked for a detail that is not in the first message"}


@dataclass
class Rubric:
    success_criteria: list[str]
    expected_tools: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rubric:
        def strings(v: Any) -> list[str]:  # a lone string is one item, not a list of characters
            return [v] if isinstance(v, str) and v else [str(x) for x in v] if isinstance(v, list) else []

        return cls(strings(d.get("success_criteria")), strings(d.get("expected_tools")), strings(d.get("checkpoints")))


@dataclass
class Task:
    id: str
    agent_id: str
    instruction: str
    rubric: Rubric
    difficulty: str = "simple"
    persona: str = ""
    user_facts: dict[str, Any] = field(default_factory=dict)
    gold_actions: list[dict[str, Any]] | None = None  # [{"name", "arguments"}]
    expected_state: dict[str, Any] | None = None
    expected_outputs: list[str] = field(default_factory=list)  # must appear in the agent's final answer
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Task:
        d = dict(d)
        d["rubric"] = Rubric.from_dict(d.get("rubric") or {})
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def check_task(task: Task, tools: Mapping[str, ToolSpec]) -> list[str]:
    """Why the task is unusable ([] when it is fine)."""
    problems = []
    if not task.instruction.strip():
        problems.append("empty instruction")
    if not task.rubric.success_criteria:
        problems.append("rubric has no success criteria")
    problems += [f"rubric expects unknown tool {t!r}" for t in task.rubric.expected_tools if t not in tools]
    if task.difficulty not in DIFFICULTIES:
        problems.append(f"unknown difficulty {task.difficulty!r}")
    for i, action in enumerate(task.gold_actions or []):
        if not isinstance(action, Mapping) or not isinstance(action.get("name"), str):
            problems.append(f"gold action {i} is not {{name, arguments}}")
        elif action["name"] not in tools:
            problems.append(f"gold action {i} calls unknown tool {action['name']!r}")
        else:
            problems += [f"gold action {i} ({action['name']}): {e}"
                         for e in validate_arguments(tools[action["name"]], action.get("arguments", {}))]
    return problems


def is_error_result(text: str) -> bool:
    """The tool-layer convention: a failed call returns text starting with "Error"."""
    return text.lstrip().lower().startswith("error")


def attach_gold_state(task: Task, layer: Any) -> Rejection | None:
    """Run the gold actions on a reset executable layer and record the end state; reject if one fails."""
    if task.gold_actions is None:
        return None
    layer.reset()
    try:
        for i, action in enumerate(task.gold_actions):
            result = layer.call(action["name"], dict(action.get("arguments") or {}))
            if is_error_result(result):
                return Rejection("tasks", task.id, f"gold action {i} ({action['name']}) failed: {result[:200]}")
        task.expected_state = layer.state()
    finally:
        layer.reset()
    return None


TASK_REQUEST = """You design evaluation tasks for an AI assistant. Its system prompt:
---
{system_prompt}
---
Its tools (OpenAI JSON schemas): {tools}

Write {n} distinct {difficulty} tasks ({level}). For each task give:
- "instruction": what the user wants, written as the user's goal (second person, e.g. "You want to ...");
- "persona": one sentence about who the user is and how they talk;
- "user_facts": details only the user knows (names, ids, dates), revealed when the assistant asks;
- "rubric": {{"success_criteria": [...], "expected_tools": [tool names that must be called], "checkpoints": [...]}};
- "gold_actions": the tool calls that solve it, [{{"name": ..., "arguments": {{...}}}}];
- "expected_outputs": short strings the final answer must contain (may be empty).
Reply with JSON only: {{"tasks": [...]}}"""


async def generate_tasks(client: LLMClient, agent: Agent, specs: Sequence[ToolSpec], *, per_level: int = 1,
                         difficulties: Sequence[str] = DIFFICULTIES, model: str | None = None,
                         **params: Any) -> tuple[list[Task], list[Rejection]]:
    """LLM-written tasks for one agent, `per_level` per difficulty, each checked; rejections say why."""
    tools = {s.name: s for s in specs}
    schemas = json.dumps([s.to_openai() for s in specs], ensure_ascii=False)
    tasks: list[Task] = []
    rejections: list[Rejection] = []
    for level in difficulties:
        item = f"{agent.id}/{level}"
        prompt = TASK_REQUEST.format(system_prompt=agent.system_prompt, tools=schemas, n=per_level,
                                     difficulty=level, level=_LEVELS.get(level, level))
        try:
            reply = await client.chat([{"role": "user", "content": prompt}], model=model, seed=agent.seed, **params)
            data = parse_json_reply(reply.content, (dict, list))
            raw_tasks = data.get("tasks") if isinstance(data, dict) else data
            if not isinstance(raw_tasks, list) or not raw_tasks:
                raise ReplyError("reply has no 'tasks' list")
        except (LLMError, ReplyError) as e:
            rejections.append(Rejection("tasks", item, str(e)))
            continue
        for j, raw in enumerate(raw_tasks[:per_level]):
            try:
                if not isinstance(raw, Mapping):
                    raise ReplyError(f"task is a {type(raw).__name__}, not an object")
                gold = raw.get("gold_actions")
                task = Task(id=f"{agent.id}-{level}-{j}-{stable_hash(raw, 8)}", agent_id=agent.id,
                            instruction=str(raw.get("instruction") or ""),
                            rubric=Rubric.from_dict(raw.get("rubric") if isinstance(raw.get("rubric"), Mapping)
                                                    else {}),
                            difficulty=level, persona=str(raw.get("persona") or ""),
                            user_facts=dict(raw.get("user_facts") or {}) if isinstance(raw.get("user_facts"), Mapping)
                            else {},
                            gold_actions=list(gold) if isinstance(gold, list) and gold else None,
                            expected_outputs=[str(x) for x in (raw.get("expected_outputs") if isinstance(
                                raw.get("expected_outputs"), list) else []) if isinstance(x, (str, int, float))],
                            seed=agent.seed + len(tasks) + 1, meta={"model": reply.model or model or client.model})
            except (ReplyError, TypeError, ValueError) as e:
                rejections.append(Rejection("tasks", f"{item}/{j}", str(e)))
                continue
            problems = check_task(task, tools)
            if problems:
                rejections.append(Rejection("tasks", task.id, "; ".join(problems)))
            else:
                tasks.append(task)
    return tasks, rejections
