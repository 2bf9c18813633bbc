"""Synthetic tools by hierarchical domain evolution (K2 §3.1.1 stage 1; ToolACE's tool self-evolution).

An LLM grows the tree level by level: categories (given, e.g. "financial trading", "robot control") ->
application domains (`subdomains` per category) -> tool specifications (`tools_per_domain` per domain), each
request naming what already exists so the model extends rather than repeats. Every proposed tool passes the rule
checks before it joins the repository: a well-formed JSON Schema with typed properties and `required` naming
declared ones, a name and description (`validate_tool`), and no near-duplicate of a tool already accepted
(`near_duplicate`). Failures, including replies that are not JSON, are `Rejection`s with the reason. Domain paths
are "category/domain" slugs.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from typing import Any

from openk2.agentic.common import Rejection, ReplyError, parse_json_reply
from openk2.agentic.repository import ToolRepository
from openk2.agentic.tools import ToolSchemaError, validate_tool
from openk2.llm import LLMClient, LLMError

DEFAULT_CATEGORIES = ("financial trading", "software applications", "robot control", "travel booking",
                      "healthcare scheduling", "smart home", "e-commerce", "data analytics")

DOMAINS_PROMPT = """List {n} distinct application domains within the category "{category}" for which an AI \
assistant would call software tools (APIs). Avoid these existing ones: {existing}.
Reply with JSON only: {{"domains": [{{"name": "short_snake_case_name", "description": "one sentence"}}]}}"""

TOOLS_PROMPT = """Design {n} distinct tools (API functions) for the application domain "{domain}" ({description}) \
in the category "{category}". Each tool has a clear snake_case name, a one-sentence description of what it \
does and returns, and "parameters": a JSON Schema object whose properties each have a "type" and a \
"description", with a "required" list. Do not repeat these existing tools: {existing}.
Reply with JSON only: {{"tools": [{{"name": ..., "description": ..., "parameters": {{...}}}}]}}"""


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48]


async def _ask(client: LLMClient, prompt: str, key: str, *, model: str | None, seed: int, **params: Any) -> list:
    reply = await client.chat([{"role": "user", "content": prompt}], model=model, seed=seed, **params)
    data = parse_json_reply(reply.content, (dict, list))
    items = data.get(key) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ReplyError(f"reply has no {key!r} list")
    return items


async def evolve_tools(client: LLMClient, categories: Sequence[str] = DEFAULT_CATEGORIES, *, subdomains: int = 3,
                       tools_per_domain: int = 4, repo: ToolRepository | None = None, seed: int = 0,
                       model: str | None = None, concurrency: int = 4, dedupe_threshold: float = 0.8,
                       **params: Any) -> tuple[ToolRepository, list[Rejection]]:
    """Grow synthetic tools into `repo` (a new one if None); returns it and the rejections."""
    repo = repo if repo is not None else ToolRepository(dedupe_threshold=dedupe_threshold)
    rejections: list[Rejection] = []
    sem = asyncio.Semaphore(concurrency)
    source = f"synthetic:{model or client.model}"

    async def domains_of(ci: int, category: str) -> list[tuple[str, str, str]]:
        existing = sorted({d.split("/", 1)[1] for d in repo.domains() if d.startswith(slug(category) + "/")})
        try:
            async with sem:
                items = await _ask(client, DOMAINS_PROMPT.format(n=subdomains, category=category,
                                                                 existing=", ".join(existing) or "(none)"),
                                   "domains", model=model, seed=seed + ci, **params)
        except (LLMError, ReplyError) as e:
            rejections.append(Rejection("evolve", f"category:{category}", str(e)))
            return []
        out, seen = [], set(existing)
        for item in items[:subdomains]:
            name = slug(item.get("name", "")) if isinstance(item, dict) else ""
            if not name or name in seen:
                rejections.append(Rejection("evolve", f"domain:{category}/{name or '?'}",
                                            "empty or duplicate domain name"))
                continue
            seen.add(name)
            out.append((category, name, str(item.get("description") or name)))
        return out

    async def tools_of(di: int, category: str, name: str, description: str) -> list[tuple[str, int, Any]]:
        path = f"{slug(category)}/{name}"
        existing = [t.name for t in repo if t.domain == path]
        try:
            async with sem:
                items = await _ask(client, TOOLS_PROMPT.format(n=tools_per_domain, domain=name,
                                                               description=description, category=category,
                                                               existing=", ".join(existing) or "(none)"),
                                   "tools", model=model, seed=seed + 1000 + di, **params)
        except (LLMError, ReplyError) as e:
            rejections.append(Rejection("evolve", f"domain:{path}", str(e)))
            return []
        return [(path, i, item) for i, item in enumerate(items[:tools_per_domain])]

    level1 = await asyncio.gather(*(domains_of(i, c) for i, c in enumerate(categories)))
    flat = [d for ds in level1 for d in ds]
    proposed = await asyncio.gather(*(tools_of(i, *d) for i, d in enumerate(flat)))
    for path, i, item in (p for ps in proposed for p in ps):  # in request order: deterministic dedup winners
        try:
            spec = validate_tool(item, domain=path, source=source)
        except ToolSchemaError as e:
            rejections.append(Rejection("evolve", f"{path}#{i}", str(e)))
            continue
        r = repo.add(spec, stage="evolve")
        if r is not None:
            rejections.append(r)
    return repo, rejections


def evolution_summary(repo: ToolRepository) -> str:
    return json.dumps(repo.taxonomy(), indent=1)
