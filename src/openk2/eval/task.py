"""The contract between the evaluation harness and its benchmarks (and the RL stage's verifiable rewards).

A `Benchmark` loads `Sample`s from a data directory and scores one model output per sample; the harness owns
everything else (model specs, sampling, k samples, concurrency, caching, metrics, resume, reports). Benchmarks
that need more than one model call per sample (multi-turn agents, user simulators) implement `rollout` instead
of relying on the harness's single chat call.

    bench = get_benchmark("gsm8k")
    samples = bench.load(Path("../shared/data"), limit=10, seed=0)
    score = bench.score(samples[0], Completion(text="... the answer is 42"))
    score.value  # 1.0 or 0.0 (or partial credit in [0, 1])
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Message = dict[str, Any]


class BenchmarkDataError(ValueError):
    """A missing or malformed data file; the message names the file (and line)."""


class BenchmarkUnavailable(BenchmarkDataError):
    """The benchmark cannot run on this machine (e.g. no Docker); the message says what is missing."""


class ScoringInfrastructureError(RuntimeError):
    """The scorer's own machinery failed (e.g. the SWE-bench Docker harness), not the model: the harness records
    the sample as an infrastructure error, excluded from the score and retried on resume."""


@dataclass
class Sample:
    """One benchmark item, ready to send to a chat model."""

    id: str
    messages: list[Message]  # the OpenAI-format chat prompt
    reference: Any = None  # what the scorer needs: gold answer, tests, gold calls ...
    tools: list[dict[str, Any]] | None = None  # OpenAI-format tool schemas, if the item offers tools
    category: str | None = None  # for per-category breakdowns
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON-ready extras saved with the sample
    # A completion-style item (base models, the world probes): the harness sends this text to the completions
    # endpoint instead of `messages` to the chat endpoint.
    prompt: str | None = None


@dataclass
class Completion:
    """One model output for a sample: the final assistant text (reasoning already stripped by the harness),
    its tool calls, and the whole transcript for multi-turn rollouts."""

    text: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None  # "length" marks a truncated answer
    transcript: list[Message] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # rollout results the scorer needs (e.g. an end state)


@dataclass
class Score:
    value: float  # in [0, 1]
    extracted: Any = None  # the answer the scorer read from the output (saved in samples.jsonl)
    details: dict[str, Any] = field(default_factory=dict)  # JSON-ready, e.g. failing test, error text


# A chat call the harness hands to `rollout`: (messages, tools) -> the assistant message (OpenAI format).
ChatFn = Callable[[list[Message], list[dict[str, Any]] | None], Awaitable[Message]]


@dataclass
class Benchmark:
    """Base class: subclasses set the fields and implement `load` and `score` (and `rollout` if multi-turn)."""

    name: str = ""
    metric: str = "avg@k"  # headline metric: "avg@k", "pass@k" or "pass^k"
    data_source: str = ""  # where the data comes from (path under --data-dir, or "generated")
    k2_score: float | None = None  # K2-Instruct's published number (0-100), None if K2 reports none
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 8192
    k: int = 1  # samples per item
    categories: bool = False  # whether per-category breakdowns are meaningful
    seeded: bool = False  # procedurally generated: `load(seed=...)` draws a fresh item set
    # The harness scores in a worker thread, so slow scorers (sandboxes, Docker) do not stall requests in flight;
    # scorers that need the main thread (math-verify's signal timeouts) set False and run in the event loop.
    score_in_thread: bool = True
    # Benchmarks reported together (tau2's three domains): with two or more of them in one results.json, the
    # report adds the group's task-weighted overall row (`metrics.group_overalls`).
    group: str | None = None
    # Run context the harness hands over (`dataclasses.replace(bench, options=...)`), e.g. the run directory
    # whose world the world benchmarks probe, or `--world`. Benchmarks read what they need and ignore the rest.
    options: dict[str, Any] = field(default_factory=dict)

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        raise NotImplementedError

    def score(self, sample: Sample, completion: Completion) -> Score:
        raise NotImplementedError

    def data_files(self, data_dir: Path) -> list[Path]:
        """The files `load` reads (hashed into results.json); [] for generated benchmarks."""
        return []

    async def rollout(self, sample: Sample, chat: ChatFn, user: ChatFn | None = None) -> Completion:
        """Multi-turn benchmarks override this; the default is one chat call."""
        message = await chat(sample.messages, sample.tools)
        return Completion(text=message.get("content") or "", tool_calls=message.get("tool_calls") or [],
                          transcript=[*sample.messages, message])

    def aggregate(self, scores: dict[str, list[float]]) -> float | None:
        """A benchmark-specific headline (0-100) from per-sample score lists, or None for the harness default
        (the metric over all samples). ACEBench's weighted overall is the example."""
        return None
