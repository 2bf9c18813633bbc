"""Multi-turn simulation: agent <-> user simulator <-> tool layer (K2 §3.1.1 stage 3, Fig. 8b).

Tool layers. Any object with this interface (shared with the world domain, `openk2.agentic.world_domain`):

    tools() -> list[dict]                    OpenAI tool schemas
    call(tool_name, arguments: dict) -> str  the result text, or text starting with "Error" (never raises for a
                                             model's bad call: unknown tool, wrong arguments)
    state() -> dict                          JSON-ready state, compared with a task's gold end state
    reset()                                  back to the initial state

An async `acall(tool_name, arguments)` is used instead of `call` when present. Two implementations here:
`PythonToolLayer` executes Python functions (a parameter named `state` receives the layer's mutable state dict),
and `LLMToolSimulator`, K2's tool simulator "functionally equivalent to a world model": an LLM answers each call
from the tool schemas, the call history and a JSON state that it updates and that persists across calls.
Before asking the LLM, the simulator draws the outcome of the call from a seeded RNG (`FailureRates`): a
success, a partial failure (some of what was asked fails or is missing), an edge case (an empty, boundary or
unusual but valid answer) or an error (a transient failure, answered without the LLM, state unchanged).
Unknown tools and arguments that break the schema are answered with an error without the LLM.

Users: `LLMUser` role-plays the task's persona, opens with part of the request and discloses `user_facts` only
when asked (gradual disclosure); it ends the dialog with "###STOP###". `ScriptedUser` replays fixed turns.
Agents: `LLMAgent` is the model under a system prompt with tools; `ScriptedAgent` replays fixed messages.

`simulate` runs one task and returns a `Trajectory`; any failure inside (an LLM error, a non-JSON simulator
reply) ends that trajectory with `status="error"` and the reason, so the run goes on.
"""

from __future__ import annotations

import copy
import json
import random
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from openk2.agentic.agents import Agent
from openk2.agentic.common import ReplyError, parse_json_reply
from openk2.agentic.mcp_import import describe_error, tool_from_callable
from openk2.agentic.tasks import Task
from openk2.agentic.tools import ToolSpec, validate_arguments
from openk2.llm import LLMClient

STOP = "###STOP###"


@runtime_checkable
class ToolLayer(Protocol):
    def tools(self) -> list[dict[str, Any]]: ...
    def call(self, tool_name: str, arguments: dict[str, Any]) -> str: ...
    def state(self) -> dict[str, Any]: ...
    def reset(self) -> None: ...


def _check_call(specs: Mapping[str, ToolSpec], name: str, arguments: Any) -> str | None:
    if name not in specs:
        return f"Error: unknown tool {name!r}; available: {', '.join(sorted(specs))}"
    errors = validate_arguments(specs[name], arguments)
    if errors:
        return f"Error: invalid arguments for {name}: " + "; ".join(errors)
    return None


