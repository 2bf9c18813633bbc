"""The one async LLM interface every openk2 pipeline uses (synthesis, rephrasing, judges, evaluation).

    client = LLMClient(OpenAIHTTPBackend("http://127.0.0.1:8000/v1", api_key=...), model="toy-k2",
                       cache=ResponseCache("runs/x/llm_cache"), usage=UsageTracker(prices))
    reply = await client.chat([{"role": "user", "content": "hi"}], temperature=0.6, max_tokens=256)
    reply.content, reply.tool_calls, reply.usage
    scored = await client.complete("The capital of France is Paris", echo=True, logprobs=1, max_tokens=0)

Requests and responses are the OpenAI wire format (plain dicts), so every backend speaks the same language:
`OpenAIHTTPBackend` (any OpenAI-compatible endpoint: openk2 serve, vLLM, SGLang, hosted APIs), `LocalBackend`
(an openk2 model in this process, no HTTP) and `ReplayBackend` (recorded responses, for deterministic tests).

The client adds what pipelines need on top of a backend: an on-disk `ResponseCache` keyed by the full request
(a rerun, or a resumed run, gets identical answers without calling the model; identical requests in flight at
the same time are sent once), and a `UsageTracker` that counts tokens and cost per model for the run. Cached
requests are deterministic by construction: to draw several independent samples, vary `seed` or use `n`.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from openk2.llm.cache import ResponseCache, request_key
from openk2.llm.usage import Usage, UsageTracker

Message = dict[str, Any]
CHAT = "chat/completions"
COMPLETIONS = "completions"


class LLMError(Exception):
    """A failed request. `status` is the HTTP status (None for transport errors and timeouts)."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False,
                 body: Any = None) -> None:
        super().__init__(message if status is None else f"HTTP {status}: {message}")
        self.message, self.status, self.retryable, self.body = message, status, retryable, body


class Backend(ABC):
    """Executes one OpenAI-format request. `endpoint` is "chat/completions" or "completions"."""

    name: str = "backend"

    @abstractmethod
    async def request(self, endpoint: str, payload: Mapping[str, Any]) -> dict[str, Any]: ...

    async def aclose(self) -> None:  # noqa: B027  (optional hook)
        pass


@dataclass
class _Response:
    """An OpenAI-format response body; `cached` when it came from the response cache."""

    raw: dict[str, Any]
    cached: bool = False

    @property
    def choices(self) -> list[dict[str, Any]]:
        return self.raw["choices"]

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].get("finish_reason")

    @property
    def usage(self) -> Usage:
        return Usage.from_openai(self.raw.get("usage"))

    @property
    def model(self) -> str:
        return self.raw.get("model", "")


class ChatResponse(_Response):
    @property
    def message(self) -> Message:
        """The first choice's assistant message, ready to append to the dialog."""
        return self.choices[0]["message"]

    @property
    def content(self) -> str | None:
        return self.message.get("content")

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return self.message.get("tool_calls") or []


class CompletionResponse(_Response):
    @property
    def text(self) -> str:
        return self.choices[0]["text"]

    @property
    def texts(self) -> list[str]:
        return [c["text"] for c in self.choices]

    @property
    def logprobs(self) -> dict[str, Any] | None:
        return self.choices[0].get("logprobs")


@dataclass
class LLMClient:
    """A backend plus response cache, in-flight deduplication, default parameters and usage accounting."""

    backend: Backend
    model: str | None = None
    cache: ResponseCache | None = None
    usage: UsageTracker = field(default_factory=UsageTracker)
    defaults: dict[str, Any] = field(default_factory=dict)
    _inflight: dict[str, asyncio.Future] = field(default_factory=dict, init=False, repr=False)

    async def chat(self, messages: Sequence[Message], *, model: str | None = None,
                   tools: Sequence[Mapping[str, Any]] | None = None, **params: Any) -> ChatResponse:
        payload = self._payload(model, params)
        payload["messages"] = [dict(m) for m in messages]
        if tools:
            payload["tools"] = [dict(t) for t in tools]
        raw, cached = await self.request(CHAT, payload)
        return ChatResponse(raw, cached)

    async def complete(self, prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]], *,
                       model: str | None = None, **params: Any) -> CompletionResponse:
        payload = self._payload(model, params)
        payload["prompt"] = prompt if isinstance(prompt, str) else [p if isinstance(p, (str, int)) else list(p)
                                                                   for p in prompt]
        raw, cached = await self.request(COMPLETIONS, payload)
        return CompletionResponse(raw, cached)

    def _payload(self, model: str | None, params: Mapping[str, Any]) -> dict[str, Any]:
        model = model or self.model
        if not model:
            raise ValueError("no model: pass model= to the call or to LLMClient")
        payload = {"model": model, **self.defaults, **{k: v for k, v in params.items() if v is not None}}
        if payload.get("stream"):
            raise ValueError("LLMClient requests whole responses; stream is not supported here")
        payload.pop("stream", None)
        return payload

    async def request(self, endpoint: str, payload: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(response, served from cache or a concurrent identical request)."""
        key = request_key(endpoint, payload)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.usage.record(payload["model"], Usage.from_openai(hit.get("usage")), cached=True)
                return hit, True
        while (pending := self._inflight.get(key)) is not None:
            # asyncio.wait never cancels `pending` and only raises if this caller is cancelled.
            await asyncio.wait({pending})
            if pending.cancelled():  # the caller that sent it was cancelled: send it ourselves
                continue
            response = pending.result()
            self.usage.record(payload["model"], Usage.from_openai(response.get("usage")), cached=True)
            return response, True
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            t0 = time.perf_counter()
            response = await self.backend.request(endpoint, payload)
            latency = time.perf_counter() - t0
            if self.cache is not None:
                self.cache.put(key, endpoint, payload, response)
            self.usage.record(payload["model"], Usage.from_openai(response.get("usage")), cached=False,
                              latency_s=latency)
            future.set_result(response)
            return response, False
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # mark retrieved: waiters (if any) get it re-raised, nobody else needs it
            raise
        finally:
            del self._inflight[key]

    async def aclose(self) -> None:
        await self.backend.aclose()

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
