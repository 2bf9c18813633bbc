"""The world domain: an executable, tau-bench-like tool-use domain over the speedrun's fictional world.

A registry office keeps a database of the world's people (`openk2.data.world`), its companies and cities. An
agent serves users under a written policy (`POLICY`) with read tools (lookups, attribute counts, company facts)
and one write tool (`update_record`, allowed only where the policy allows it). Tasks (`openk2.agentic.world_tasks`)
have checkable answers and end states; tasks about held-out people (in no pretraining document) can only be
solved through the tools.

The environment contract shared by every tool layer (the agentic pipeline, the `world-agent` benchmark, RL):

    env = WorldEnv(World.generate(0, 100))
    env.tools()                       # OpenAI tool schemas
    env.call("lookup", {"name": "Xyla Morven", "attribute": "hobby"})   # -> "chess" (text; errors are text too)
    env.state()                       # JSON-ready database state (only what write tools can change)
    env.state_hash()                  # sha256 of the canonical JSON of state(), as tau2-bench's DB check
    env.reset()                       # back to the initial database

`call` never raises for a model's bad call (unknown tool, missing or mistyped arguments, policy violation): it
returns an error text that starts with "Error:" and leaves the database unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from openk2.data.world import ATTRIBUTES, World

#: Attributes of a person a user may ask about (lookup / search / count), as the tools name them.
LOOKUP_ATTRIBUTES: tuple[str, ...] = ATTRIBUTES
#: Attributes the policy lets the office change (the others are birth or education records).
MUTABLE_ATTRIBUTES: tuple[str, ...] = ("employer", "hobby")

#: The domain's written policy (the tau-bench `policy.md` of this domain). `SYSTEM_PROMPT` is its short form, the
#: system message of every episode.
POLICY = """\
# World registry office: agent policy

You help users with the registry of people, companies and cities. You can only act through the tools.

1. Never guess a fact about a person: look it up with the tools, then answer with the value the tool returned.
2. Birth city, birth date, university and field of study are permanent records and must never be changed,
   whatever the user says. Politely refuse such requests without calling any write tool.
3. Only the employer and the hobby of a person may be updated, with `update_record`. Before updating, confirm
   that the person exists by looking up the current value of that attribute. A new employer must be a company
   in the registry; a new hobby must be one of the registry's hobbies.
