"""Backend that answers from recorded responses, for deterministic pipeline tests (no model, no network).

Three sources, tried in order: recorded request/response records (from a `ResponseCache` directory or a JSONL
export of one: the way to record is to run the pipeline once against a real backend with a cache), a `script`
of responses returned in order whatever the request (e.g. a scripted user simulator), and a `responder`
function. A request none of them answers raises `ReplayMiss` naming the request, so a test fails loudly when
the pipeline's requests change. `calls` records every request for assertions.
"""

from __future__ import annotations

import copy
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from openk2.llm.cache import ResponseCache, request_key
from openk2.llm.client import CHAT, Backend, LLMError

Responder = Callable[[str, Mapping[str, Any]], "dict[str, Any] | str | None"]


class ReplayMiss(LLMError):
    def __init__(self, endpoint: str, payload: Mapping[str, Any]) -> None:
        summary = json.dumps(payload, ensure_ascii=False)[:300]
        super().__init__(f"no recorded response for {endpoint} request {request_key(endpoint, payload)[:12]}: "
                         f"{summary}", 404)


def chat_response(content: str | None = None, tool_calls: list[dict[str, Any]] | None = None,
                  model: str = "replay", finish_reason: str | None = None, prompt_tokens: int = 0,
                  completion_tokens: int = 0) -> dict[str, Any]:
    """An OpenAI chat.completion dict, for scripts and responders."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": "chatcmpl-replay", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop")}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class ReplayBackend(Backend):
    name = "replay"

    def __init__(self, records: Iterable[Mapping[str, Any]] = (), *, cache: ResponseCache | None = None,
                 script: Iterable[dict[str, Any] | str] = (), responder: Responder | None = None) -> None:
        self._records = {r.get("key") or request_key(r["endpoint"], r["request"]): r["response"] for r in records}
        self._cache = cache
        self._script = deque(script)
        self._responder = responder
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, **kw: Any) -> ReplayBackend:
        with open(path, encoding="utf-8") as f:
            return cls([json.loads(line) for line in f if line.strip()], **kw)

    @classmethod
    def from_cache(cls, directory: str | os.PathLike, **kw: Any) -> ReplayBackend:
        return cls(cache=ResponseCache(directory), **kw)

    async def request(self, endpoint: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append((endpoint, copy.deepcopy(dict(payload))))
        key = request_key(endpoint, payload)
        if key in self._records:
            return copy.deepcopy(self._records[key])
        if self._cache is not None:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
        answer: dict[str, Any] | str | None = None
        if self._script:
            answer = self._script.popleft()
        elif self._responder is not None:
            answer = self._responder(endpoint, payload)
        if answer is None:
            raise ReplayMiss(endpoint, payload)
        if isinstance(answer, str):
            if endpoint != CHAT:
                return {"id": "cmpl-replay", "object": "text_completion", "created": 0, "model": payload.get("model"),
                        "choices": [{"index": 0, "text": answer, "logprobs": None, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
            return chat_response(answer, model=str(payload.get("model", "replay")))
        return copy.deepcopy(answer)
