"""`OpenAIEngine`: the `RolloutEngine` interface over an OpenAI-compatible server (openk2 serve, vLLM).

Token-in/token-out through `/v1/completions` with vLLM's request fields: the prompt is a list of token ids,
`return_token_ids` returns the generated ids (a stop token included), `return_tokens_as_token_ids` names the
logprob tokens "token_id:{id}" (the fallback when a server lacks `token_ids`), `logprobs: 0` the chosen
token's logprob, `stop_token_ids` with `ignore_eos` makes the request's stop ids the only ones (as
`TorchEngine`), `skip_special_tokens: false`. Each request is streamed, so `abort()` can return what was
generated so far.

Log-probs: what the server returns, which for openk2 serve and vLLM's default (`--logprobs-mode raw_logprobs`)
is the model's T = 1 distribution, i.e. `token_logprobs(model, ..., temperature=1.0)`, not the temperature-scaled
behaviour policy that `TorchEngine` reports by default. When sampling at T != 1, recompute log pi_old with
`token_logprobs(..., temperature=T)` in the trainer (rl-design §6.3 allows a trainer-recomputed pi_old) or
start vLLM with `--logprobs-mode processed_logprobs`.

Control: `pause()` holds new requests in this client until `resume()` (a remote server keeps decoding what
it has: `abort()` ends those); `abort()` cancels the in-flight HTTP streams (closing a stream makes openk2 serve
and vLLM drop the request) and each `generate` returns `finish_reason="abort"` with the tokens so far.
`update_weights` cannot push tensors to a remote server: see its docstring.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from openk2.llm import COMPLETIONS, OpenAIHTTPBackend
from openk2.rl.types import GenOut, SamplingParams

_TOKEN_ID_PREFIX = "token_id:"


@dataclass
class _Request:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    task: asyncio.Task | None = None
    aborted: bool = False


def _chunk_tokens(choice: dict[str, Any]) -> tuple[list[int], list[float]]:
    """The token ids and logprobs of one streamed choice chunk."""
    lp = choice.get("logprobs") or {}
    logprobs = [float("nan") if x is None else float(x) for x in lp.get("token_logprobs") or []]
    ids = choice.get("token_ids")
    if ids is None:  # a server without return_token_ids: the "token_id:{id}" names of the logprob tokens
        tokens = lp.get("tokens") or []
        if any(not str(t).startswith(_TOKEN_ID_PREFIX) for t in tokens):
            raise ValueError("the server returned neither token_ids nor token-id logprob tokens: it does not "
                             "support return_token_ids / return_tokens_as_token_ids (vLLM >= 0.10.2 and "
                             "openk2 serve do)")
        ids = [int(str(t)[len(_TOKEN_ID_PREFIX):]) for t in tokens]
    if len(logprobs) != len(ids):
        raise ValueError(f"the server returned {len(ids)} token ids but {len(logprobs)} logprobs in one chunk")
    return [int(t) for t in ids], logprobs


class OpenAIEngine:
    """A remote rollout engine; see the module docstring. `backend` (an `OpenAIHTTPBackend`) overrides
    `base_url`/`api_key`/`max_concurrency`/`timeout`."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, max_concurrency: int = 64,
                 timeout: float = 600.0, version: int = 0, backend: OpenAIHTTPBackend | None = None) -> None:
        self.backend = backend or OpenAIHTTPBackend(base_url, api_key, max_concurrency=max_concurrency,
                                                    timeout=timeout)
        self.model_name = model
        self.version = version
        self._in_flight: dict[str, _Request] = {}
        self._running: asyncio.Event | None = None  # created lazily inside the event loop
        self._paused = False

    def _payload(self, prompt_ids: list[int], params: SamplingParams) -> dict[str, Any]:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        payload: dict[str, Any] = {
            "model": self.model_name, "prompt": list(prompt_ids), "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "logprobs": 0,
            "return_token_ids": True, "return_tokens_as_token_ids": True, "skip_special_tokens": False,
            "ignore_eos": True, "stop_token_ids": list(params.stop_token_ids), "add_bos": False,
        }
        if params.seed is not None:
            payload["seed"] = params.seed
        return payload

    async def _stream(self, payload: dict[str, Any], req: _Request) -> None:
        async for chunk in self.backend.stream(COMPLETIONS, payload):
            for choice in chunk.get("choices") or []:
                ids, logprobs = _chunk_tokens(choice)
                req.token_ids += ids
                req.logprobs += logprobs
                if choice.get("finish_reason") is not None:
                    req.finish_reason = choice["finish_reason"]

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> GenOut:
        """Generate one response remotely. A request the server refuses (e.g. a prompt beyond its context)
        raises `openk2.llm.LLMError` with the server's message."""
        if request_id in self._in_flight:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        payload = self._payload(prompt_ids, params)
        req = _Request()
        self._in_flight[request_id] = req
        try:
            if self._paused:
                await self._resumed().wait()
            if not req.aborted:
                req.task = asyncio.ensure_future(self._stream(payload, req))
                try:
                    await req.task
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if not req.aborted or (current is not None and current.cancelling()):
                        raise  # the caller itself was cancelled
        finally:
            self._in_flight.pop(request_id, None)
            if req.task is not None and not req.task.done():
                req.task.cancel()
        reason = "abort" if req.aborted or req.finish_reason is None else req.finish_reason
        if reason not in ("stop", "length", "abort"):
            reason = "length"
        return GenOut(token_ids=req.token_ids, logprobs=req.logprobs, finish_reason=reason,  # type: ignore[arg-type]
                      version=self.version)

    def _resumed(self) -> asyncio.Event:
        if self._running is None:
            self._running = asyncio.Event()
            if not self._paused:
                self._running.set()
        return self._running

    def pause(self) -> None:
        """New requests wait (client side) until `resume()`; the server keeps decoding those it has."""
        self._paused = True
        if self._running is not None:
            self._running.clear()

    def resume(self) -> None:
        self._paused = False
        if self._running is not None:
            self._running.set()

    @property
    def paused(self) -> bool:
        return self._paused

    def abort(self) -> list[str]:
        """Cancel every in-flight request (call from the event loop's thread); each `generate` returns
        finish_reason "abort" with the tokens received so far. Returns their request ids."""
        ids = list(self._in_flight)
        for req in self._in_flight.values():
            req.aborted = True
            if req.task is not None:
                req.task.cancel()
        if self._running is not None and self._paused:
            # Wake the requests held by pause() (they return "abort"); later ones wait on a fresh event.
            self._running.set()
            self._running = None
        return ids

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Not possible over the OpenAI API. For a remote server, update it out of band and then set
        `engine.version`: restart `openk2 serve` on the new checkpoint (`openk2 export`/the RL run's checkpoint
        dir), or for vLLM push the tensors with MoonshotAI/checkpoint-engine (`ParameterServer.update` with
        `VllmColocateWorkerExtension`, through vLLM's `/collective_rpc`), verl's checkpoint engine, or vLLM's
        `update_weights_from_disk`-style endpoints; see docs/rl.md."""
        raise NotImplementedError(
            "OpenAIEngine cannot receive weights over the OpenAI API: update the server out of band (restart "
            "`openk2 serve` on the new checkpoint, or checkpoint-engine / vLLM /collective_rpc for vLLM), then set "
            "engine.version; in-process runs use TorchEngine")

    async def aclose(self) -> None:
        await self.backend.aclose()


__all__ = ["OpenAIEngine"]
