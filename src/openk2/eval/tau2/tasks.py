"""τ²-bench task files: the typed task schema (v0.1.0), loading, splits and the data paths.

A task that does not match the schema raises `BenchmarkDataError` naming the file, the task id and the field.
"""

from __future__ import annotations

import json
import textwrap
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from openk2.eval.task import BenchmarkDataError

DOMAINS = ("airline", "retail", "telecom")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[4].parent / "shared" / "data"
RewardType = Literal["DB", "ENV_ASSERTION", "NL_ASSERTION", "ACTION", "COMMUNICATE"]
Requestor = Literal["user", "assistant"]


class StructuredUserInstructions(BaseModel):
    domain: str
    reason_for_call: str
    known_info: str | None = None
    unknown_info: str | None = None
    task_instructions: str

    def __str__(self) -> str:  # the reference's layout of the user simulator's scenario
        lines = [f"Domain: {self.domain}", f"Reason for call:\n{textwrap.indent(self.reason_for_call, chr(9))}"]
        if self.known_info is not None:
            lines.append(f"Known info:\n{textwrap.indent(self.known_info, chr(9))}")
        if self.unknown_info is not None:
            lines.append(f"Unknown info:\n{textwrap.indent(self.unknown_info, chr(9))}")
        lines.append(f"Task instructions:\n{textwrap.indent(self.task_instructions, chr(9))}")
        return "\n".join(lines)


class UserScenario(BaseModel):
    persona: str | None = None
    instructions: StructuredUserInstructions | str

    def __str__(self) -> str:
        lines = []
        if self.persona is not None:
            lines += ["Persona:", textwrap.indent(self.persona, "\t")]
        lines += ["Instructions:", textwrap.indent(str(self.instructions), "\t")]
        return "\n".join(lines)


class Action(BaseModel):
    action_id: str
    requestor: Requestor = "assistant"
    name: str
    arguments: dict[str, Any]
    info: str | None = None
    compare_args: list[str] | None = None

    def matches(self, name: str, arguments: dict[str, Any]) -> bool:
        """The reference's comparison: same name, and equal values on `compare_args` (all of the call's
        arguments when None; always true when empty)."""
        if self.name != name:
            return False
        keys = list(arguments) if self.compare_args is None else self.compare_args
        if not keys:
            return True
        return ({k: v for k, v in arguments.items() if k in keys}
                == {k: v for k, v in self.arguments.items() if k in keys})


class EnvFunctionCall(BaseModel):
    env_type: Requestor
    func_name: str
    arguments: dict[str, Any]


class EnvAssertion(EnvFunctionCall):
    assert_value: bool = True
    message: str | None = None


class EvaluationCriteria(BaseModel):
    actions: list[Action] | None = None
    env_assertions: list[EnvAssertion] | None = None
    communicate_info: list[str] | None = None
    nl_assertions: list[str] | None = None
    reward_basis: list[RewardType] = Field(default_factory=lambda: ["DB", "COMMUNICATE"])


class InitializationData(BaseModel):
    agent_data: dict[str, Any] | None = None
    user_data: dict[str, Any] | None = None


class InitialState(BaseModel):
    initialization_data: InitializationData | None = None
    initialization_actions: list[EnvFunctionCall] | None = None
    message_history: list[dict[str, Any]] | None = None


class Task(BaseModel):
    id: str
    description: dict[str, Any] | None = None
    user_scenario: UserScenario
    ticket: str | None = None
    initial_state: InitialState | None = None
    evaluation_criteria: EvaluationCriteria | None = None
    annotations: dict[str, Any] | None = None


def domain_dir(domain: str, data_dir: Path | None = None) -> Path:
    if domain not in DOMAINS:
        raise ValueError(f"unknown tau2 domain {domain!r}; valid: {', '.join(DOMAINS)}")
    return Path(data_dir or DEFAULT_DATA_DIR) / "tau2" / "domains" / domain


def parse_task(raw: Any, source: str) -> Task:
    task_id = raw.get("id", "?") if isinstance(raw, dict) else "?"
    try:
        task = Task.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise BenchmarkDataError(f"{source}: task {task_id!r}: field {field}: {err['msg']}") from None
    if task.initial_state and task.initial_state.message_history:
        raise BenchmarkDataError(f"{source}: task {task_id!r}: field initial_state.message_history: "
                                 "message histories are not supported (no v0.1.0 task has one)")
    return task


@cache
def _load_tasks(path: str) -> tuple[Task, ...]:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchmarkDataError(f"{path}: {e}") from None
    if isinstance(raw, dict) and "tasks" in raw:
        raw = raw["tasks"]
    if not isinstance(raw, list):
        raise BenchmarkDataError(f"{path}: expected a list of tasks")
    return tuple(parse_task(item, path) for item in raw)


def load_tasks(domain: str, data_dir: Path | None = None, split: str | None = None) -> list[Task]:
    """The domain's tasks (all 278 = airline 50, retail 114, telecom 114), or those of one split (train/test/base)."""
    tasks = list(_load_tasks(str(domain_dir(domain, data_dir) / "tasks.json")))
    if split is None:
        return tasks
    ids = load_splits(domain, data_dir)
    if split not in ids:
        raise ValueError(f"unknown split {split!r} for {domain}; valid: {', '.join(ids)}")
    keep = set(ids[split])
    return [t for t in tasks if t.id in keep]


def load_splits(domain: str, data_dir: Path | None = None) -> dict[str, list[str]]:
    path = domain_dir(domain, data_dir) / "split_tasks.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchmarkDataError(f"{path}: {e}") from None


def get_task(domain: str, task_id: str, data_dir: Path | None = None) -> Task:
    for task in load_tasks(domain, data_dir):
        if task.id == task_id:
            return task
    raise KeyError(f"no task {task_id!r} in tau2 {domain}")
