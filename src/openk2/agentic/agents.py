"""Agents: a system prompt plus a coherent subset of the repository's tools (K2 §3.1.1 stage 2).

`make_agents` draws, per agent, a domain and 2..k tools from it (topped up from sibling domains of the same
category when the domain is small), so each agent's tools belong together; agents with the same tool set are
drawn again, so every agent is distinct. The system prompt is a template naming the domain, the tools and the
operating rules a tool-use policy needs (ask for missing required arguments, confirm before changes, never make
up results); `synthesize_system_prompt` asks an LLM for a richer one and keeps the template if the reply is
unusable. Everything is deterministic in `seed`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from openk2.agentic.common import Rejection, ReplyError, parse_json_reply, stable_hash
from openk2.agentic.repository import ToolRepository
from openk2.agentic.tools import ToolSpec
from openk2.llm import LLMClient, LLMError

RULES = ("Ask the user for any required information you do not have; never guess identifiers.",
         "Before an action that changes data, state what you will do and get the user's confirmation.",
         "Use the tools for facts; never make up a tool result. If a tool fails, say so or try again sensibly.",
         "When the request is done, give a short final answer that states the outcome.")


@dataclass
class Agent:
    id: str
    domain: str
    system_prompt: str
    tools: list[str]
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Agent:
        return cls(**{k: d[k] for k in ("id", "domain", "system_prompt", "tools")}, seed=d.get("seed", 0),
                   meta=dict(d.get("meta") or {}))

    def tool_specs(self, repo: ToolRepository) -> list[ToolSpec]:
        return [repo[n] for n in self.tools]


def _pretty(domain: str) -> str:
    return " / ".join(part.replace("_", " ") for part in domain.split("/"))


def template_prompt(domain: str, specs: Sequence[ToolSpec]) -> str:
    lines = [f"You are a helpful assistant for {_pretty(domain)}. You help users by calling the tools you have.",
             "", "Tools:"]
    lines += [f"- {s.name}: {s.description}" for s in specs]
    lines += ["", "Rules:"] + [f"- {r}" for r in RULES]
    return "\n".join(lines)


def make_agents(repo: ToolRepository, n: int, *, min_tools: int = 2, max_tools: int = 5, seed: int = 0,
                max_attempts_per_agent: int = 20) -> list[Agent]:
    """Up to `n` distinct agents (fewer if the repository cannot supply that many distinct tool sets)."""
    rng = random.Random(seed)
    by_domain = repo.by_domain()
    if not by_domain:
        return []
    domains = sorted(by_domain)
    agents: list[Agent] = []
    seen: set[frozenset[str]] = set()
    for _ in range(n * max_attempts_per_agent):
        if len(agents) == n:
            break
        domain = rng.choice(domains)
        k = rng.randint(min_tools, max_tools)
        pool = list(by_domain[domain])
        picked = rng.sample(pool, min(k, len(pool)))
        if len(picked) < min_tools:  # top up from the same category
            category = domain.split("/")[0]
            extra = [t for d in domains if d != domain and d.split("/")[0] == category for t in by_domain[d]]
            picked += rng.sample(extra, min(k - len(picked), len(extra)))
        if len(picked) < min(min_tools, len(repo)):
            continue
        names = frozenset(t.name for t in picked)
        if names in seen:
            continue
        seen.add(names)
        picked.sort(key=lambda t: t.name)
        agent_seed = rng.randrange(2**31)
        agents.append(Agent(id=f"agent-{stable_hash([domain, sorted(names)], 10)}", domain=domain,
                            system_prompt=template_prompt(domain, picked), tools=[t.name for t in picked],
                            seed=agent_seed))
    return agents


PROMPT_REQUEST = """Write the system prompt of an AI assistant deployed for {domain}. It can call these tools:
{tools}
The prompt must describe the assistant's role and the policy it follows (what it may do, what needs the user's \
confirmation, what to do when information is missing). Reply with JSON only: {{"system_prompt": "..."}}"""


async def synthesize_system_prompt(client: LLMClient, agent: Agent, repo: ToolRepository, *,
                                   model: str | None = None, **params: Any) -> Rejection | None:
    """Replace the agent's template prompt with an LLM-written one (plus the rules); on failure keep it."""
    tools = "\n".join(f"- {s.name}: {s.description}" for s in agent.tool_specs(repo))
    try:
        reply = await client.chat([{"role": "user", "content": PROMPT_REQUEST.format(domain=_pretty(agent.domain),
                                                                                     tools=tools)}],
                                  model=model, seed=agent.seed, **params)
        prompt = parse_json_reply(reply.content, dict).get("system_prompt")
        if not isinstance(prompt, str) or len(prompt.strip()) < 20:
            raise ReplyError("system_prompt missing or shorter than 20 characters")
    except (LLMError, ReplyError) as e:
        return Rejection("agents", agent.id, f"kept the template prompt: {e}")
    agent.system_prompt = prompt.strip() + "\n\nRules:\n" + "\n".join(f"- {r}" for r in RULES)
    agent.meta["prompt_model"] = reply.model or model or client.model
    return None
