"""Backend for an openk2 model in this process: the serving engine and OpenAI semantics, without HTTP.

Requests go through exactly the code the server runs (`OpenAIService`), so a pipeline gets the same answers
from `LocalBackend` as from `openk2 serve`, and concurrent requests share the engine's batched forward passes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from openk2.llm.client import CHAT, COMPLETIONS, Backend, LLMError
from openk2.serve.protocol import APIError, check_json_value
from openk2.serve.service import OpenAIService


class LocalBackend(Backend):
    def __init__(self, service: OpenAIService, owns_engine: bool = False) -> None:
        self.service = service
        self.name = f"local:{service.model_name}"
        self._owns = owns_engine
        if owns_engine:
            service.start()

    @classmethod
    def from_model_dir(cls, path: str | os.PathLike, *, device: str = "auto", dtype: str = "auto",
                       name: str | None = None, max_batch: int = 16, max_len: int | None = None,
                       tool_call_parser: str | None = None, compile: bool | str = "auto") -> LocalBackend:
        """Load a model directory (`openk2.model_dir.load_model_dir`: weights, tokenizer, chat format) and start
        its engine; `aclose()` stops it. `compile` is the decode step's switch (`openk2.model.decode`)."""
        from openk2.model_dir import load_model_dir
        from openk2.serve.server import build_service

        bundle = load_model_dir(path, device=device, dtype=dtype, name=name, tool_call_parser=tool_call_parser)
        return cls(build_service(bundle, max_batch=max_batch, max_len=max_len, compile=compile), owns_engine=True)

    @property
    def model_name(self) -> str:
        return self.service.model_name

    async def request(self, endpoint: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        # Through JSON, as over HTTP: the server's types are strict (a tuple is not a JSON array, a numpy int not
        # an integer), and the same payload must get the same answer here as from `openk2 serve`.
        try:
            body = json.loads(json.dumps({**payload, "stream": False}, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise LLMError(f"the request is not JSON-serializable: {e}", 400) from None
        try:
            check_json_value(body)
            if endpoint == CHAT:
                return await self.service.run_chat(self.service.prepare_chat(body))
            if endpoint == COMPLETIONS:
                return await self.service.run_completion(self.service.prepare_completion(body))
        except APIError as e:
            raise LLMError(e.message, e.status, retryable=e.status in (429, 503), body=e.body()) from None
        raise LLMError(f"unknown endpoint {endpoint!r}", 404)

    async def aclose(self) -> None:
        if self._owns:
            self._owns = False
            self.service.stop()
