"""The run loop of `openk2 eval`: samples x k draws through a model, scored, written as they finish, resumable.

    settings = EvalSettings(benches=["gsm8k"], data_dir=Path("../shared/data"), out_dir=Path("runs/eval/x"))
    results = asyncio.run(run_eval(settings, open_model("openai:http://127.0.0.1:8000/v1", model_name="m")))

Every finished (sample, draw) is appended to `samples.jsonl` at once (flushed), so a run killed at any point
keeps what it scored; rerunning with the same `--out` skips every row whose benchmark settings match and that
did not fail, and (through the response cache in `DIR/llm_cache`) re-asks the model nothing it answered.
Requests that still fail after the backend's retries are recorded as infrastructure errors: excluded from
the score, counted in the report, retried by the next run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openk2.eval.metrics import group_overalls, summarize
from openk2.eval.models import ModelHandle
from openk2.eval.registry import get_benchmark
from openk2.eval.task import Benchmark, Completion, Message, Sample, Score, ScoringInfrastructureError

# Reasoning traces: <think>...</think> (K2-Thinking, DeepSeek-R1, Qwen3) and the Kimi-VL/k1.5 ◁think▷...◁/think▷.
_THINK_PAIRS = (("<think>", "</think>"), ("◁think▷", "◁/think▷"))


def strip_reasoning(text: str | None) -> tuple[str, str]:
    """(answer, reasoning): the text with reasoning blocks removed, and the removed reasoning. An opening tag that
    is never closed (the answer was cut off while thinking) leaves no answer."""
    text = text or ""
    reasoning: list[str] = []
    for open_tag, close_tag in _THINK_PAIRS:
        pattern = re.compile(re.escape(open_tag) + r"(.*?)" + re.escape(close_tag), re.S)
        reasoning += pattern.findall(text)
        text = pattern.sub("", text)
        if close_tag in text:  # templates that put the opening tag in the prompt: everything before the close
            head, text = text.rsplit(close_tag, 1)
            reasoning.append(head)
        if open_tag in text:
            text, tail = text.split(open_tag, 1)
            reasoning.append(tail)
    return text.strip(), "\n".join(r.strip() for r in reasoning)


@dataclass
class EvalSettings:
    benches: list[str]
    data_dir: Path
    out_dir: Path
    k: int | None = None  # None: each benchmark's own (K2's) k
    limit: int | None = None
    concurrency: int = 8
    seed: int = 0
    temperature: float | None = None  # None: each benchmark's own
    top_p: float | None = None
    max_tokens: int | None = None
    max_steps: int | None = None  # step limit of a tau2 episode (None: the reference's 200)
    options: dict[str, Any] = field(default_factory=dict)  # handed to every benchmark (world path, ...)
    progress: bool = True


def bench_settings(bench: Benchmark, s: EvalSettings) -> dict[str, Any]:
    """The sampling settings one benchmark runs with: its K2 defaults, overridden from the command line."""
    out = {"temperature": bench.temperature if s.temperature is None else s.temperature,
           "top_p": bench.top_p if s.top_p is None else s.top_p,
           "max_tokens": bench.max_tokens if s.max_tokens is None else s.max_tokens,
           "k": bench.k if s.k is None else s.k, "limit": s.limit, "seed": s.seed}
    if s.max_steps is not None:  # only when set, so the resume keys of earlier runs stay valid
        out["max_steps"] = s.max_steps
    return out


def settings_key(name: str, settings: dict[str, Any], model_spec: str) -> str:
    """Rows written under other settings (or another model) are not reused on resume."""
    blob = json.dumps({"bench": name, "settings": settings, "model": model_spec}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """samples.jsonl rows; a torn last line (the run was killed mid-write) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def harness_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None


def hash_files(paths: Sequence[Path]) -> dict[str, str]:
    hashes = {}
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        hashes[p.name] = h.hexdigest()
    return hashes


