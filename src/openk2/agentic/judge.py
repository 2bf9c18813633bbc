"""Filtering (K2 §3.1.1 stage 4): rule checks, end-state checks, then an LLM judge against the task's rubric.

Layers, cheapest first (APIGen's format -> execution -> semantic order); a trajectory that fails one is not
sent to the next:
    rules   the simulation finished; the dialog is well formed (system, user first; every tool call answered by
            a tool message with its id; a final assistant answer in text); every call names a declared tool
            with JSON-object arguments valid under its schema; every tool the rubric expects was called.
    state   where the task has a gold end state, the tool layer's final state equals it; expected outputs
            appear in the final answer.
    judge   an LLM scores the transcript against the rubric (success criteria, tool-use pattern,
            checkpoints) and says pass or fail; a reply that is not the asked JSON is a rejection saying so.
Kept and rejected trajectories are both saved with their `Verdict`; `acceptance_report` summarises them.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from openk2.agentic.common import ReplyError, parse_json_reply
from openk2.agentic.simulate import Trajectory
from openk2.agentic.tasks import Task
from openk2.agentic.tools import ToolSchemaError, ToolSpec, validate_arguments, validate_tool
from openk2.llm import LLMClient, LLMError


@dataclass
class Verdict:
    trajectory_id: str
    task_id: str
    agent_id: str
    kept: bool
    stage: str  # the layer that decided: "rules", "state", "judge" (or "judge" for a keep)
    reasons: list[str] = field(default_factory=list)
    score: float | None = None
    judge: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _specs(tools: Sequence[Mapping[str, Any]]) -> dict[str, ToolSpec]:
    out = {}
    for t in tools:
        try:
            s = validate_tool(t)
        except ToolSchemaError:
            continue
        out[s.name] = s
    return out


def final_answer(traj: Trajectory) -> str | None:
    for m in reversed(traj.messages):
        if m.get("role") == "assistant":
            return m.get("content") if not m.get("tool_calls") and m.get("content") else None
        if m.get("role") == "tool":
            return None
    return None


def rule_checks(traj: Trajectory, task: Task) -> list[str]:
    """Format and executability problems ([] when none)."""
    if traj.status != "done":
        return [f"simulation failed: {traj.error}"]
    problems: list[str] = []
    specs = _specs(traj.tools)
    msgs = traj.messages
    if not msgs or msgs[0].get("role") != "system" or len(msgs) < 2 or msgs[1].get("role") != "user":
        problems.append("dialog must start with the system prompt and a user message")
    pending: dict[str, str] = {}
    for i, m in enumerate(msgs):
        role = m.get("role")
        if role == "assistant":
            if pending:
                problems.append(f"message {i}: tool calls {sorted(pending)} have no result")
                pending = {}
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {}
                name, cid = fn.get("name"), call.get("id")
                if not cid:
                    problems.append(f"message {i}: tool call without id")
                elif cid in pending:
                    problems.append(f"message {i}: duplicate tool call id {cid!r}")
                pending[str(cid)] = str(name)
                if name not in specs:
                    problems.append(f"call to unknown tool {name!r}")
                    continue
                raw = fn.get("arguments")
                try:
                    args = json.loads(raw) if isinstance(raw, str) else raw
                except ValueError:
                    problems.append(f"{name}: arguments are not valid JSON")
                    continue
                problems += [f"{name}: {e}" for e in validate_arguments(specs[name], args)]
        elif role == "tool":
            if m.get("tool_call_id") not in pending:
                problems.append(f"message {i}: tool result answers no pending call")
            pending.pop(m.get("tool_call_id"), None)
        elif role not in ("system", "user"):
            problems.append(f"message {i}: unknown role {role!r}")
    if pending:
        problems.append(f"tool calls {sorted(pending)} have no result")
    if final_answer(traj) is None:
        problems.append("no final assistant answer in text")
    called = {c["name"] for c in traj.calls}
    problems += [f"expected tool {t!r} never called" for t in task.rubric.expected_tools if t not in called]
    return problems


def state_checks(traj: Trajectory, task: Task) -> list[str]:
    problems = []
    if task.expected_state is not None and traj.final_state != task.expected_state:
        exp, got = task.expected_state, traj.final_state or {}
        keys = sorted(k for k in set(exp) | set(got) if exp.get(k) != got.get(k))
        problems.append(f"end state differs from the gold state in {keys[:10]}")
    answer = (final_answer(traj) or "").lower()
    problems += [f"final answer lacks expected output {o!r}" for o in task.expected_outputs if o.lower() not in answer]
    return problems


def transcript(traj: Trajectory, limit: int = 12000) -> str:
    lines = []
    for m in traj.messages[1:]:
        role = m.get("role")
        if role == "assistant":
            if m.get("content"):
                lines.append(f"ASSISTANT: {m['content']}")
            for c in m.get("tool_calls") or []:
                fn = c.get("function") or {}
                args = fn.get("arguments")
                lines.append(f"ASSISTANT CALLS {fn.get('name')}({args if isinstance(args, str) else json.dumps(args)})")
        elif role == "tool":
            lines.append(f"TOOL RESULT: {m.get('content')}")
        else:
            lines.append(f"{str(role).upper()}: {m.get('content')}")
    text = "\n".join(lines)
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2:]


JUDGE_PROMPT = """You grade a conversation between a user and an AI assistant that uses tools.
The user's goal: {instruction}
Rubric:
- Success criteria: {criteria}
- Expected tool use: {tools}
- Checkpoints: {checkpoints}