class PythonToolLayer:
    """An executable tool layer over Python functions (schemas from signatures and docstrings)."""

    def __init__(self, functions: Sequence[Callable[..., Any]], initial_state: Mapping[str, Any] | None = None,
                 domain: str = "general") -> None:
        self._functions = {f.__name__: f for f in functions}
        self.specs = {f.__name__: tool_from_callable(f, domain=domain) for f in functions}
        self._initial = copy.deepcopy(dict(initial_state or {}))
        self._state = copy.deepcopy(self._initial)

    def tools(self) -> list[dict[str, Any]]:
        return [s.to_openai() for s in self.specs.values()]

    def call(self, tool_name: str, arguments: dict[str, Any]) -> str:
        error = _check_call(self.specs, tool_name, arguments)
        if error:
            return error
        fn = self._functions[tool_name]
        kwargs = dict(arguments)
        if "state" in self._param_names(fn):
            kwargs["state"] = self._state
        try:
            result = fn(**kwargs)
        except Exception as e:  # the tool's own failure is the call's result
            return f"Error: {type(e).__name__}: {e}"
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)

    @staticmethod
    def _param_names(fn: Callable[..., Any]) -> set[str]:
        import inspect

        return set(inspect.signature(fn).parameters)

    def state(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def reset(self) -> None:
        self._state = copy.deepcopy(self._initial)


@dataclass
class FailureRates:
    """Probabilities of the simulated outcomes of a call (the rest is success)."""

    partial: float = 0.1
    edge: float = 0.1
    error: float = 0.05

    def __post_init__(self) -> None:
        if min(self.partial, self.edge, self.error) < 0 or self.partial + self.edge + self.error > 1:
            raise ValueError(f"failure rates must be >= 0 and sum to <= 1: {self}")

    def draw(self, rng: random.Random) -> str:
        x = rng.random()
        for outcome, p in (("error", self.error), ("partial", self.partial), ("edge", self.edge)):
            if x < p:
                return outcome
            x -= p
        return "success"


OUTCOME_INSTRUCTIONS = {
    "success": "The call succeeds. Return a realistic, complete result.",
    "partial": "The call partially fails: part of what was asked is done or returned, part is missing or "
               "failed; say which in the result.",
    "edge": "Return an edge case: a valid but unusual answer (empty result, boundary value, ambiguous match, "
            "a warning) that a careful assistant must handle.",
}
TRANSIENT_ERRORS = ("Error: service temporarily unavailable (503); try again later.",
                    "Error: the request timed out.",
                    "Error: rate limit exceeded; retry after a few seconds.")
TOOL_SIM_SYSTEM = """You simulate the backend of these tools, consistently, like a real system with a database:
{tools}
Current state of the backend (JSON): {state}
Keep results consistent with the state and with earlier calls; update the state to reflect what this call \
changes (create, modify, delete), and keep it unchanged for read-only calls.
Reply with JSON only: {{"result": <the tool's output: a JSON value or text>, "state": <the full updated state>}}"""


class LLMToolSimulator:
    """A stateful LLM tool layer with seeded failure injection (see the module docstring)."""

    def __init__(self, client: LLMClient, specs: Sequence[ToolSpec], *, seed: int = 0,
                 rates: FailureRates | None = None, initial_state: Mapping[str, Any] | None = None,
                 model: str | None = None, history: int = 12, **params: Any) -> None:
        self.client, self.model, self.params = client, model, params
        self.specs = {s.name: s for s in specs}
        self.seed = seed
        self.rates = rates or FailureRates()
        self.history_len = history
        self._initial = copy.deepcopy(dict(initial_state or {}))
        self.reset()

    def reset(self) -> None:
        self._state = copy.deepcopy(self._initial)
        self.history: list[dict[str, Any]] = []
        self.outcomes: list[str] = []
        self._n = 0

    def tools(self) -> list[dict[str, Any]]:
        return [s.to_openai() for s in self.specs.values()]

    def state(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def call(self, tool_name: str, arguments: dict[str, Any]) -> str:
        raise TypeError("LLMToolSimulator is asynchronous: use `await acall(...)`")

    async def acall(self, tool_name: str, arguments: dict[str, Any]) -> str:
        index = self._n
        self._n += 1
        error = _check_call(self.specs, tool_name, arguments)
        if error:
            self.outcomes.append("invalid")
            return self._record(tool_name, arguments, error, "invalid")
        rng = random.Random(f"{self.seed}:{index}")  # per-call RNG: outcomes do not depend on timing
        outcome = self.rates.draw(rng)
        self.outcomes.append(outcome)
        if outcome == "error":
            return self._record(tool_name, arguments, rng.choice(TRANSIENT_ERRORS), outcome)
        system = TOOL_SIM_SYSTEM.format(tools=json.dumps(list(self.tools()), ensure_ascii=False),
                                        state=json.dumps(self._state, ensure_ascii=False))
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
        for h in self.history[-self.history_len:]:
            messages += [{"role": "user", "content": json.dumps({"tool": h["tool"], "arguments": h["arguments"]},
                                                                ensure_ascii=False)},
                         {"role": "assistant", "content": h["result"]}]
        messages.append({"role": "user", "content": json.dumps({"tool": tool_name, "arguments": arguments},
                                                               ensure_ascii=False)
                         + "\nOutcome to simulate: " + OUTCOME_INSTRUCTIONS[outcome]})
        reply = await self.client.chat(messages, model=self.model, seed=self.seed + index, **self.params)
        data = parse_json_reply(reply.content, dict)  # ReplyError ends the trajectory with its reason
        if "result" not in data:
            raise ReplyError(f"tool simulator reply has no 'result': {str(reply.content)[:120]!r}")
        if isinstance(data.get("state"), dict):
            self._state = data["state"]
        result = data["result"]
        text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
        return self._record(tool_name, arguments, text, outcome)

    def _record(self, tool: str, arguments: Any, result: str, outcome: str) -> str:
        self.history.append({"tool": tool, "arguments": arguments, "result": result, "outcome": outcome})
        return result


# ---- users ------------------------------------------------------------------------------------------------------

USER_SYSTEM = """You play a user talking to an AI assistant. Stay in character; never act as the assistant.
Persona: {persona}
Your goal: {instruction}
Details you know (reveal each one only when the assistant asks for it or it is clearly needed): {facts}
Start with a short request that does not give every detail at once. Answer the assistant's questions briefly.
When your goal is achieved, or it clearly cannot be, reply with {stop} alone."""


class LLMUser:
    def __init__(self, client: LLMClient, task: Task, *, model: str | None = None, **params: Any) -> None:
        self.client, self.task, self.model, self.params = client, task, model, params
        self.system = USER_SYSTEM.format(persona=task.persona or "an ordinary customer",
                                         instruction=task.instruction,
                                         facts=json.dumps(task.user_facts, ensure_ascii=False), stop=STOP)

    async def reply(self, dialog: Sequence[Mapping[str, Any]]) -> str | None:
        """The user's next message given the dialog so far (agent's view), or None to end it."""
        flipped: list[dict[str, Any]] = [{"role": "system", "content": self.system}]
        for m in dialog:
            if m.get("role") == "user":
                flipped.append({"role": "assistant", "content": m.get("content") or ""})
            elif m.get("role") == "assistant" and m.get("content"):
                flipped.append({"role": "user", "content": m["content"]})
        if len(flipped) == 1:
            flipped.append({"role": "user", "content": "(The assistant is waiting for your first message.)"})
        reply = await self.client.chat(flipped, model=self.model, seed=self.task.seed + len(flipped), **self.params)
        text = (reply.content or "").strip()
        if not text:
            raise ReplyError("user simulator returned an empty message")
        if STOP in text:
            return None
        return text


class ScriptedUser:
    def __init__(self, turns: Sequence[str]) -> None:
        self.turns = list(turns)

    async def reply(self, dialog: Sequence[Mapping[str, Any]]) -> str | None:
        n_user = sum(1 for m in dialog if m.get("role") == "user")
        return self.turns[n_user] if n_user < len(self.turns) else None


# ---- agents -----------------------------------------------------------------------------------------------------

class LLMAgent:
    """The model under test: one chat request per step, with the tools. With `seed`, step k samples with seed
    `seed + k`, so a fresh run (no cache) reproduces on a server with seeded sampling."""

    def __init__(self, client: LLMClient, *, model: str | None = None, seed: int | None = None,
                 **params: Any) -> None:
        self.client, self.model, self.seed, self.params = client, model, seed, params

    async def act(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        params = dict(self.params)
        if self.seed is not None:
            params.setdefault("seed", self.seed + sum(m.get("role") == "assistant" for m in messages))
        reply = await self.client.chat(messages, tools=tools, model=self.model, **params)
        msg = dict(reply.message)
        msg.setdefault("content", None)
        return {k: v for k, v in msg.items() if k in ("role", "content", "tool_calls")}


class ScriptedAgent:
    def __init__(self, steps: Sequence[Mapping[str, Any]]) -> None:
        self.steps = [dict(s) for s in steps]
        self.i = 0

    async def act(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        step = self.steps[min(self.i, len(self.steps) - 1)]
        self.i += 1
        return copy.deepcopy(step)


# ---- the loop ---------------------------------------------------------------------------------------------------

@dataclass
class Trajectory:
    id: str
    task_id: str
    agent_id: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    status: str = "done"  # "done" | "error"
    error: str | None = None
    stop_reason: str = ""  # "user_stop" | "max_turns" | "error"
    calls: list[dict[str, Any]] = field(default_factory=list)  # {"name", "arguments", "result", "error"}
    final_state: dict[str, Any] | None = None
    models: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    trace: str = ""  # the end of the traceback when status is "error"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Trajectory:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _parse_arguments(raw: Any) -> tuple[Any, str | None]:
    if isinstance(raw, Mapping):
        return dict(raw), None
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return raw, f"Error: arguments are not valid JSON: {str(raw)[:80]!r}"
    if not isinstance(value, dict):
        return value, "Error: arguments must be a JSON object"
    return value, None


async def simulate(task: Task, agent: Agent, policy: Any, user: Any, layer: Any, *, tools: Sequence[Mapping]
                   | None = None, max_turns: int = 6, max_steps: int = 6, models: Mapping[str, str] | None = None,
                   first_message: str | None = None) -> Trajectory:
    """One dialog: the user opens, the agent answers (calling tools up to `max_steps` times per turn), until the
    user stops or `max_turns` user turns have passed. Never raises for a failure inside the dialog."""
    tools = list(tools if tools is not None else layer.tools())
    traj = Trajectory(id=f"traj-{task.id}", task_id=task.id, agent_id=agent.id,
                      messages=[{"role": "system", "content": agent.system_prompt}], tools=tools,
                      models=dict(models or {}), seed=task.seed)
    messages = traj.messages
    try:
        layer.reset()
        opening = first_message if first_message is not None else await user.reply(messages)
        if opening is None:
            raise ReplyError("the user simulator ended the dialog before saying anything")
        messages.append({"role": "user", "content": opening})
        traj.stop_reason = "max_turns"
        for _turn in range(max_turns):
            for _step in range(max_steps):
                msg = await policy.act(messages, tools)
                msg["role"] = "assistant"
                messages.append(msg)
                calls = msg.get("tool_calls") or []
                if not calls:
                    break
                for call in calls:
                    fn = call.get("function") or {}
                    name = str(fn.get("name"))
                    arguments, error = _parse_arguments(fn.get("arguments"))
                    if error is None:
                        acall = getattr(layer, "acall", None)
                        result = await acall(name, arguments) if acall else layer.call(name, arguments)
                    else:
                        result = error
                    traj.calls.append({"name": name, "arguments": arguments, "result": result,
                                       "error": result.lstrip().lower().startswith("error")})
                    messages.append({"role": "tool", "tool_call_id": call.get("id"), "content": result})
            reply = await user.reply(messages)
            if reply is None:
                traj.stop_reason = "user_stop"
                break
            messages.append({"role": "user", "content": reply})
        traj.final_state = layer.state()
    except Exception as e:
        traj.status, traj.stop_reason = "error", "error"
        traj.error = describe_error(e)
        traj.trace = traceback.format_exc(limit=3)[-800:]
    return traj
