"""What the engine takes and gives: `SamplingParams` per sequence, the events it streams (`TokenEvent`,
`PromptLogprobsEvent`, then exactly one `FinishEvent`) and the `Generation` handle they arrive on."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openk2.serve.engine import Engine

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to generate one sequence. `temperature` below `sampling.GREEDY_TEMPERATURE` (0 included) is greedy;
    `logprobs` = k returns the chosen token's log-probability plus the k most likely alternatives (0: just the
    chosen one; None: nothing)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    banned_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo)
    # The temperature the reported logprobs are normalized at: 1.0 (default, as OpenAI and vLLM) is the model's
    # raw distribution; the RL engine passes the sampling temperature to get the behaviour policy's logprobs.
    logprobs_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.logprobs_temperature > 0:
            raise ValueError(f"logprobs_temperature must be > 0, got {self.logprobs_temperature}")
        for k in (self.logprobs, self.prompt_logprobs):
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {k}")


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class PromptLogprobsEvent:
    entries: list[TokenLogprob | None]  # one per prompt token; the first is None (nothing predicts it)


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "stop" (a stop token), "length", "cancelled" or "error"
    n_generated: int  # tokens sampled, including a stop token
    stop_token_id: int | None = None
    error: str | None = None
    stop_logprob: TokenLogprob | None = None  # the stop token's logprob, when logprobs were asked for


Event = TokenEvent | PromptLogprobsEvent | FinishEvent


class Generation:
    """Handle of one submitted sequence. Iterate it for its events (the last is a `FinishEvent`);
    `cancel()` frees its cache row at the engine's next iteration."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine, self.prompt_ids, self.params = engine, prompt_ids, params
        self.stream = True  # False: the engine holds the events until the end (`Engine.submit(stream=False)`)
        self._held: list[Event] = []
        self.cancelled = False
        self.finish: FinishEvent | None = None
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._aq: asyncio.Queue[Event] | None = asyncio.Queue() if self._loop is not None else None
        self._q: queue.SimpleQueue[Event] | None = queue.SimpleQueue() if self._loop is None else None

    def cancel(self) -> None:
        if not self.cancelled and self.finish is None:
            self.cancelled = True
            self.engine._wake()

    async def batches(self) -> AsyncIterator[list[Event]]:
        """Events in batches: everything that arrived since the consumer last looked (one per engine step
        when it keeps up, more when it falls behind, so a slow consumer does less work per token)."""
        if self._aq is None:
            raise RuntimeError("this Generation was submitted outside an event loop; iterate it with `for`")
        while self.finish is None:
            batch = [await self._aq.get()]
            while not self._aq.empty():
                batch.append(self._aq.get_nowait())
            for event in batch:
                if isinstance(event, FinishEvent):
                    self.finish = event
            yield batch

    async def __aiter__(self) -> AsyncIterator[Event]:
        async for batch in self.batches():
            for event in batch:
                yield event

    def __iter__(self) -> Iterator[Event]:
        if self._q is None:
            raise RuntimeError("this Generation was submitted inside an event loop; iterate it with `async for`")
        while self.finish is None:
            event = self._q.get()
            if isinstance(event, FinishEvent):
                self.finish = event
            yield event

    def result(self) -> tuple[list[int], FinishEvent]:
        """Blocking: the generated token ids and the finish event (sync handles only)."""
        ids = [e.token_id for e in self if isinstance(e, TokenEvent)]
        assert self.finish is not None
        return ids, self.finish
