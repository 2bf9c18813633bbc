"""Checkable tasks in the world domain, a programmatic expert agent, a scripted user, and the episode loop that
runs any agent (the expert, a model behind an OpenAI-style chat call) against `WorldEnv`.

    tasks = make_tasks(world, "heldout", n=40, seed=0)     # held-out people: never in a pretraining document
    episode = asyncio.run(run_episode(WorldEnv(world), task, ExpertAgent(task)))
    score_episode(world, task, episode.messages)            # -> (1.0, details): answer and end state checked
    records = synthesize(world, "train", n=400, seed=0)     # SFT JSONL records (OpenAI messages + tools)

Task kinds, simple to complex (`KINDS`): `lookup` (one read), `count` (one aggregate read), `company_city` (two
chained reads), `update` (read, then a policy-checked write; end state checked), `refuse` (the policy forbids the
write: the agent must refuse and leave the database unchanged). Each task carries its gold actions (the APIGen-MT
blueprint), the expected answer text, and so its expected end state (gold actions replayed on a fresh database).

Splits: "train" tasks are about `world.train_people` (in the pretraining documents); "heldout" tasks about
`world.heldout_people`, whom no document mentions, so only the tools can answer them. Count tasks take values from
disjoint halves of the cities / companies / fields per split.

Scoring (`score_episode`) replays the transcript's tool calls on a fresh `WorldEnv` and compares the end state's
hash with the gold one (tau2-bench's DB check), then checks the final assistant message for the expected answer
(tau2-bench's COMMUNICATE check). Reward = both.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from openk2.agentic.world_domain import SYSTEM_PROMPT, TOOLS, WRITE_TOOLS, WorldEnv
from openk2.data.world import World

Message = dict[str, Any]
ChatFn = Callable[[list[Message], list[dict[str, Any]] | None], Awaitable[Message]]
UserFn = Callable[[list[Message]], Awaitable[Message | None]]

KINDS: tuple[str, ...] = ("lookup", "count", "company_city", "update", "refuse")
#: Default mix of task kinds (weights); lookups dominate, as simple tasks should.
KIND_WEIGHTS: dict[str, float] = {"lookup": 0.4, "count": 0.15, "company_city": 0.15, "update": 0.2, "refuse": 0.1}
SPLITS = ("train", "heldout")

_QUESTIONS = {
    "birth_city": ("In which city was {name} born?", "Where was {name} born?"),
    "birth_date": ("When was {name} born?", "What is the birth date of {name}?"),
    "university": ("Which university did {name} attend?", "Where did {name} go to university?"),
    "field": ("What did {name} study?", "What is the field of study of {name}?"),
    "employer": ("Where does {name} work?", "Who is the employer of {name}?"),
    "hobby": ("What is the hobby of {name}?", "What does {name} do for fun?"),
}
_ANSWERS = {
    "birth_city": "{name} was born in {value}.", "birth_date": "{name} was born on {value}.",
    "university": "{name} attended {value}.", "field": "{name} studied {value}.",
    "employer": "{name} works at {value}.", "hobby": "The hobby of {name} is {value}.",
}
_COUNT_QUESTIONS = {
    "birth_city": "How many people were born in {value}?", "employer": "How many people work at {value}?",
    "field": "How many people studied {value}?",
}
_UPDATE_REQUESTS = {
    "employer": ("{name} now works at {value}. Please update the record.",
                 "Please record that {name} has moved to {value}."),
    "hobby": ("{name} has taken up {value}. Please update the record.",
              "Please change the hobby of {name} to {value}."),
}
_REFUSE_REQUESTS = {
    "birth_city": "Please change the birth city of {name} to {value}.",
    "university": "Please change the university of {name} to {value}.",
    "field": "Please change the field of study of {name} to {value}.",
}
_ATTR_WORDS = {"birth_city": "birth city", "university": "university", "field": "field of study"}


@dataclass
class WorldTask:
    """One task: what the user asks, the gold actions, and what a correct final answer must contain."""

    id: str
    kind: str
    split: str
    instruction: str  # the user's message
    gold_actions: list[dict[str, Any]]  # [{"name": tool, "arguments": {...}}], in order
    answer: str  # must appear in the final assistant message (case-insensitive); "" = no text check
    person: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # kind-specific (attribute, value, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldTask:
        return cls(**d)


def _split_values(values: Sequence[str], split: str) -> list[str]:
    return [v for i, v in enumerate(values) if (i % 2 == 1) == (split == "heldout")]


def make_tasks(world: World, split: str, n: int, seed: int = 0,
               kinds: dict[str, float] | None = None) -> list[WorldTask]:
    """`n` tasks of `split` ("train" or "heldout") drawn with `random.Random(f"{seed}/{split}")`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    weights = kinds or KIND_WEIGHTS
    unknown = set(weights) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown task kinds {sorted(unknown)}; kinds: {', '.join(KINDS)}")
    rng = random.Random(f"world-tasks/{world.seed}/{seed}/{split}")
    people = world.train_people if split == "train" else world.heldout_people
    env = WorldEnv(world)
    pools = {"birth_city": _split_values([c.name for c in world.cities], split),
             "employer": _split_values([c.name for c in world.companies], split),
             "field": _split_values(world.fields, split)}
    names, w = zip(*weights.items(), strict=True)
    tasks = []
    for i in range(n):
        kind = rng.choices(names, w)[0]
        person = rng.choice(people)
        tid = f"{split}-{seed}-{i}-{kind}"
        if kind == "lookup":
            attr = rng.choice(list(_QUESTIONS))
            value = person.answer(attr)
            tasks.append(WorldTask(tid, kind, split, rng.choice(_QUESTIONS[attr]).format(name=person.name),
                                   [_act("lookup", name=person.name, attribute=attr)], value, person.name,
                                   {"attribute": attr}))
        elif kind == "count":
            attr = rng.choice(list(_COUNT_QUESTIONS))
            value = rng.choice(pools[attr])
            count = env.call("count_people", {"attribute": attr, "value": value})
            tasks.append(WorldTask(tid, kind, split, _COUNT_QUESTIONS[attr].format(value=value),
                                   [_act("count_people", attribute=attr, value=value)], count, None,
                                   {"attribute": attr, "value": value}))
        elif kind == "company_city":
            company = world.company(person.employer)
            tasks.append(WorldTask(tid, kind, split, f"In which city is the employer of {person.name} based?",
                                   [_act("lookup", name=person.name, attribute="employer"),
                                    _act("company_info", company=company.name)], company.city, person.name))
        elif kind == "update":
            attr = rng.choice(("employer", "hobby"))
            choices = [c.name for c in world.companies] if attr == "employer" else list(world.hobbies)
            value = rng.choice([c for c in choices if c != person.answer(attr)])
            tasks.append(WorldTask(tid, kind, split, rng.choice(_UPDATE_REQUESTS[attr]).format(name=person.name,
                                                                                                value=value),
                                   [_act("lookup", name=person.name, attribute=attr),
                                    _act("update_record", name=person.name, attribute=attr, value=value)],
                                   value, person.name, {"attribute": attr, "value": value}))
        else:  # refuse
            attr = rng.choice(list(_REFUSE_REQUESTS))
            pool = {"birth_city": [c.name for c in world.cities], "university": [u.name for u in world.universities],
                    "field": list(world.fields)}[attr]
            value = rng.choice([v for v in pool if v != person.answer(attr)])
            tasks.append(WorldTask(tid, kind, split, _REFUSE_REQUESTS[attr].format(name=person.name, value=value),
                                   [], "cannot", person.name, {"attribute": attr, "value": value}))
    return tasks


