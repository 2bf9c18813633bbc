"""The agentic synthesis pipeline: agents -> tasks -> simulated trajectories -> judge -> SFT export.

    summary = asyncio.run(run_synthesis(SynthConfig(out="runs/synth"), client, repo))

Each stage writes its output under the run directory (`out`, or `out/shard-i-of-N` with `num_shards > 1`):

    agents.jsonl  tasks.jsonl  rejections.jsonl (agents, tasks, export)  trajectories.jsonl (append-only)
    kept.jsonl  rejected.jsonl (trajectory + verdict with reasons)  report.json  report.md  sft.jsonl
    usage.json  summary.json

Resumable: every LLM request goes through the client's `ResponseCache`, so a rerun gets identical answers for
everything already asked, and a finished trajectory is appended to `trajectories.jsonl` the moment it ends, so
a rerun skips it (one that ended in an error is simulated again). Killing a run loses at most the dialogs in
flight. Bounded concurrency: at most `concurrency` agents (task writing) or tasks (simulation, judging) at a
time, on top of the HTTP backend's own limit. Sharding: agents (or given tasks) are dealt round-robin to
`num_shards` shards; each shard is an independent run that a scheduler can start anywhere (share the cache
directory to share answers). Token use and cost, per model, are in `usage.json` (see `openk2.llm.usage`).

Tool layer per task: `layer_factory(task, agent)` builds an executable layer (Python tools, the world domain);
without one, an `LLMToolSimulator` over the agent's tools, seeded by the task. Gold actions of LLM-written
tasks are executed on a fresh executable layer to record the gold end state; one that fails rejects the task.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from openk2.agentic.agents import Agent, make_agents, synthesize_system_prompt
from openk2.agentic.common import Rejection
from openk2.agentic.export import export_sft
from openk2.agentic.judge import LLMJudge, Verdict, acceptance_report, judge_trajectory, report_markdown
from openk2.agentic.repository import ToolRepository
from openk2.agentic.simulate import FailureRates, LLMAgent, LLMToolSimulator, LLMUser, Trajectory, simulate
from openk2.agentic.tasks import DIFFICULTIES, Task, attach_gold_state, generate_tasks
from openk2.agentic.tools import validate_tool
from openk2.llm import LLMClient
from openk2.utils.io import atomic_write_json, atomic_write_text

ROLES = ("agent", "user", "tool", "judge", "tasks")


@dataclass
class SynthConfig:
    out: str
    n_agents: int = 8
    min_tools: int = 2
    max_tools: int = 4
    tasks_per_level: int = 1
    difficulties: tuple[str, ...] = DIFFICULTIES
    llm_system_prompts: bool = False
    max_turns: int = 6
    max_steps: int = 6
    concurrency: int = 8
    seed: int = 0
    shard: int = 0
    num_shards: int = 1
    rates: FailureRates = field(default_factory=FailureRates)
    judge: bool = True
    judge_threshold: float = 0.7
    models: dict[str, str] = field(default_factory=dict)  # role -> model; missing roles use the client's
    params: dict[str, Any] = field(default_factory=dict)  # sampling parameters for every request
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"shard must be in [0, {self.num_shards}), got {self.shard}")
        unknown = set(self.models) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown model roles {sorted(unknown)}; roles are {ROLES}")

    @property
    def run_dir(self) -> Path:
        base = Path(self.out)
        return base if self.num_shards == 1 else base / f"shard-{self.shard}-of-{self.num_shards}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["difficulties"] = list(self.difficulties)
        return d


def parse_shard(text: str) -> tuple[int, int]:
    """"i/N" -> (i, N), 0 <= i < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 <= i < N")
    return i, n


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a JSONL file that parse (a line cut short by a kill is skipped); [] if there is no file."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


async def _bounded(items: Sequence[Any], fn: Callable[[Any], Any], concurrency: int, desc: str,
                   progress: bool) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)

    async def one(item: Any) -> Any:
        async with sem:
            result = await fn(item)
        bar.update(1)
        return result

    try:
        return list(await asyncio.gather(*(one(i) for i in items)))
    finally:
        bar.close()


