"""Scripted participants for tests and smoke runs: a user that replays a transcript, and an oracle agent/user
pair that performs a task's gold actions in order (agent side by the agent, user side by the user) and then
communicates the task's `communicate_info`."""

from __future__ import annotations

import json
from typing import Any

from openk2.eval.task import ChatFn, Message
from openk2.eval.tau2.orchestrator import STOP
from openk2.eval.tau2.tasks import Task


def tool_call(name: str, arguments: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def scripted_user(turns: list[str | dict[str, Any]]) -> ChatFn:
    """A user that says (or, for dict turns `{"name", "arguments"}`, calls) the given turns in order, then
    ###STOP###."""
    queue = list(turns)

    async def chat(messages: list[Message], tools: list[dict[str, Any]] | None) -> Message:
        if not queue:
            return {"role": "assistant", "content": STOP}
        turn = queue.pop(0)
        if isinstance(turn, dict):
            return {"role": "assistant", "content": None,
                    "tool_calls": [tool_call(turn["name"], turn.get("arguments", {}), f"u{len(queue)}")]}
        return {"role": "assistant", "content": turn}

    return chat


def oracle_pair(task: Task) -> tuple[ChatFn, ChatFn]:
    """(agent, user) ChatFns sharing a cursor over the task's gold actions."""
    actions = list(task.evaluation_criteria.actions or []) if task.evaluation_criteria else []
    info = list(task.evaluation_criteria.communicate_info or []) if task.evaluation_criteria else []
    state = {"i": 0, "told": False, "n": 0}

    def next_call() -> dict[str, Any]:
        action = actions[state["i"]]
        state["i"] += 1
        state["n"] += 1
        return tool_call(action.name, dict(action.arguments), f"c{state['n']}")

    async def agent(messages: list[Message], tools: list[dict[str, Any]] | None) -> Message:
        if state["i"] < len(actions) and actions[state["i"]].requestor == "assistant":
            return {"role": "assistant", "content": None, "tool_calls": [next_call()]}
        if state["i"] < len(actions):
            return {"role": "assistant", "content": "Please do the next step on your phone."}
        state["told"] = True
        return {"role": "assistant", "content": "Done. " + " ".join(info)}

    async def user(messages: list[Message], tools: list[dict[str, Any]] | None) -> Message:
        if state["i"] < len(actions) and actions[state["i"]].requestor == "user":
            return {"role": "assistant", "content": None, "tool_calls": [next_call()]}
        if state["told"]:
            return {"role": "assistant", "content": f"Thanks! {STOP}"}
        return {"role": "assistant", "content": "I need help with my request."}

    return agent, user
