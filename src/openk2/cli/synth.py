"""`openk2 synth`: agentic data synthesis (issue 16 items 1-6; see `openk2.agentic.pipeline`).

    openk2 synth tools --out runs/synth --mcp "python my_server.py" --schema tools.json \\
        --python mypkg.tools:get_weather --evolve "financial trading" --base-url http://127.0.0.1:8000/v1
    openk2 synth run --repository runs/synth/repository.jsonl --out runs/synth --shard 0/4 \\
        --base-url http://127.0.0.1:8000/v1 --model kimi-k2

Every LLM request goes to one OpenAI-compatible endpoint (openk2 serve, vLLM, SGLang, a hosted API) through
`openk2.llm`, with a response cache (default `<out>/llm_cache`; a rerun resumes from it) and per-model token and
cost accounting (`--price-in/--price-out`, dollars per million tokens).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import shlex
from pathlib import Path
from typing import Any

import typer

from openk2.cli.app import app, console, fail

synth_app = typer.Typer(help="Agentic data synthesis: tools, agents, tasks, simulated dialogs, judge, SFT export.",
                        no_args_is_help=True)
app.add_typer(synth_app, name="synth")

_BASE_URL = typer.Option(None, "--base-url", envvar="OPENK2_BASE_URL",
                         help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1.")
_API_KEY = typer.Option(None, "--api-key", envvar="OPENK2_API_KEY", help="Bearer token for the endpoint.")
_MODEL = typer.Option(None, "--model", help="Model id for every role without its own --*-model.")


def _import_object(spec: str) -> Any:
    if ":" not in spec:
        fail(f"expected module:attribute, got {spec!r}")
    module, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        fail(f"cannot import {spec}: {e}")
    return obj


def _client(base_url: str | None, api_key: str | None, model: str | None, cache: Path, concurrency: int,
            price_in: float, price_out: float, models: list[str]) -> Any:
    from openk2.llm import LLMClient, OpenAIHTTPBackend, Price, ResponseCache, UsageTracker

    if not base_url:
        fail("--base-url (or OPENK2_BASE_URL) is needed for the LLM steps")
    if not model:
        fail("--model is needed for the LLM steps")
    prices = {m: Price(price_in, price_out) for m in {model, *models} if m} if price_in or price_out else {}
    return LLMClient(OpenAIHTTPBackend(base_url, api_key=api_key, max_concurrency=concurrency), model=model,
                     cache=ResponseCache(cache), usage=UsageTracker(prices))


def _params(temperature: float | None, max_tokens: int | None) -> dict[str, Any]:
    return {k: v for k, v in (("temperature", temperature), ("max_tokens", max_tokens)) if v is not None}


@synth_app.command("tools")
def tools_cmd(
    out: Path = typer.Option(..., "--out", help="Run directory (repository.jsonl, map, rejections)."),
    mcp: list[str] = typer.Option(None, "--mcp", help='MCP server command over stdio, e.g. "python srv.py" '
                                                      '(repeatable; domain with "domain=CMD").'),
    schema: list[Path] = typer.Option(None, "--schema", help="OpenAI/MCP tool schema file, .json or .jsonl."),
    python: list[str] = typer.Option(None, "--python", help="module:function to import as a tool (repeatable)."),
    evolve: list[str] = typer.Option(None, "--evolve", help="Category to grow synthetic tools in (repeatable)."),
    subdomains: int = typer.Option(3, help="Application domains per evolved category."),
    tools_per_domain: int = typer.Option(4, "--tools-per-domain"),
    domain: str = typer.Option("general", help="Domain for imported tools without one."),
    dedupe_threshold: float = typer.Option(0.8, "--dedupe-threshold", help="Word-overlap (Jaccard) of near-dups."),
    mcp_timeout: float = typer.Option(60.0, "--mcp-timeout"),
    base_url: str = _BASE_URL, api_key: str = _API_KEY, model: str = _MODEL,
    temperature: float = typer.Option(None), max_tokens: int = typer.Option(None, "--max-tokens"),
    seed: int = typer.Option(0), concurrency: int = typer.Option(8),
    cache: Path = typer.Option(None, help="Response cache directory (default <out>/llm_cache)."),
    price_in: float = typer.Option(0.0, "--price-in"), price_out: float = typer.Option(0.0, "--price-out"),
) -> None:
    """Build the tool repository: import (MCP servers, schema files, Python functions), evolve, dedupe, map."""
    from openk2.agentic.mcp_import import import_mcp_server, load_schema_file, tools_from_callables
    from openk2.agentic.repository import ToolRepository, plot_map
    from openk2.utils.io import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    repo = ToolRepository(dedupe_threshold=dedupe_threshold)
    rejections = []
    for entry in mcp or []:
        dom, cmd = (entry.split("=", 1) if "=" in entry.split(" ")[0] else (domain, entry))
        specs, rej = import_mcp_server(shlex.split(cmd), domain=dom, timeout=mcp_timeout)
        rejections += rej + repo.add_many(specs, stage="import")
        console.print(f"mcp {cmd!r}: {len(specs)} tools, {len(rej)} rejected")
    for path in schema or []:
        specs, rej = load_schema_file(path, domain=domain)
        rejections += rej + repo.add_many(specs, stage="import")
        console.print(f"schema {path}: {len(specs)} tools, {len(rej)} rejected")
    if python:
        specs, rej = tools_from_callables([_import_object(p) for p in python], domain=domain)
        rejections += rej + repo.add_many(specs, stage="import")
    client = None
    if evolve:
        from openk2.agentic.evolve import evolve_tools

        client = _client(base_url, api_key, model, cache or out / "llm_cache", concurrency, price_in, price_out, [])
        before = len(repo)

        async def grow():
            async with client:
                return await evolve_tools(client, evolve, subdomains=subdomains, tools_per_domain=tools_per_domain,
                                          repo=repo, seed=seed, concurrency=concurrency,
                                          **_params(temperature, max_tokens))

        _, rej = asyncio.run(grow())
        rejections += rej
        console.print(f"evolved {len(repo) - before} synthetic tools, {len(rej)} rejected")
        client.usage.save(out / "usage_tools.json")
    repo.save(out / "repository.jsonl")
    atomic_write_text(out / "tool_rejections.jsonl",
                      "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rejections))
    atomic_write_json(out / "taxonomy.json", repo.taxonomy(), indent=1)
    if len(repo):
        plot_map(repo, out / "repository_map.png")
    console.print(f"repository: {json.dumps(repo.stats())} -> {out / 'repository.jsonl'}")


@synth_app.command("run")
def run_cmd(
    out: Path = typer.Option(..., "--out", help="Run directory (shards go to <out>/shard-i-of-N)."),
    repository: Path = typer.Option(None, "--repository", help="repository.jsonl from `openk2 synth tools`."),
    executor: str = typer.Option(None, "--executor", help="module:factory returning an executable tool layer "
                                                          "(tools/call/state/reset); a fresh one per task."),
    agents_file: Path = typer.Option(None, "--agents", help="Agents JSONL (default: drawn from the repository)."),
    tasks_file: Path = typer.Option(None, "--tasks", help="Tasks JSONL (default: written by the LLM)."),
    n_agents: int = typer.Option(8, "--n-agents"), min_tools: int = typer.Option(2, "--min-tools"),
    max_tools: int = typer.Option(4, "--max-tools"), tasks_per_level: int = typer.Option(1, "--tasks-per-level"),
    difficulties: str = typer.Option("simple,multi_step,complex", help="Comma-separated task levels."),
    llm_system_prompts: bool = typer.Option(False, "--llm-system-prompts", help="LLM-written agent prompts."),
    max_turns: int = typer.Option(6, "--max-turns"), max_steps: int = typer.Option(6, "--max-steps"),
    failure_rates: str = typer.Option("0.1,0.1,0.05", "--failure-rates",
                                      help="Tool simulator partial,edge,error probabilities."),
    judge: bool = typer.Option(True, "--judge/--no-judge", help="LLM judge after the rule and state checks."),
    judge_threshold: float = typer.Option(0.7, "--judge-threshold"),
    shard: str = typer.Option("0/1", "--shard", help="i/N: run shard i of N."),
    base_url: str = _BASE_URL, api_key: str = _API_KEY, model: str = _MODEL,
    agent_model: str = typer.Option(None, "--agent-model"), user_model: str = typer.Option(None, "--user-model"),
    tool_model: str = typer.Option(None, "--tool-model"), judge_model: str = typer.Option(None, "--judge-model"),
    tasks_model: str = typer.Option(None, "--tasks-model"),
    temperature: float = typer.Option(None), max_tokens: int = typer.Option(None, "--max-tokens"),
    seed: int = typer.Option(0), concurrency: int = typer.Option(8),
    cache: Path = typer.Option(None, help="Response cache directory (default <out>/llm_cache; share it across "
                                          "shards and reruns)."),
    price_in: float = typer.Option(0.0, "--price-in"), price_out: float = typer.Option(0.0, "--price-out"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Agents -> rubric tasks -> simulated dialogs -> judge -> SFT JSONL, resumable and sharded."""
    from openk2.agentic.agents import Agent
    from openk2.agentic.pipeline import SynthConfig, parse_shard, read_jsonl, run_synthesis
    from openk2.agentic.repository import ToolRepository
    from openk2.agentic.simulate import FailureRates
    from openk2.agentic.tasks import Task

    try:
        i, n = parse_shard(shard)
        rates = FailureRates(*(float(x) for x in failure_rates.split(",")))
    except (ValueError, TypeError) as e:
        fail(str(e))
    models = {k: v for k, v in (("agent", agent_model), ("user", user_model), ("tool", tool_model),
                                ("judge", judge_model), ("tasks", tasks_model)) if v}
    cfg = SynthConfig(out=str(out), n_agents=n_agents, min_tools=min_tools, max_tools=max_tools,
                      tasks_per_level=tasks_per_level, difficulties=tuple(d for d in difficulties.split(",") if d),
                      llm_system_prompts=llm_system_prompts, max_turns=max_turns, max_steps=max_steps,
                      concurrency=concurrency, seed=seed, shard=i, num_shards=n, rates=rates, judge=judge,
                      judge_threshold=judge_threshold, models=models, params=_params(temperature, max_tokens),
                      progress=progress)
    repo = None
    if repository is not None:
        if not repository.exists():
            fail(f"no repository file {repository}")
        repo = ToolRepository.load(repository)
        if repo.rejections:
            console.print(f"[yellow]{len(repo.rejections)} repository lines rejected[/yellow]")
    layer_factory = None
    if executor:
        factory = _import_object(executor)
        layer_factory = lambda task, agent: factory()  # noqa: E731
    if repo is None and layer_factory is None:
        fail("give --repository or --executor")
    agents = [Agent.from_dict(d) for d in read_jsonl(agents_file)] if agents_file else None
    tasks = [Task.from_dict(d) for d in read_jsonl(tasks_file)] if tasks_file else None
    client = _client(base_url, api_key, model, cache or out / "llm_cache", concurrency, price_in, price_out,
                     list(models.values()))

    async def go() -> dict[str, Any]:
        async with client:
            return await run_synthesis(cfg, client, repo, layer_factory=layer_factory, agents=agents, tasks=tasks)

    try:
        summary = asyncio.run(go())
    except ValueError as e:
        fail(str(e))
    console.print(json.dumps(summary, indent=1))