class _Rollout:
    """One (sample, draw): the chat/complete calls it makes, with reasoning stripped and truncation tracked."""

    def __init__(self, handle: ModelHandle, settings: dict[str, Any], seed: int,
                 user: ModelHandle | None) -> None:
        self.handle, self.settings, self.seed, self.user = handle, settings, seed, user
        self.truncated = False
        self.reasoning: list[str] = []
        self.calls = 0

    def _params(self) -> dict[str, Any]:
        s = self.settings
        # Draw d of a sample sends seed + d (and later turns seed + 1000 t): distinct cache keys, distinct samples.
        return {"temperature": s["temperature"], "top_p": s["top_p"], "max_tokens": s["max_tokens"],
                "seed": self.seed + 1000 * self.calls}

    async def chat(self, messages: list[Message], tools: list[dict[str, Any]] | None) -> Message:
        reply = await self.handle.client.chat(messages, tools=tools, **self._params())
        self.calls += 1
        self.truncated |= reply.finish_reason == "length"
        message = {k: v for k, v in reply.message.items() if k != "reasoning_content"}
        answer, reasoning = strip_reasoning(message.get("content"))
        if reasoning or reply.message.get("reasoning_content"):
            self.reasoning.append(reasoning or reply.message.get("reasoning_content") or "")
        message["content"] = answer if message.get("content") is not None else None
        return message

    async def user_chat(self, messages: list[Message], tools: list[dict[str, Any]] | None) -> Message:
        assert self.user is not None
        reply = await self.user.client.chat(messages, tools=tools, temperature=0.0, max_tokens=2048,
                                            seed=self.seed + 1000 * self.calls)
        self.calls += 1
        message = dict(reply.message)
        message["content"] = strip_reasoning(message.get("content"))[0]
        return message

    async def complete(self, prompt: str) -> Completion:
        reply = await self.handle.client.complete(prompt, **self._params())
        self.truncated |= reply.finish_reason == "length"
        return Completion(text=reply.text, finish_reason=reply.finish_reason)


async def _run_one(bench: Benchmark, sample: Sample, draw: int, settings: dict[str, Any], handle: ModelHandle,
                   user: ModelHandle | None, base_seed: int) -> dict[str, Any]:
    rollout = _Rollout(handle, settings, seed=base_seed * 100_000 + draw, user=user)
    row: dict[str, Any] = {"id": sample.id, "draw": draw, "category": sample.category}
    t0 = time.perf_counter()
    try:
        if sample.prompt is not None:
            completion = await rollout.complete(sample.prompt)
        else:
            completion = await bench.rollout(sample, rollout.chat, rollout.user_chat if user is not None else None)
    except Exception as e:  # noqa: BLE001  (anything the endpoint does wrong is an infrastructure error)
        row.update(error=f"{type(e).__name__}: {e}", error_kind="infrastructure", latency_s=time.perf_counter() - t0)
        return row
    if rollout.truncated:
        completion.finish_reason = "length"
    try:
        if bench.score_in_thread:
            score = await asyncio.to_thread(bench.score, sample, completion)
        else:  # in the event loop's (main) thread: math-verify's signal timeouts work there
            score = bench.score(sample, completion)
    except ScoringInfrastructureError as e:
        row.update(error=f"{type(e).__name__}: {e}", error_kind="scoring infrastructure", response=completion.text,
                   latency_s=time.perf_counter() - t0)
        return row
    except Exception as e:  # noqa: BLE001  (a scorer crash on odd output must not end the run)
        score = Score(0.0, details={"scorer_error": f"{type(e).__name__}: {e}"})
    row.update(response=completion.text, tool_calls=completion.tool_calls or None,
               reasoning="\n".join(rollout.reasoning) or None, finish_reason=completion.finish_reason,
               truncated=completion.finish_reason == "length", extracted=score.extracted, score=score.value,
               details=score.details or None, latency_s=round(time.perf_counter() - t0, 4))
    if len(completion.transcript) > len(sample.messages) + 1:  # multi-turn: keep the whole dialog
        row["transcript"] = completion.transcript
    return row


