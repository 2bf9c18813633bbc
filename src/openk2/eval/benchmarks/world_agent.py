"""`world-agent`: multi-turn tool use in the speedrun's fictional world, on held-out people (in no pretraining
document), so only the tools can answer (`openk2.agentic.world_domain`, `openk2.agentic.world_tasks`).

Each sample is one task (lookup, count, company_city, update, refuse); `rollout` runs the episode loop
(scripted user -> model <-> `WorldEnv` tools, at most `max_steps` model turns); `score` replays the transcript's
tool calls on a fresh database and checks the end state (tau2-bench's DB check) and the final answer (its
COMMUNICATE check): 1.0 only if both hold. `--seed S` draws a fresh set of held-out tasks; `--limit N` sets their
number (default `DEFAULT_TASKS`). The world is the nano recipe's (`data.world_seed` 0, `data.world_people` 100);
a model pretrained on another world needs `WorldAgent(world_seed=..., world_people=...)`.

    bench = WorldAgent()
    samples = bench.load(Path("."), limit=40, seed=1)
    completion = await bench.rollout(samples[0], chat)      # chat(messages, tools) -> assistant message
    bench.score(samples[0], completion).value

`evaluate_model` runs the same loop in-process against a model directory (the speedrun's before/after SFT).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openk2.agentic.world_domain import SYSTEM_PROMPT, TOOLS, WorldEnv
from openk2.agentic.world_tasks import WorldTask, final_answer, make_tasks, run_episode, score_episode
from openk2.data.world import World
from openk2.eval.task import Benchmark, ChatFn, Completion, Sample, Score

DEFAULT_TASKS = 50


@dataclass
class WorldAgent(Benchmark):
    name: str = "world-agent"
    metric: str = "avg@k"
    data_source: str = "generated (openk2.agentic.world_tasks, held-out people)"
    max_tokens: int = 128
    categories: bool = True
    world_seed: int = 0
    world_people: int = 100
    max_steps: int = 6

    def world(self) -> World:
        return _world(self.world_seed, self.world_people)

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        tasks = make_tasks(self.world(), "heldout", limit or DEFAULT_TASKS, seed=seed)
        return [Sample(id=t.id, messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": t.instruction}],
                       reference=t.to_dict(), tools=TOOLS, category=t.kind, metadata={"person": t.person})
                for t in tasks]

    async def rollout(self, sample: Sample, chat: ChatFn, user: ChatFn | None = None) -> Completion:
        # The scripted user of the task speaks (an LLM user simulator adds nothing to one-request tasks).
        task = WorldTask.from_dict(sample.reference)
        episode = await run_episode(WorldEnv(self.world()), task, chat, max_steps=self.max_steps)
        last = episode.messages[-1] if episode.messages else {}
        return Completion(text=final_answer(episode.messages), tool_calls=last.get("tool_calls") or [],
                          finish_reason="max_steps" if episode.error else "stop", transcript=episode.messages)

    def score(self, sample: Sample, completion: Completion) -> Score:
        task = WorldTask.from_dict(sample.reference)
        value, details = score_episode(self.world(), task, completion.transcript)
        return Score(value, extracted=completion.text[:200], details=details)


_WORLDS: dict[tuple[int, int], World] = {}


def _world(seed: int, people: int) -> World:
    if (seed, people) not in _WORLDS:
        _WORLDS[seed, people] = World.generate(seed=seed, n_people=people)
    return _WORLDS[seed, people]


async def evaluate_chat(bench: WorldAgent, samples: list[Sample], chat: ChatFn, concurrency: int = 16
                        ) -> dict[str, Any]:
    """Roll out and score every sample with `chat` (at most `concurrency` episodes at once): success rate overall
    and per task kind, plus the transcripts."""
    sem = asyncio.Semaphore(concurrency)

    async def one(s: Sample) -> tuple[Sample, Completion, Score]:
        async with sem:
            c = await bench.rollout(s, chat)
        return s, c, bench.score(s, c)

    results = await asyncio.gather(*(one(s) for s in samples))
    by_kind: Counter[str] = Counter()
    ok_kind: Counter[str] = Counter()
    called = 0
    for s, _, sc in results:
        by_kind[s.category or ""] += 1
        ok_kind[s.category or ""] += sc.value
        called += sc.details.get("tool_calls", 0) > 0
    n = len(results)
    return {"success": sum(sc.value for _, _, sc in results) / max(n, 1), "n": n,
            "made_tool_calls": called / max(n, 1),
            "by_kind": {k: ok_kind[k] / by_kind[k] for k in sorted(by_kind)},
            "episodes": [{"id": s.id, "kind": s.category, "score": sc.value, **sc.details,
                          "transcript": c.transcript} for s, c, sc in results]}


def evaluate_model(model_dir: str | os.PathLike, *, n: int = 40, seed: int = 0, world_seed: int = 0,
                   world_people: int = 100, device: str = "auto", max_tokens: int = 96,
                   concurrency: int = 16, compile: bool | str = False) -> dict[str, Any]:
    """`world-agent` success of the model in `model_dir` (a run directory or HF checkpoint), in this process
    through the serving engine (`openk2.llm.LocalBackend`), greedy. The decode step is not compiled by default:
    a few hundred short episodes on a nano model finish before the compiled step's graphs would have paid off."""
    from openk2.llm import LLMClient, LLMError
    from openk2.llm.local import LocalBackend

    bench = WorldAgent(world_seed=world_seed, world_people=world_people)
    samples = bench.load(Path("."), limit=n, seed=seed)

    async def main() -> dict[str, Any]:
        backend = LocalBackend.from_model_dir(model_dir, device=device, max_batch=concurrency, compile=compile)
        client = LLMClient(backend, model=backend.model_name)

        async def chat(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> dict[str, Any]:
            try:
                r = await client.chat(messages, tools=tools, temperature=0.0, max_tokens=max_tokens)
            except LLMError as e:  # e.g. the dialog outgrew the context: the episode ends without an answer
                return {"role": "assistant", "content": f"[error: {e.message}]"}
            return r.message

        try:
            return await evaluate_chat(bench, samples, chat, concurrency)
        finally:
            await client.aclose()

    return asyncio.run(main())


BENCHMARKS = [WorldAgent()]

__all__ = ["BENCHMARKS", "DEFAULT_TASKS", "WorldAgent", "evaluate_chat", "evaluate_model"]
