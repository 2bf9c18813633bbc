"""Export kept trajectories as SFT JSONL: OpenAI messages format with `tools`, plus provenance per record.

One line per trajectory:
    {"messages": [...], "tools": [...], "provenance": {"trajectory", "task", "agent", "domain", "difficulty",
     "models", "seed", "judge_score", "pipeline"}}
Tool calls are renamed to K2's `functions.{name}:{idx}` ids (`renumber_tool_call_ids`) and arguments are JSON
strings, as the OpenAI format has them; each record is rendered once with openk2's K2 chat renderer
(`render_chat`), and one that does not render is a rejection, so every exported line is trainable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from openk2.agentic.agents import Agent
from openk2.agentic.common import Rejection
from openk2.agentic.judge import Verdict
from openk2.agentic.simulate import Trajectory
from openk2.agentic.tasks import Task
from openk2.data.chat import render_chat
from openk2.data.toolcall import renumber_tool_call_ids
from openk2.utils.io import atomic_write_text


def _clean(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": m["role"], "content": m.get("content")}
        if m.get("tool_calls"):
            msg["tool_calls"] = [{"id": c.get("id"), "type": "function",
                                  "function": {"name": c["function"]["name"],
                                               "arguments": c["function"]["arguments"]
                                               if isinstance(c["function"].get("arguments"), str)
                                               else json.dumps(c["function"].get("arguments"), ensure_ascii=False)}}
                                 for c in m["tool_calls"]]
        if m["role"] == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
        out.append(msg)
    return out


def sft_record(traj: Trajectory, task: Task | None = None, agent: Agent | None = None,
               verdict: Verdict | None = None, pipeline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The SFT line for one trajectory; raises ValueError if the dialog cannot be rendered."""
    messages = renumber_tool_call_ids(_clean(traj.messages))
    render_chat(messages, traj.tools or None)  # raises ValueError for anything the K2 template cannot render
    provenance = {"trajectory": traj.id, "task": traj.task_id, "agent": traj.agent_id,
                  "domain": agent.domain if agent else None, "difficulty": task.difficulty if task else None,
                  "models": {**dict((pipeline or {}).get("models") or {}), **traj.models}, "seed": traj.seed,
                  "judge_score": verdict.score if verdict else None, "pipeline": dict(pipeline or {})}
    return {"messages": messages, "tools": list(traj.tools), "provenance": provenance}


def export_sft(path: str | os.PathLike, trajs: Iterable[Trajectory], tasks: Mapping[str, Task] | None = None,
               agents: Mapping[str, Agent] | None = None, verdicts: Mapping[str, Verdict] | None = None,
               pipeline: Mapping[str, Any] | None = None) -> tuple[int, list[Rejection]]:
    """Write the SFT JSONL atomically; returns (records written, rejections)."""
    lines, rejections = [], []
    for t in trajs:
        try:
            rec = sft_record(t, (tasks or {}).get(t.task_id), (agents or {}).get(t.agent_id),
                             (verdicts or {}).get(t.id), pipeline)
        except (ValueError, KeyError, TypeError) as e:
            rejections.append(Rejection("export", t.id, f"cannot render with the K2 chat template: {e}"))
            continue
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(lines))
    return len(lines), rejections