async def run_benchmark(bench: Benchmark, s: EvalSettings, handle: ModelHandle, user: ModelHandle | None,
                        samples_path: Path, samples: list[Sample]) -> dict[str, Any]:
    """Run (or resume) one benchmark on its loaded samples; returns its entry for results.json."""
    settings = bench_settings(bench, s)
    key = settings_key(bench.name, settings, handle.spec)
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for row in read_rows(samples_path):
        if row.get("bench") == bench.name and row.get("settings_key") == key and row.get("error") is None:
            done[(row["id"], row["draw"])] = row
    wanted = {(smp.id, d) for smp in samples for d in range(settings["k"])}
    done = {k: v for k, v in done.items() if k in wanted}
    todo = [(smp, d) for smp in samples for d in range(settings["k"]) if (smp.id, d) not in done]
    rows = list(done.values())
    sem = asyncio.Semaphore(max(1, s.concurrency))
    bar = None
    if s.progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=bench.name, unit="sample", file=sys.stderr)

    with open(samples_path, "a", encoding="utf-8") as out:
        async def one(smp: Sample, draw: int) -> None:
            async with sem:
                row = await _run_one(bench, smp, draw, settings, handle, user, s.seed)
            row = {"bench": bench.name, "settings_key": key, **row,
                   "prompt": smp.prompt if smp.prompt is not None else smp.messages}
            out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            out.flush()
            rows.append(row)
            if bar is not None:
                bar.update(1)

        try:
            await asyncio.gather(*(one(smp, d) for smp, d in todo))
        finally:
            if bar is not None:
                bar.close()

    ok = [r for r in rows if r.get("error") is None]
    item_scores: dict[str, list[float]] = {}
    for r in sorted(ok, key=lambda r: (r["id"], r["draw"])):
        item_scores.setdefault(r["id"], []).append(float(r["score"]))
    categories = {smp.id: smp.category for smp in samples} if bench.categories else None
    summary = summarize(item_scores, k=settings["k"], categories=categories, seed=s.seed)
    custom = bench.aggregate(item_scores) if item_scores else None
    headline = custom if custom is not None else summary["metrics"][bench.metric]["value"]
    if not item_scores:  # every request failed: no score, rather than a NaN that reads like one
        headline = None
    return {
        "score": headline, "metric": bench.metric, "k2_score": bench.k2_score, "data_source": bench.data_source,
        "group": bench.group,
        "settings": settings, "summary": summary,
        "samples": len(rows), "scored": len(ok), "infra_errors": len(rows) - len(ok),
        "truncation_rate": (sum(bool(r.get("truncated")) for r in ok) / len(ok)) if ok else None,
        "resumed": len(done),
        "data_sha256": hash_files(bench.data_files(s.data_dir)),
        "extra": {f"note {i + 1}": note for i, note in enumerate(bench.options.get("notes") or [])},
    }


async def run_eval(s: EvalSettings, handle: ModelHandle, user: ModelHandle | None = None) -> dict[str, Any]:
    """Run every benchmark in `s.benches`, then write results.json and report.md under `s.out_dir`."""
    from openk2.eval.report import write_report

    s.out_dir.mkdir(parents=True, exist_ok=True)
    benches = [get_benchmark(name) for name in s.benches]  # unknown names fail before any model call
    options = {**s.options, "run_dir": handle.run_dir, "has_user_model": user is not None, "max_steps": s.max_steps}
    results_path = s.out_dir / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results: dict[str, Any] = {
        "model": {"spec": handle.spec, "kind": handle.kind, "name": handle.name, **handle.info},
        "user_model": None if user is None else {"spec": user.spec, "name": user.name, **user.info},
        "data_dir": str(s.data_dir.resolve()), "harness_commit": harness_commit(),
        "settings": {"k": s.k, "limit": s.limit, "concurrency": s.concurrency, "seed": s.seed,
                     "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens},
        "benchmarks": dict(previous.get("benchmarks", {})),
    }
    samples_path = s.out_dir / "samples.jsonl"
    # Load every benchmark before the first model call: a missing file or tool fails the run at once.
    loaded = []
    for bench in benches:
        bench = dataclasses.replace(bench, options={**bench.options, **options, "notes": []})
        samples = bench.load(s.data_dir, limit=s.limit, seed=s.seed)
        if not samples:
            raise ValueError(f"{bench.name}: no samples loaded from {s.data_dir}")
        loaded.append((bench, samples))
    try:
        for bench, samples in loaded:
            t0 = time.perf_counter()
            entry = await run_benchmark(bench, s, handle, user, samples_path, samples)
            entry["wall_s"] = round(time.perf_counter() - t0, 3)
            results["benchmarks"][bench.name] = entry
            _write_results(results_path, results, handle, user)
    finally:
        _write_results(results_path, results, handle, user)
    write_report(s.out_dir, results)
    return results


def _write_results(path: Path, results: dict[str, Any], handle: ModelHandle, user: ModelHandle | None) -> None:
    from openk2.utils.io import atomic_write_text

    results["groups"] = group_overalls(results["benchmarks"])
    results["usage"] = handle.client.usage.summary()
    if user is not None:
        results["user_usage"] = user.client.usage.summary()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_text(path, json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