async def run_synthesis(cfg: SynthConfig, client: LLMClient | None, repo: ToolRepository | None = None, *,
                        layer_factory: Callable[[Task, Agent], Any] | None = None,
                        agents: Sequence[Agent] | None = None, tasks: Sequence[Task] | None = None,
                        policy_factory: Callable[[Agent, Task], Any] | None = None,
                        user_factory: Callable[[Task], Any] | None = None,
                        judge: Any | None = None) -> dict[str, Any]:
    """Run (or resume) one shard; returns the summary also written to summary.json.

    `client` may be None only if every role is covered without an LLM: given tasks, `layer_factory`,
    `policy_factory`, `user_factory` and `judge` (or `cfg.judge=False`). `layer_factory(task, agent)` is also
    called once as `layer_factory(None, None)` for the tool list when no repository is given. Policies have an
    async `act(messages, tools) -> assistant message`, users an async `reply(messages) -> str | None`."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg.to_dict(), indent=2)
    models = {r: cfg.models.get(r) or (client.model if client else None) or "none" for r in ROLES}
    rejections: list[Rejection] = []

    if repo is None:
        if layer_factory is None:
            raise ValueError("need a tool repository or an executable layer_factory")
        probe = layer_factory(None, None)  # type: ignore[arg-type]
        repo = ToolRepository(validate_tool(t, source="executor") for t in probe.tools())

    # ---- agents
    if agents is None:
        agents = make_agents(repo, cfg.n_agents, min_tools=cfg.min_tools, max_tools=cfg.max_tools, seed=cfg.seed)
    agents = list(agents)
    if tasks is None:
        agents = [a for i, a in enumerate(agents) if i % cfg.num_shards == cfg.shard]
    if cfg.llm_system_prompts and client is not None:
        rej = await _bounded(agents, lambda a: synthesize_system_prompt(client, a, repo, model=cfg.models.get("agent"),
                                                                        **cfg.params),
                             cfg.concurrency, "agent prompts", cfg.progress)
        rejections += [r for r in rej if r is not None]
    _write_jsonl(run_dir / "agents.jsonl", [a.to_dict() for a in agents])
    by_agent = {a.id: a for a in agents}

    # ---- tasks
    if tasks is None:
        if client is None:
            raise ValueError("writing tasks needs an LLM client")

        async def write(agent: Agent) -> tuple[list[Task], list[Rejection]]:
            return await generate_tasks(client, agent, agent.tool_specs(repo), per_level=cfg.tasks_per_level,
                                        difficulties=cfg.difficulties, model=cfg.models.get("tasks"), **cfg.params)

        tasks = []
        for made, rej in await _bounded(agents, write, cfg.concurrency, "tasks", cfg.progress):
            tasks += made
            rejections += rej
        if layer_factory is not None:
            checked = []
            for t in tasks:
                r = attach_gold_state(t, layer_factory(t, by_agent[t.agent_id]))
                if r is None:
                    checked.append(t)
                else:
                    rejections.append(r)
            tasks = checked
    else:
        tasks = [t for i, t in enumerate(tasks) if i % cfg.num_shards == cfg.shard]
        missing = sorted({t.agent_id for t in tasks} - set(by_agent))
        if missing:
            raise ValueError(f"tasks name agents that were not given: {missing[:5]}")
    _write_jsonl(run_dir / "tasks.jsonl", [t.to_dict() for t in tasks])
    by_task = {t.id: t for t in tasks}

    # ---- simulation (append-only, resumable)
    traj_path = run_dir / "trajectories.jsonl"
    finished = {d["id"]: Trajectory.from_dict(d) for d in read_jsonl(traj_path)}
    todo = [t for t in tasks if finished.get(f"traj-{t.id}") is None or finished[f"traj-{t.id}"].status != "done"]
    lock = asyncio.Lock()

    async def run_one(task: Task) -> Trajectory:
        agent = by_agent[task.agent_id]
        tools = [repo[n].to_openai() for n in agent.tools] if all(n in repo for n in agent.tools) else None
        if layer_factory is not None:
            layer = layer_factory(task, agent)
        else:
            layer = LLMToolSimulator(client, agent.tool_specs(repo), seed=task.seed, rates=cfg.rates,
                                     model=cfg.models.get("tool"), **cfg.params)
        policy = policy_factory(agent, task) if policy_factory else LLMAgent(client, model=cfg.models.get("agent"),
                                                                              seed=task.seed, **cfg.params)
        user = user_factory(task) if user_factory else LLMUser(client, task, model=cfg.models.get("user"),
                                                                **cfg.params)
        traj = await simulate(task, agent, policy, user, layer, tools=tools, max_turns=cfg.max_turns,
                              max_steps=cfg.max_steps,
                              models={r: models[r] for r in ("agent", "user", "tool")})
        async with lock:
            with open(traj_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(traj.to_dict(), ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return traj

    for traj in await _bounded(todo, run_one, cfg.concurrency, "trajectories", cfg.progress):
        finished[traj.id] = traj
    trajs = [finished[f"traj-{t.id}"] for t in tasks if f"traj-{t.id}" in finished]

    # ---- judge
    if judge is None and cfg.judge:
        if client is None:
            raise ValueError("the LLM judge needs a client (or pass judge=, or set judge=False)")
        judge = LLMJudge(client, model=cfg.models.get("judge"), threshold=cfg.judge_threshold, **cfg.params)
    verdicts: list[Verdict] = await _bounded(trajs, lambda t: judge_trajectory(t, by_task[t.task_id], judge),
                                             cfg.concurrency, "judge", cfg.progress)
    by_traj = {t.id: t for t in trajs}
    _write_jsonl(run_dir / "kept.jsonl", [{"trajectory": by_traj[v.trajectory_id].to_dict(), "verdict": v.to_dict()}
                                          for v in verdicts if v.kept])
    _write_jsonl(run_dir / "rejected.jsonl", [{"trajectory": by_traj[v.trajectory_id].to_dict(),
                                               "verdict": v.to_dict()} for v in verdicts if not v.kept])

    # ---- export
    kept = [by_traj[v.trajectory_id] for v in verdicts if v.kept]
    provenance = {"seed": cfg.seed, "shard": f"{cfg.shard}/{cfg.num_shards}", "rates": asdict(cfg.rates),
                  "judge_threshold": cfg.judge_threshold if cfg.judge else None,
                  "models": {r: models[r] for r in ("tasks", "judge")}}
    n_sft, export_rej = export_sft(run_dir / "sft.jsonl", kept, by_task, by_agent,
                                   {v.trajectory_id: v for v in verdicts}, pipeline=provenance)
    rejections += export_rej
    _write_jsonl(run_dir / "rejections.jsonl", [r.to_dict() for r in rejections])

    usage = client.usage.summary() if client else {"models": {}, "total": {}}
    if client:
        client.usage.save(run_dir / "usage.json")
    report = acceptance_report(verdicts, by_task, rejections)
    atomic_write_json(run_dir / "report.json", report, indent=2)
    atomic_write_text(run_dir / "report.md", report_markdown(report, usage))
    summary = {"run_dir": str(run_dir), "agents": len(agents), "tasks": len(tasks), "trajectories": len(trajs),
               "simulated_now": len(todo), "errors": sum(t.status != "done" for t in trajs), "kept": report["kept"],
               "sft_records": n_sft, "rejections": len(rejections), "acceptance_rate": report["acceptance_rate"],
               "usage": usage.get("total", {})}
    atomic_write_json(run_dir / "summary.json", summary, indent=2)
    return summary


def merge_shards(out: str | os.PathLike) -> dict[str, Any]:
    """Combine the `shard-i-of-N` run directories under `out`: `sft.jsonl` (concatenated in shard order),
    `report.json`/`report.md` over all verdicts, `usage.json` (counters summed), `summary.json`."""
    out = Path(out)
    shard_dirs = sorted(out.glob("shard-*-of-*"), key=lambda p: int(p.name.split("-")[1]))
    if not shard_dirs:
        raise ValueError(f"no shard-i-of-N directories under {out}")
    counts = {p.name.rsplit("-of-", 1)[1] for p in shard_dirs}
    if len(counts) != 1:
        raise ValueError(f"shards of different N under {out}: {sorted(counts)}")
    n = int(counts.pop())
    missing = sorted(set(range(n)) - {int(p.name.split("-")[1]) for p in shard_dirs})
    sft_lines: list[str] = []
    verdicts: list[Verdict] = []
    tasks: dict[str, Task] = {}
    rejections: list[Rejection] = []
    usage: dict[str, Any] = {}
    for d in shard_dirs:
        sft = d / "sft.jsonl"
        if sft.exists():
            sft_lines += [line + "\n" for line in sft.read_text(encoding="utf-8").splitlines() if line.strip()]
        tasks.update({t["id"]: Task.from_dict(t) for t in read_jsonl(d / "tasks.jsonl")})
        for name in ("kept.jsonl", "rejected.jsonl"):
            verdicts += [Verdict(**r["verdict"]) for r in read_jsonl(d / name)]
        rejections += [Rejection(**r) for r in read_jsonl(d / "rejections.jsonl")]
        for model, counters in (json.loads((d / "usage.json").read_text())["models"].items()
                                if (d / "usage.json").exists() else []):
            acc = usage.setdefault(model, {})
            for k, v in counters.items():
                acc[k] = acc.get(k, 0) + v
    total: dict[str, Any] = {}
    for counters in usage.values():
        for k, v in counters.items():
            total[k] = total.get(k, 0) + v
    usage_summary = {"models": usage, "total": total}
    atomic_write_text(out / "sft.jsonl", "".join(sft_lines))
    atomic_write_json(out / "usage.json", usage_summary, indent=2)
    report = acceptance_report(verdicts, tasks, rejections)
    atomic_write_json(out / "report.json", report, indent=2)
    atomic_write_text(out / "report.md", report_markdown(report, usage_summary))
    summary = {"shards": len(shard_dirs), "num_shards": n, "missing_shards": missing, "tasks": len(tasks),
               "trajectories": len(verdicts), "kept": report["kept"], "sft_records": len(sft_lines),
               "acceptance_rate": report["acceptance_rate"], "usage": total}
    atomic_write_json(out / "summary.json", summary, indent=2)
    return summary