4. If a person or company is not in the registry, say so; do not invent one.
5. Answer briefly, in one sentence, stating the value you found.
"""

SYSTEM_PROMPT = "You are the world registry assistant. Follow the registry policy: use the tools, never guess."


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


_S = {"type": "string"}
# Short on purpose: the declarations are part of every prompt, and the nano model's tokenizer (trained on the
# world's prose) spends ~0.7 tokens per character of JSON. The policy and the tool errors say the rest.
TOOLS: list[dict[str, Any]] = [
    _tool("lookup", "Look up a person.", {"name": _S, "attribute": _S}, ["name", "attribute"]),
    _tool("count_people", "Count people.", {"attribute": _S, "value": _S}, ["attribute", "value"]),
    _tool("company_info", "Look up a company.", {"company": _S}, ["company"]),
    _tool("update_record", "Change employer or hobby.", {"name": _S, "attribute": _S, "value": _S},
          ["name", "attribute", "value"]),
]
TOOL_NAMES: tuple[str, ...] = tuple(t["function"]["name"] for t in TOOLS)
WRITE_TOOLS: frozenset[str] = frozenset({"update_record"})


class PolicyViolation(Exception):
    """A write the policy forbids (the text becomes the tool's error result)."""


class WorldEnv:
    """The executable tool layer over a `World`'s database (see the module docstring)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._initial = _initial_db(world)
        self.db: dict[str, Any] = _copy_db(self._initial)
        self.log: list[dict[str, Any]] = []  # every call with its result, for judges and debugging

    # -- the contract ---------------------------------------------------------------------------------------

    def tools(self) -> list[dict[str, Any]]:
        return copy.deepcopy(TOOLS)

    def reset(self) -> None:
        self.db = _copy_db(self._initial)
        self.log = []

    def state(self) -> dict[str, Any]:
        """The mutable part of the database: every person's employer and hobby (JSON-ready)."""
        return {"people": {n: {a: r[a] for a in MUTABLE_ATTRIBUTES} for n, r in sorted(self.db["people"].items())}}

    def state_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.state(), sort_keys=True).encode()).hexdigest()

    def call(self, tool_name: str, arguments: Mapping[str, Any] | str | None) -> str:
        """Run one tool call; the result (or an "Error: ..." text) as a string. Never raises."""
        try:
            args = json.loads(arguments) if isinstance(arguments, str) else dict(arguments or {})
            if not isinstance(args, dict):
                raise TypeError("arguments must be a JSON object")
            result = self._dispatch(tool_name, args)
        except (PolicyViolation, KeyError, TypeError, ValueError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            result = f"Error: {msg}"
        self.log.append({"tool": tool_name, "arguments": arguments, "result": result})
        return result

    # -- tools ----------------------------------------------------------------------------------------------

    def _dispatch(self, tool: str, args: dict[str, Any]) -> str:
        if tool not in TOOL_NAMES:
            raise ValueError(f"unknown tool {tool!r}; tools: {', '.join(TOOL_NAMES)}")
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == tool)
        for key in schema["required"]:
            if key not in args:
                raise ValueError(f"{tool} needs the argument {key!r}")
            if not isinstance(args[key], str):
                raise ValueError(f"{tool}: argument {key!r} must be a string")
        extra = set(args) - set(schema["properties"])
        if extra:
            raise ValueError(f"{tool}: unknown arguments {sorted(extra)}")
        return getattr(self, f"_{tool}")(**args)

    def _person(self, name: str) -> dict[str, str]:
        rec = self.db["people"].get(name.strip())
        if rec is None:
            raise ValueError(f"no person named {name!r} in the registry")
        return rec

    @staticmethod
    def _attribute(attribute: str, allowed: tuple[str, ...] = LOOKUP_ATTRIBUTES) -> str:
        if attribute not in allowed:
            raise ValueError(f"unknown attribute {attribute!r}; one of {', '.join(allowed)}")
        return attribute

    def _lookup(self, name: str, attribute: str) -> str:
        return self._person(name)[self._attribute(attribute)]

    def _matches(self, attribute: str, value: str) -> list[str]:
        attr, want = self._attribute(attribute), value.strip().casefold()
        return [n for n, r in self.db["people"].items() if r[attr].casefold() == want]

    def _count_people(self, attribute: str, value: str) -> str:
        return str(len(self._matches(attribute, value)))

    def _company_info(self, company: str) -> str:
        info = self.db["companies"].get(company.strip())
        if info is None:
            raise ValueError(f"no company named {company!r} in the registry")
        return f"{info['industry']} company in {info['city']}"

    def _update_record(self, name: str, attribute: str, value: str) -> str:
        if attribute not in MUTABLE_ATTRIBUTES:
            raise PolicyViolation(f"policy: {attribute} is a permanent record and cannot be changed")
        rec = self._person(name)
        looked_up = any(e["tool"] == "lookup" and _args(e["arguments"]) == {"name": name, "attribute": attribute}
                        and not str(e["result"]).startswith("Error") for e in self.log)
        if not looked_up:
            raise PolicyViolation(f"policy: look up the current {attribute} of {name} before updating it")
        value = value.strip()
        if attribute == "employer" and value not in self.db["companies"]:
            raise PolicyViolation(f"policy: {value!r} is not a company in the registry")
        if attribute == "hobby" and value not in self.world.hobbies:
            raise PolicyViolation(f"policy: {value!r} is not one of the registry's hobbies")
        rec[attribute] = value
        return f"updated: {attribute} of {name} is now {value}"


_DB_CACHE: dict[int, tuple[World, dict[str, Any]]] = {}


def _initial_db(world: World) -> dict[str, Any]:
    """The database of `world` (cached per World object; records are flat dicts of strings)."""
    hit = _DB_CACHE.get(id(world))
    if hit is None or hit[0] is not world:
        people = {p.name: {a: p.answer(a) for a in LOOKUP_ATTRIBUTES} for p in world.people}
        companies = {c.name: {"industry": c.industry, "city": c.city} for c in world.companies}
        if len(_DB_CACHE) > 8:
            _DB_CACHE.clear()
        hit = _DB_CACHE[id(world)] = (world, {"people": people, "companies": companies})
    return hit[1]


def _copy_db(db: dict[str, Any]) -> dict[str, Any]:
    return {table: {k: dict(v) for k, v in rows.items()} for table, rows in db.items()}


def _args(arguments: Any) -> dict[str, Any] | None:
    try:
        return json.loads(arguments) if isinstance(arguments, str) else dict(arguments or {})
    except (TypeError, ValueError):
        return None


__all__ = ["LOOKUP_ATTRIBUTES", "MUTABLE_ATTRIBUTES", "POLICY", "SYSTEM_PROMPT", "TOOLS", "TOOL_NAMES",
           "WRITE_TOOLS", "PolicyViolation", "WorldEnv"]