@synth_app.command("world")
def world_cmd(
    out: Path = typer.Option(..., "--out", help="Run directory."),
    split: str = typer.Option("train", help="train (people in pretraining documents) or heldout."),
    n_tasks: int = typer.Option(50, "--n-tasks"),
    world_seed: int = typer.Option(0, "--world-seed"), n_people: int = typer.Option(100, "--n-people"),
    seed: int = typer.Option(0), shard: str = typer.Option("0/1", "--shard"),
    base_url: str = _BASE_URL, api_key: str = _API_KEY,
    model: str = typer.Option(None, "--model", help="With --base-url: an LLM agent instead of the expert."),
    llm_user: bool = typer.Option(False, "--llm-user", help="With --model: an LLM user instead of the script."),
    judge: bool = typer.Option(False, "--judge/--no-judge", help="LLM judge (needs --model)."),
    temperature: float = typer.Option(None), max_tokens: int = typer.Option(None, "--max-tokens"),
    concurrency: int = typer.Option(8), cache: Path = typer.Option(None),
    price_in: float = typer.Option(0.0, "--price-in"), price_out: float = typer.Option(0.0, "--price-out"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """World-domain trajectories through the pipeline: expert + scripted user on a CPU, or an LLM agent."""
    from openk2.agentic.pipeline import SynthConfig, parse_shard, run_synthesis
    from openk2.agentic.world_path import world_inputs
    from openk2.data.world import World

    try:
        i, n = parse_shard(shard)
        inputs = world_inputs(World.generate(world_seed, n_people), split=split, n=n_tasks, seed=seed)
    except ValueError as e:
        fail(str(e))
    use_llm = bool(model)
    if (judge or llm_user) and not use_llm:
        fail("--judge and --llm-user need --model (and --base-url)")
    client = _client(base_url, api_key, model, cache or out / "llm_cache", concurrency, price_in, price_out, []) \
        if use_llm else None
    cfg = SynthConfig(out=str(out), seed=seed, shard=i, num_shards=n, judge=judge, concurrency=concurrency,
                      params=_params(temperature, max_tokens), progress=progress)
    kw = inputs.llm(scripted_user=not llm_user) if use_llm else inputs.expert()

    async def go() -> dict[str, Any]:
        if client is None:
            return await run_synthesis(cfg, None, **kw)
        async with client:
            return await run_synthesis(cfg, client, **kw)

    summary = asyncio.run(go())
    console.print(json.dumps(summary, indent=1))


@synth_app.command("merge")
def merge_cmd(out: Path = typer.Option(..., "--out", help="The --out of the sharded runs.")) -> None:
    """Combine shard-i-of-N runs: one sft.jsonl, report and usage over all shards."""
    from openk2.agentic.pipeline import merge_shards

    try:
        summary = merge_shards(out)
    except ValueError as e:
        fail(str(e))
    if summary["missing_shards"]:
        console.print(f"[yellow]missing shards: {summary['missing_shards']}[/yellow]")
    console.print(json.dumps(summary, indent=1))
