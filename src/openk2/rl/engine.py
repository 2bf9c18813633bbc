"""`TorchEngine`: the in-process `RolloutEngine` (rl-design §6.2, §6.4) over the serving engine.

It drives `openk2.serve.engine.Engine` (continuous batching over a slot KV cache, the compiled decode step of
`openk2.model.decode`, per-request seeded sampling) from asyncio: every concurrent `generate` call becomes one
sequence of the same batched forward passes, and its tokens are awaited as the engine thread streams them.

Behaviour log-probs. `GenOut.logprobs[i]` is log pi_old(token_i | prefix) with `logprobs="sampling"` (default):
the log-softmax of logits / T at the request's sampling temperature T, before top-p, i.e. exactly what
`token_logprobs(model, ..., temperature=T)` recomputes in the trainer (the K1.5 loss needs log pi_old as the
trainer computes it). Top-p truncation is not in it (the trainer does not apply top-p either; with top_p < 1
the true sampling probability of a kept token is higher than reported). A greedy request (T below
`openk2.serve.sampling.GREEDY_TEMPERATURE`) reports T = 1 logprobs. `logprobs="raw"` always reports the
model's T = 1 distribution (what OpenAI-compatible servers return by default).

Pause / abort / partial rollouts. `pause()` stops decoding (running requests keep their rows and continue on
`resume()`); `abort()` ends every in-flight request: its `generate` returns `finish_reason="abort"` with the
tokens generated so far and their logprobs. A partial rollout resumes as a new request with
prompt + partial response and `max_new_tokens - len(partial)`; greedy, it continues exactly as the
uninterrupted run would have (tested). `update_weights` copies tensors into the engine's model in place (the
compiled decode graphs keep pointing at the same storage); it is refused while a request holds a cache row
(its KV would mix two policies: `abort()` first), and bumps `version`, which each `GenOut` reports.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import torch

from openk2.model.decode import CompileSwitch
from openk2.rl.types import GenOut, SamplingParams
from openk2.serve.engine import Engine
from openk2.serve.generation import FinishEvent, Generation, TokenEvent
from openk2.serve.generation import SamplingParams as ServeSamplingParams
from openk2.serve.sampling import is_greedy

if TYPE_CHECKING:
    from openk2.model.transformer import K2Model

LogprobMode = Literal["sampling", "raw"]

_FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}


class TorchEngine:
    """In-process batched, KV-cached rollout engine; see the module docstring.

    `model` is used as is (put in eval mode): give it its own copy of the policy (`copy.deepcopy(policy)`) so
    that `update_weights` marks the versions the rollouts came from. `max_batch` sequences decode together;
    `max_len` (default: the model's context) bounds prompt + response per request.
    """

    def __init__(
        self,
        model: K2Model,
        *,
        max_batch: int = 32,
        max_len: int | None = None,
        compile: CompileSwitch = "auto",
        logprobs: LogprobMode = "sampling",
        vocab_limit: int | None = None,
        version: int = 0,
    ) -> None:
        if logprobs not in ("sampling", "raw"):
            raise ValueError(f"logprobs must be 'sampling' or 'raw', got {logprobs!r}")
        self.logprobs_mode: LogprobMode = logprobs
        self.version = version
        self.engine = Engine(model, max_batch=max_batch, max_len=max_len, vocab_limit=vocab_limit,
                             compile=compile).start()
        self._in_flight: dict[str, Generation] = {}

    @property
    def model(self) -> K2Model:
        return self.engine.model

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    def close(self) -> None:
        """Stop the engine thread; requests still in flight return finish_reason "abort"."""
        self.engine.stop()

    def __enter__(self) -> TorchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ generation
    def _serve_params(self, n_prompt: int, params: SamplingParams) -> ServeSamplingParams:
        if n_prompt >= self.max_len:
            raise ValueError(f"the prompt has {n_prompt} tokens; the engine's context is {self.max_len} tokens "
                             f"(max_len), which leaves no room for a response: shorten the prompt or build the "
                             f"engine with a larger max_len (at most the model's max_position_embeddings)")
        if params.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {params.max_new_tokens}")
        # A budget past the context is cut to it: the response ends with finish_reason "length" there.
        max_tokens = min(params.max_new_tokens, self.max_len - n_prompt)
        scaled = self.logprobs_mode == "sampling" and not is_greedy(params.temperature)
        return ServeSamplingParams(
            max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p, seed=params.seed,
            stop_token_ids=frozenset(params.stop_token_ids), logprobs=0,
            logprobs_temperature=params.temperature if scaled else 1.0)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> GenOut:
        """Generate one response; concurrent calls are batched. Raises ValueError for a prompt that does not
        fit the context, is empty or holds ids outside the vocabulary, and for a request_id already in flight."""
        if not self.engine.running:
            raise RuntimeError("this TorchEngine is closed: build a new one")
        if request_id in self._in_flight:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        # stream=False: the tokens arrive in one batch at the end (or at abort), so the event loop is not woken
        # at every decode step (each wake-up is a GIL hand-off between the loop and the engine thread).
        gen = self.engine.submit(prompt_ids, self._serve_params(len(prompt_ids), params), stream=False)
        self._in_flight[request_id] = gen
        token_ids: list[int] = []
        logprobs: list[float] = []
        try:
            async for event in gen:
                if isinstance(event, TokenEvent):
                    token_ids.append(event.token_id)
                    logprobs.append(event.logprob.logprob if event.logprob is not None else float("nan"))
        except BaseException:  # the caller was cancelled: free the row
            gen.cancel()
            raise
        finally:
            self._in_flight.pop(request_id, None)
        finish = gen.finish
        assert isinstance(finish, FinishEvent)
        if finish.reason == "error":
            raise RuntimeError(f"generation of {request_id!r} failed: {finish.error}")
        if finish.reason == "stop" and finish.stop_token_id is not None:
            token_ids.append(finish.stop_token_id)
            logprobs.append(finish.stop_logprob.logprob if finish.stop_logprob is not None else float("nan"))
        return GenOut(token_ids=token_ids, logprobs=logprobs, finish_reason=_FINISH_REASONS[finish.reason],  # type: ignore[arg-type]
                      version=self.version)

    # ------------------------------------------------------------------ control
    def pause(self) -> None:
        """Stop decoding (returns once the step in progress has finished); requests wait until `resume()` or
        end with "abort" on `abort()`. Requests submitted while paused queue up."""
        self.engine.pause()

    def resume(self) -> None:
        self.engine.resume()

    @property
    def paused(self) -> bool:
        return self.engine.paused

    def abort(self) -> list[str]:
        """End every in-flight request (running or queued): each `generate` returns finish_reason "abort" with
        the tokens so far and their logprobs. Returns their request ids. The engine stays paused if it was."""
        ids = list(self._in_flight)
        self.engine.cancel_all()
        return ids

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy `named_tensors` (parameter or buffer names of the model, any subset) into the engine's model in
        place and set `version`. Only while no request holds a cache row (idle, or paused after `abort()`)."""
        if self.engine.n_active:
            raise RuntimeError(f"{self.engine.n_active} requests are mid-generation: call pause() and abort() "
                               f"before update_weights (partial rollouts resume with prompt + partial response)")
        targets = dict(self.model.named_parameters())
        targets.update(self.model.named_buffers())
        for name, tensor in named_tensors:
            target = targets.get(name)
            if target is None:
                raise KeyError(f"update_weights: the engine's model has no parameter or buffer {name!r}")
            if target.shape != tensor.shape:
                raise ValueError(f"update_weights: {name} has shape {tuple(tensor.shape)}, the engine's model "
                                 f"{tuple(target.shape)}")
            target.copy_(tensor)
        self.version = version


__all__ = ["LogprobMode", "TorchEngine"]