def _act(tool: str, **arguments: str) -> dict[str, Any]:
    return {"name": tool, "arguments": arguments}


def gold_state_hash(world: World, task: WorldTask) -> str:
    env = WorldEnv(world)
    for a in task.gold_actions:
        env.call(a["name"], a["arguments"])
    return env.state_hash()


# ---------------------------------------------------------------------------------------------------------
# Agents and users


def _tool_results_since_user(messages: Sequence[Message]) -> list[str]:
    out: list[str] = []
    for m in reversed(messages):
        if m.get("role") == "user":
            break
        if m.get("role") == "tool":
            out.append(str(m.get("content") or ""))
    return out[::-1]


def _n_calls(messages: Sequence[Message]) -> int:
    return sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")


def tool_call_message(messages: Sequence[Message], name: str, arguments: dict[str, Any]) -> Message:
    """An assistant message calling one tool, with K2's id `functions.{name}:{idx}` (idx over the dialog)."""
    call_id = f"functions.{name}:{_n_calls(messages)}"
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


class ExpertAgent:
    """A programmatic expert for one task: follows the policy, calls the gold tools, and answers from what the tools
    returned (never from the task's stored answer). An async chat function: `await agent(messages, tools)`."""

    def __init__(self, task: WorldTask) -> None:
        self.task = task

    async def __call__(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> Message:
        return self.act(messages)

    def act(self, messages: Sequence[Message]) -> Message:
        t, results = self.task, _tool_results_since_user(messages)
        step = len(results)
        if step < len(t.gold_actions):
            action = t.gold_actions[step]
            args = dict(action["arguments"])
            if t.kind == "company_city" and step == 1:
                args["company"] = results[0]  # the employer the lookup returned
            return tool_call_message(messages, action["name"], args)
        if results and results[-1].startswith("Error"):
            return {"role": "assistant", "content": f"Sorry, I could not do that: {results[-1][7:]}"}
        p = t.params
        if t.kind == "lookup":
            text = _ANSWERS[p["attribute"]].format(name=t.person, value=results[-1])
        elif t.kind == "count":
            text = f"{results[-1]} people."
        elif t.kind == "company_city":
            city = results[-1].rsplit(" in ", 1)[-1]
            text = f"{results[0]} is based in {city}."
        elif t.kind == "update":
            text = f"Done: the {p['attribute']} of {t.person} is now {p['value']}."
        else:
            text = f"Sorry, the {_ATTR_WORDS[p['attribute']]} is a permanent record and cannot be changed."
        return {"role": "assistant", "content": text}


class ScriptedUser:
    """The user of one task: states the request, then ends the conversation after the agent's answer. An async
    user function: `await user(messages)` -> the next user message, or None to stop."""

    def __init__(self, task: WorldTask) -> None:
        self.task = task

    async def __call__(self, messages: list[Message]) -> Message | None:
        if not any(m.get("role") == "user" for m in messages):
            return {"role": "user", "content": self.task.instruction}
        return None


@dataclass
class Episode:
    task: WorldTask
    messages: list[Message]
    steps: int  # agent turns
    error: str | None = None  # why the loop stopped early (max steps, a failing agent)


async def run_episode(env: WorldEnv, task: WorldTask, agent: ChatFn, user: UserFn | None = None,
                      max_steps: int = 6) -> Episode:
    """user -> agent <-> tools until the agent answers in text and the user stops, or `max_steps` agent turns.

    Tool calls are executed on `env` (reset first) in order; each result becomes a tool message. The agent sees
    the system prompt, the dialog and `env.tools()`.
    """
    env.reset()
    user = user or ScriptedUser(task)
    tools = env.tools()
    messages: list[Message] = [{"role": "system", "content": SYSTEM_PROMPT}]
    first = await user(messages)
    if first is None:
        return Episode(task, messages, 0, "the user said nothing")
    messages.append(first)
    steps = 0
    while steps < max_steps:
        steps += 1
        try:
            reply = await agent(messages, tools)
        except Exception as e:  # a failing model call ends this episode, not the run
            return Episode(task, messages, steps, f"agent error: {type(e).__name__}: {e}")
        reply = {"role": "assistant", "content": reply.get("content") or "",
                 **({"tool_calls": reply["tool_calls"]} if reply.get("tool_calls") else {})}
        messages.append(reply)
        if reply.get("tool_calls"):
            for call in reply["tool_calls"]:
                fn = call.get("function") or {}
                messages.append({"role": "tool", "tool_call_id": call.get("id") or "",
                                 "content": env.call(str(fn.get("name")), fn.get("arguments"))})
            continue
        nxt = await user(messages)
        if nxt is None:
            return Episode(task, messages, steps)
        messages.append(nxt)
    return Episode(task, messages, steps, f"stopped after {max_steps} agent turns")


def final_answer(messages: Sequence[Message]) -> str:
    for m in reversed(messages):
        if m.get("role") == "assistant":
            return str(m.get("content") or "") if not m.get("tool_calls") else ""
    return ""


def answer_ok(task: WorldTask, text: str) -> bool:
    if not task.answer:
        return True
    if task.kind == "count":
        return re.search(rf"(?<!\d){re.escape(task.answer)}(?!\d)", text) is not None
    return task.answer.casefold() in text.casefold()


def score_episode(world: World, task: WorldTask, messages: Sequence[Message]) -> tuple[float, dict[str, Any]]:
    """(reward in {0, 1}, details): the transcript's tool calls replayed on a fresh database must reach the gold
    end state, and the final answer must contain the expected text."""
    env = WorldEnv(world)
    calls = [(str((c.get("function") or {}).get("name")), (c.get("function") or {}).get("arguments"))
             for m in messages if m.get("role") == "assistant" for c in (m.get("tool_calls") or [])]
    if any(name in WRITE_TOOLS for name, _ in calls) or any(a["name"] in WRITE_TOOLS for a in task.gold_actions):
        for name, arguments in calls:
            env.call(name, arguments)
        state_ok = env.state_hash() == gold_state_hash(world, task)
    else:  # neither side can have changed the database
        state_ok = True
    text = final_answer(messages)
    ok_answer = answer_ok(task, text)
    return float(state_ok and ok_answer), {"state_ok": state_ok, "answer_ok": ok_answer, "tool_calls": len(calls),
                                           "final_answer": text[:200]}


# ---------------------------------------------------------------------------------------------------------
# Synthesis


def synthesize(world: World, split: str, n: int, seed: int = 0, max_steps: int = 6) -> list[dict[str, Any]]:
    """`n` expert trajectories (scripted user, expert agent, real tools) as SFT records: {"messages", "tools",
    "metadata"}; only trajectories that pass `score_episode` are kept (all of them, for the expert)."""
    import asyncio

    async def one(task: WorldTask) -> dict[str, Any] | None:
        ep = await run_episode(WorldEnv(world), task, ExpertAgent(task), ScriptedUser(task), max_steps)
        reward, details = score_episode(world, task, ep.messages)
        if reward < 1.0 or ep.error:
            return None
        return {"messages": ep.messages, "tools": TOOLS,
                "metadata": {"task": task.id, "kind": task.kind, "split": split, "seed": seed, "agent": "expert",
                             "user": "scripted", "domain": "world", "world_seed": world.seed}}

    async def run_all() -> list[dict[str, Any] | None]:
        return [await one(t) for t in make_tasks(world, split, n, seed)]

    return [r for r in asyncio.run(run_all()) if r is not None]


__all__ = ["KINDS", "KIND_WEIGHTS", "Episode", "ExpertAgent", "ScriptedUser", "WorldTask", "answer_ok",
           "final_answer", "gold_state_hash", "make_tasks", "run_episode", "score_episode", "synthesize",
           "tool_call_message"]