Conversation:
{transcript}

Judge strictly: does the assistant meet every success criterion, use tools as expected, follow the checkpoints, \
handle tool errors honestly and never invent results? Reply with JSON only:
{{"criteria": [{{"criterion": "...", "met": true, "why": "..."}}], "score": <0..1>, "pass": <true|false>, \
"reason": "<one sentence>"}}"""


class LLMJudge:
    def __init__(self, client: LLMClient, *, model: str | None = None, threshold: float = 0.7, **params: Any):
        self.client, self.model, self.threshold, self.params = client, model, threshold, params

    async def __call__(self, traj: Trajectory, task: Task) -> tuple[bool, float | None, list[str], dict[str, Any]]:
        prompt = JUDGE_PROMPT.format(instruction=task.instruction,
                                     criteria="; ".join(task.rubric.success_criteria),
                                     tools=", ".join(task.rubric.expected_tools) or "(any)",
                                     checkpoints="; ".join(task.rubric.checkpoints) or "(none)",
                                     transcript=transcript(traj))
        try:
            reply = await self.client.chat([{"role": "user", "content": prompt}], model=self.model, seed=task.seed,
                                           **self.params)
            data = parse_json_reply(reply.content, dict)
            if "pass" not in data and "score" not in data:
                raise ReplyError("judge reply has neither 'pass' nor 'score'")
            score = data.get("score")
            score = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None
        except (LLMError, ReplyError) as e:
            return False, None, [f"judge: {e}"], {}
        passed = data.get("pass", True) is True and (score is None or score >= self.threshold)
        why = data.get("reason") or "no reason given"
        reasons = [] if passed else [f"judge: rubric not met (score {score}): {why}"]
        if not passed:
            reasons += [f"judge: criterion not met: {c.get('criterion')}" for c in data.get("criteria") or []
                        if isinstance(c, Mapping) and c.get("met") is False][:5]
        return passed, score, reasons, data


async def judge_trajectory(traj: Trajectory, task: Task, judge: Any | None = None) -> Verdict:
    v = Verdict(traj.id, traj.task_id, traj.agent_id, kept=False, stage="rules")
    v.reasons = rule_checks(traj, task)
    if v.reasons:
        return v
    v.stage = "state"
    v.reasons = state_checks(traj, task)
    if v.reasons:
        return v
    if judge is None:
        v.kept = True
        return v
    v.stage = "judge"
    v.kept, v.score, v.reasons, v.judge = await judge(traj, task)
    return v


async def filter_trajectories(trajs: Sequence[Trajectory], tasks: Mapping[str, Task], judge: Any | None = None,
                              concurrency: int = 8) -> list[Verdict]:
    sem = asyncio.Semaphore(concurrency)

    async def one(t: Trajectory) -> Verdict:
        async with sem:
            return await judge_trajectory(t, tasks[t.task_id], judge)

    return list(await asyncio.gather(*(one(t) for t in trajs)))


def _reason_kind(reason: str) -> str:
    head = reason.split(":")[0]
    for prefix in ("call to unknown tool", "expected tool", "final answer lacks", "end state differs"):
        if reason.startswith(prefix):
            return prefix
    if reason.startswith("message ") and ":" in reason:  # "message 4: tool calls [...] have no result"
        return " ".join(reason.split(":", 1)[1].split()[:2])
    if reason.startswith("judge: rubric not met"):
        return "judge: rubric not met"
    if reason.startswith("judge: "):
        return "judge: " + reason[7:].split(":")[0].split("(")[0].strip()[:50]
    return head if len(head) < 60 else head[:60]


def acceptance_report(verdicts: Sequence[Verdict], tasks: Mapping[str, Task] | None = None,
                      extra_rejections: Sequence[Any] = ()) -> dict[str, Any]:
    """Counts of kept/rejected, rejections by stage and by reason kind, acceptance by difficulty."""
    n, kept = len(verdicts), sum(v.kept for v in verdicts)
    by_stage = Counter(v.stage for v in verdicts if not v.kept)
    reasons = Counter(_reason_kind(r) for v in verdicts if not v.kept for r in v.reasons[:1])
    by_difficulty: dict[str, dict[str, int]] = {}
    for v in verdicts:
        level = tasks[v.task_id].difficulty if tasks and v.task_id in tasks else "unknown"
        d = by_difficulty.setdefault(level, {"total": 0, "kept": 0})
        d["total"] += 1
        d["kept"] += int(v.kept)
    scores = [v.score for v in verdicts if v.score is not None]
    return {"trajectories": n, "kept": kept, "rejected": n - kept, "acceptance_rate": kept / n if n else 0.0,
            "rejected_by_stage": dict(by_stage), "top_rejection_reasons": dict(reasons.most_common(10)),
            "by_difficulty": by_difficulty, "mean_judge_score": sum(scores) / len(scores) if scores else None,
            "earlier_stage_rejections": dict(Counter(getattr(r, "stage", "?") for r in extra_rejections))}


def report_markdown(report: Mapping[str, Any], usage: Mapping[str, Any] | None = None) -> str:
    lines = ["# Agentic synthesis: acceptance report", "",
             f"- trajectories: {report['trajectories']}, kept: {report['kept']}, rejected: {report['rejected']} "
             f"(acceptance {report['acceptance_rate']:.1%})"]
    if report.get("mean_judge_score") is not None:
        lines.append(f"- mean judge score: {report['mean_judge_score']:.3f}")
    if report["rejected"]:
        lines += ["", "| rejected at | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in report["rejected_by_stage"].items()]
        lines += ["", "| top rejection reason | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in report["top_rejection_reasons"].items()]
    lines += ["", "| difficulty | kept / total |", "|---|---|"]
    lines += [f"| {k} | {v['kept']} / {v['total']} |" for k, v in report["by_difficulty"].items()]
    if report.get("earlier_stage_rejections"):
        lines += ["", "Items rejected before simulation: " + ", ".join(
            f"{k}: {v}" for k, v in report["earlier_stage_rejections"].items())]
    if usage:
        t = usage.get("total", {})
        lines += ["", f"LLM usage: {t.get('requests', 0)} requests ({t.get('cached_requests', 0)} cached), "
                      f"{t.get('total_tokens', 0)} tokens, ${t.get('cost_usd', 0.0):.4f}"]
    return "\n".join(lines) + "\n"
