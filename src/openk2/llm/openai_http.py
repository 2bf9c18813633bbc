"""Backend for any OpenAI-compatible HTTP endpoint (openk2 serve, vLLM, SGLang, hosted APIs).

Retries 408/409/429/5xx answers, timeouts and connection errors with exponential backoff and full jitter
(honouring `Retry-After`), up to `max_retries` times; other 4xx answers fail at once. At most
`max_concurrency` requests are in flight; a request keeps its slot while it backs off, so a rate-limited
endpoint sees the pressure drop.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import httpx

from openk2.llm.client import Backend, LLMError

RETRY_STATUSES = frozenset({408, 409, 429})


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(response: httpx.Response) -> tuple[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase, None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or body["error"]), body
    return str(body)[:500], body


class OpenAIHTTPBackend(Backend):
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        max_concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        seed: int | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.name = f"openai_http:{base_url}"
        self.base_url = base_url.rstrip("/")
        self.max_retries, self.backoff_base, self.backoff_max = max_retries, backoff_base, backoff_max
        all_headers = dict(headers or {})
        if api_key:
            all_headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=all_headers, transport=transport,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )
        self._sem = asyncio.Semaphore(max_concurrency)
        self._sleep = sleep
        self._rng = random.Random(seed)
        self.attempts = 0  # HTTP attempts made, retries included

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `attempt + 1`: full jitter, at least `Retry-After`."""
        delay = self._rng.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))
        return min(self.backoff_max, max(delay, retry_after or 0.0))

    async def request(self, endpoint: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        async with self._sem:
            for attempt in range(self.max_retries + 1):
                retry_after = None
                self.attempts += 1
                try:
                    response = await self._client.post(f"/{endpoint.lstrip('/')}", json=payload)
                except httpx.TimeoutException as e:
                    error = LLMError(f"timeout: {type(e).__name__}", retryable=True)
                except httpx.TransportError as e:
                    error = LLMError(f"connection error: {type(e).__name__}: {e}", retryable=True)
                else:
                    if response.status_code == 200:
                        try:
                            body = response.json()
                        except ValueError:
                            error = LLMError("the response is not JSON", 200, retryable=True)
                        else:
                            if isinstance(body, dict) and "choices" in body:
                                return body
                            error = LLMError(f"unexpected response: {str(body)[:200]}", 200, retryable=True)
                    else:
                        message, body = _error_message(response)
                        status = response.status_code
                        error = LLMError(message, status, retryable=status in RETRY_STATUSES or status >= 500,
                                         body=body)
                        retry_after = _retry_after(response.headers)
                if not error.retryable or attempt == self.max_retries:
                    raise error
                await self._sleep(self.backoff(attempt, retry_after))
        raise AssertionError("unreachable")

    async def stream(self, endpoint: str, payload: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The chunks of a `stream: true` request (server-sent events) as they arrive. Failures before the first
        chunk are retried like `request`; once chunks have been handed out, an error raises `LLMError` (the
        caller holds a partial answer). Closing the iterator early closes the connection, which makes servers
        that watch for it (openk2 serve, vLLM) stop generating."""
        body = {**payload, "stream": True}
        async with self._sem:
            for attempt in range(self.max_retries + 1):
                retry_after = None
                self.attempts += 1
                started = False
                try:
                    async with self._client.stream("POST", f"/{endpoint.lstrip('/')}", json=body) as response:
                        if response.status_code != 200:
                            await response.aread()
                            message, err_body = _error_message(response)
                            status = response.status_code
                            error = LLMError(message, status, retryable=status in RETRY_STATUSES or status >= 500,
                                             body=err_body)
                            retry_after = _retry_after(response.headers)
                        else:
                            async for line in response.aiter_lines():
                                if not line.startswith("data:"):
                                    continue
                                data = line[5:].strip()
                                if data == "[DONE]":
                                    return
                                try:
                                    chunk = json.loads(data)
                                except ValueError:
                                    raise LLMError(f"a streamed chunk is not JSON: {data[:200]}", 200) from None
                                if isinstance(chunk, dict) and "error" in chunk:
                                    message = chunk["error"].get("message") if isinstance(chunk["error"], dict) \
                                        else chunk["error"]
                                    raise LLMError(f"error in the stream: {message}", 200, body=chunk)
                                started = True
                                yield chunk
                            return
                except httpx.TimeoutException as e:
                    if started:
                        raise LLMError(f"timeout mid-stream: {type(e).__name__}") from e
                    error = LLMError(f"timeout: {type(e).__name__}", retryable=True)
                except httpx.TransportError as e:
                    if started:
                        raise LLMError(f"connection error mid-stream: {type(e).__name__}: {e}") from e
                    error = LLMError(f"connection error: {type(e).__name__}: {e}", retryable=True)
                if not error.retryable or attempt == self.max_retries:
                    raise error
                await self._sleep(self.backoff(attempt, retry_after))

    async def aclose(self) -> None:
        await self._client.aclose()
