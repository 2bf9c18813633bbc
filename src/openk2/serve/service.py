"""OpenAI chat and completions semantics over the engine, shared by the HTTP app and the in-process backend.

`prepare_*` turns a request body into a job (or raises `APIError` before anything runs, so streaming requests
still get a proper 4xx); `stream_*` yields the response chunks; `run_*` is the non-streaming response, built
by concatenating the very same chunks, so the two can never disagree.

Decisions:
- Chat prompts come from the model's `ChatFormat` (`openk2.data.chat_format`: openk2's K2 renderer, or the
  checkpoint's own Jinja template); tool-call ids in the history are first renamed `functions.NAME:IDX`
  (`renumber_tool_call_ids`), as K2 was trained on. Generation stops at the format's end-of-turn tokens (K2:
  `<|im_end|>` or `[EOS]`); completions stop at EOS or BOS (a pretraining document ends where the model predicts
  the next document's BOS). `ignore_eos` turns these stops off.
- Special tokens are left out of the returned text unless `skip_special_tokens` is false (as in vLLM); the
  tool-call markers are kept while tools are active, since the tool-call section is parsed from them.
- Every sequence of a request is checked against the engine's limits in `prepare_*`, before a response
  starts: one that can never be served (too long, more sequences than the server ever queues) is a 400
  naming the limit; a 503 with `Retry-After` means only that the queue is full right now.
- Tool calls use the format's parser (`openk2.data.tool_parsers`, K2's below); a model without one refuses
  requests that declare tools (unless tool_choice is "none"). `tool_choice`: "auto" renders the tools and parses
  calls; "none" still renders them (the model sees the same context) but bans the tool-call marker tokens while
  sampling, so it cannot call; "required" forces the section opener `<|tool_calls_section_begin|>`; a named
  function forces
  `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>` (IDX = the
  number of calls already in the dialog) and stops at `<|tool_call_end|>`, after which the section is closed.
  Forced tokens count as prompt tokens.
- A tool-call section is parsed by the parser once generation ends. If it is malformed
  (invalid JSON arguments, bad ids, truncation, an undeclared tool name) the whole raw text, forced prefix
  included, is returned as `content` with the engine's finish reason, plus a `tool_call_error` field on the
  choice saying why; never a 5xx. There is no constrained decoding, so a forced call can still be malformed.
- While streaming, content before the section is streamed as it is generated; the section itself is held back
  and sent at the end either as `tool_calls` (with `finish_reason: "tool_calls"`) or, if malformed, as content.
- Stop strings end generation and are cut from the text (not applied inside a tool-call section). While
  streaming, text that might be the start of a stop string is held back until it is decided.
- Logprobs are the log-softmax of the raw logits (before temperature, top-p and logit bias).
- `n` > 1 runs n sequences; choice i samples with seed `seed + i`. Prompt tokens are counted once per prompt.
- Usage is in every non-streaming response; a stream carries it on its last chunk, or on a separate final
  chunk with empty `choices` when `stream_options.include_usage` is set (OpenAI's form).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from openk2.data.chat_format import ChatFormat
from openk2.data.tokenizer import Tokenizer
from openk2.data.toolcall import renumber_tool_call_ids
from openk2.serve import protocol as P
from openk2.serve.detokenize import IncrementalDetokenizer, TextTracker
from openk2.serve.engine import (
    Engine,
    FinishEvent,
    Generation,
    PromptLogprobsEvent,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from openk2.serve.protocol import APIError


@dataclass
class _Job:
    id: str
    created: int
    stream: bool
    include_usage: bool
    prompts: list[list[int]]  # one per prompt (chat: exactly one)
    params: list[list[SamplingParams]]  # [prompt][choice]
    stops: list[str]
    n: int
    # chat
    logprobs: bool = False
    tools_active: bool = False
    tool_names: frozenset[str] = frozenset()
    prefix_text: str = ""
    forced_named: bool = False
    skip_ids: frozenset[int] = frozenset()  # special tokens not to put in the text
    calls_before: int = 0  # tool calls earlier in the dialog (ids of formats whose calls carry none)
    # completions
    echo: bool = False
    echo_texts: list[str] = field(default_factory=list)
    bos_added: list[bool] = field(default_factory=list)
    completion_logprobs: int | None = None
    return_token_ids: bool = False
    tokens_as_ids: bool = False  # return_tokens_as_token_ids
    # filled while running
    completion_tokens: list[int] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def usage(self) -> dict[str, int]:
        return P.usage(self.prompt_tokens, sum(self.completion_tokens))


class OpenAIService:
    """Chat and completions over one model; owns the engine's lifetime (`start`/`stop`)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str,
                 chat_format: ChatFormat | None = None) -> None:
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.chat = chat_format if chat_format is not None else ChatFormat.k2(tokenizer)
        self.parser = self.chat.tool_parser
        self.created = int(time.time())
        self.marker_ids = self.chat.marker_ids()
        self.tool_call_end_id = tokenizer.token_id(self.parser.call_end) if self.parser else None
        self.chat_stop_ids = self.chat.stop_ids
        self.completion_stop_ids = self.chat.completion_stop_ids
        self.special_ids = frozenset(tokenizer.special_ids.values())
        self._token_text: dict[int, str] = {}
        self._bytes: dict[int, bytes] | None = None

    # ------------------------------------------------------------------ lifecycle and info
    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    @property
    def context_len(self) -> int:
        return self.engine.max_len

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [P.model_card(self.model_name, self.created, self.context_len)]}

    def model(self, name: str) -> dict[str, Any]:
        self._check_model(name)
        return P.model_card(self.model_name, self.created, self.context_len)

    def health(self) -> dict[str, Any]:
        s = self.engine.stats
        return {"status": "ok" if self.engine.running else "stopped", "model": self.model_name,
                "active": self.engine.n_active, "waiting": self.engine.n_waiting, "max_batch": self.engine.max_batch,
                "max_model_len": self.context_len, "submitted": s.submitted, "completed": s.completed,
                "cancelled": s.cancelled, "errors": s.errors, "decode_steps": s.decode_steps,
                "mean_batch": s.batch_size_sum / s.decode_steps if s.decode_steps else 0.0}

    def _check_capacity(self) -> None:
        # Checked before a response starts, so an overloaded server answers 503 rather than failing mid-stream.
        if self.engine.n_waiting >= self.engine.max_waiting:
            raise _overloaded("too many waiting requests")
        if not self.engine.running:
            raise APIError(503, "the engine is not running", type="server_error", headers={"Retry-After": "5"})

    def _check_job(self, job: _Job, prompt_param: str) -> _Job:
        """Every sequence of `job` against the engine's limits, before anything is submitted or streamed."""
        total = len(job.prompts) * job.n
        if total > self.engine.max_waiting:  # can never be queued at once: a 400, not a (retried) 503
            limit = self.engine.max_waiting
            raise APIError(400, f"this request needs {total} sequences (prompts x n), more than the {limit} this "
                                f"server can queue; split it into smaller requests", param="n")
        if self.engine.n_waiting + total > self.engine.max_waiting:
            raise _overloaded(f"{self.engine.n_waiting} sequences are waiting and this request adds {total}")
        for prompt, params in zip(job.prompts, job.params, strict=True):
            for p in params:
                try:
                    self.engine.check(prompt, p)
                except ValueError as e:
                    code = "context_length_exceeded" if "context" in str(e) else None
                    raise APIError(400, str(e), param=prompt_param, code=code) from None
        return job

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------------ tokens
    def token_text(self, token_id: int) -> str:
        s = self._token_text.get(token_id)
        if s is None:
            s = self._token_text[token_id] = self.tok.decode([token_id])
        return s

    def token_bytes(self, token_id: int) -> list[int]:
        if self._bytes is None:
            table = {i: b for b, i in self.tok.mergeable_ranks().items()}
            table.update({i: t.encode() for t, i in self.tok.special_ids.items()})
            self._bytes = table
        return list(self._bytes.get(token_id, b""))

    # ------------------------------------------------------------------ chat
    def prepare_chat(self, body: Any) -> _Job:
        req: P.ChatCompletionRequest = P.parse_request(P.ChatCompletionRequest, body)
        self._check_model(req.model)
        self._check_capacity()
        stops, bias = P.check_sampling(req, self.tok.vocab_size)
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        tools = P.check_tools(req.tools)
        choice = P.check_tool_choice(req.tool_choice, tools)
        if tools and self.parser is None and choice != "none":  # "none" only shows the tools: nothing to parse
            raise APIError(400, "this model has no tool-call format; start the server with --tool-call-parser",
                           param="tools")
        messages = [self._message(i, m) for i, m in enumerate(req.messages)]
        try:
            messages = renumber_tool_call_ids(messages)
            prompt = self.chat.render_ids(messages, tools or None, add_generation_prompt=True)
        except (ValueError, TypeError, KeyError) as e:
            raise APIError(400, f"invalid messages: {e}", param="messages") from None
        except RecursionError:
            raise APIError(400, "invalid messages: nested too deeply", param="messages") from None
        n_calls = sum(len(m.get("tool_calls") or []) for m in messages)
        prefix: list[tuple[str, bool]] = []
        if self.parser is not None and choice == "required":
            prefix = self.parser.forced_prefix(None, n_calls)
        elif self.parser is not None and isinstance(choice, tuple):
            prefix = self.parser.forced_prefix(choice[1], n_calls)
        for text, special in prefix:
            prompt += [self.tok.token_id(text)] if special else self.tok.encode(text)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._max_tokens(len(prompt), max_tokens, allow_zero=False, prompt_param="messages")
        stop_ids = set() if req.ignore_eos else set(self.chat_stop_ids)
        if isinstance(choice, tuple) and self.tool_call_end_id is not None:
            stop_ids.add(self.tool_call_end_id)
        banned = tuple(sorted(self.marker_ids)) if choice == "none" and tools else ()
        params = [SamplingParams(max_tokens=max_tokens, temperature=req.resolved_temperature,
                                 top_p=req.resolved_top_p, seed=None if req.seed is None else req.seed + i,
                                 stop_token_ids=frozenset(stop_ids), banned_token_ids=banned, logit_bias=bias,
                                 logprobs=(req.top_logprobs or 0) if req.logprobs else None)
                  for i in range(req.resolved_n)]
        tools_active = bool(tools) and choice != "none"
        return self._check_job(_Job(
                    id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), stream=bool(req.stream),
                    include_usage=req.include_usage, prompts=[prompt], params=[params], stops=stops,
                    n=req.resolved_n, logprobs=bool(req.logprobs), skip_ids=self._skip_ids(req, tools_active),
                    tools_active=tools_active,
                    tool_names=frozenset(t["function"]["name"] for t in tools),
                    prefix_text="".join(text for text, _ in prefix), forced_named=isinstance(choice, tuple),
                    calls_before=n_calls),
            prompt_param="messages")

    def _skip_ids(self, req: P._Sampling, tools_active: bool) -> frozenset[int]:
        if not req.skip_special_tokens:
            return frozenset()
        # While tools are active the markers delimit the tool-call section, which is parsed, not returned.
        return self.special_ids - self.marker_ids if tools_active else self.special_ids

    @staticmethod
    def _message(i: int, m: P.ChatMessage) -> dict[str, Any]:
        if m.content is None and m.role in ("system", "developer", "user", "tool"):
            raise APIError(400, f"messages[{i}] ({m.role}) needs content", param=f"messages[{i}].content")
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, f"messages[{i}]: only assistant messages have tool_calls", param=f"messages[{i}]")
        if m.role == "tool" and not m.tool_call_id:
            raise APIError(400, f"messages[{i}]: a tool message needs tool_call_id", param=f"messages[{i}]")
        # "developer" is OpenAI's newer name for the system role.
        out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        out["content"] = (m.content if isinstance(m.content, str) or m.content is None
                          else [{"type": "text", "text": p.text} for p in m.content])
        if m.name:
            out["name"] = m.name
        if m.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in m.tool_calls]
        if m.tool_call_id is not None:
            out["tool_call_id"] = m.tool_call_id
        return out

    def _max_tokens(self, n_prompt: int, max_tokens: int | None, allow_zero: bool, prompt_param: str) -> int:
        ctx = self.context_len
        if n_prompt + (0 if allow_zero else 1) > ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens, but the prompt has "
                                f"{n_prompt} tokens", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            return ctx - n_prompt
        if max_tokens < (0 if allow_zero else 1):
            raise APIError(400, f"max_tokens must be at least {0 if allow_zero else 1}, got {max_tokens}",
                           param="max_tokens")
        if n_prompt + max_tokens > ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens, but you requested "
                                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                                f"completion)", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def _submit(self, prompt: list[int], params: SamplingParams) -> Generation:
        try:
            return self.engine.submit(prompt, params)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except OverflowError as e:
            raise _overloaded(str(e)) from None
        except RuntimeError as e:
            raise APIError(503, str(e), type="server_error") from None

    def _chat_logprobs(self, entries: Sequence[TokenLogprob | None]) -> list[dict[str, Any]]:
        out = []
        for e in entries:
            if e is None:
                continue
            out.append({"token": self.token_text(e.token_id), "logprob": e.logprob,
                        "bytes": self.token_bytes(e.token_id),
                        "top_logprobs": [{"token": self.token_text(t), "logprob": lp, "bytes": self.token_bytes(t)}
                                         for t, lp in e.top]})
        return out

    async def _event_batches(self, gen: Generation) -> AsyncIterator[list[TokenEvent | PromptLogprobsEvent]]:
        """The generation's events, batched as they arrive, up to its end (not included); raises on engine
        errors. Closing it early cancels the generation, which frees its cache row."""
        try:
            async for batch in gen.batches():
                out = [e for e in batch if not isinstance(e, FinishEvent)]
                if out:
                    yield out
            assert gen.finish is not None
            if gen.finish.reason == "error":
                raise APIError(500, gen.finish.error or "generation failed", type="server_error")
            if gen.finish.reason == "cancelled":
                raise APIError(503, "generation was cancelled (server shutting down)", type="server_error")
        finally:
            gen.cancel()  # no-op when finished

    async def _feed(self, gen: Generation, tr: TextTracker, job: _Job, slot: int,
                    prompt_lp: list | None = None) -> AsyncIterator[None]:
        """Push the generation's tokens into `tr`, yielding after each batch (the caller then streams what
        `tr` allows); stops early at a stop string. Records the choice's completion tokens."""
        events = self._event_batches(gen)
        try:
            async for batch in events:
                for ev in batch:
                    if isinstance(ev, PromptLogprobsEvent):
                        if prompt_lp is not None:
                            prompt_lp.append(ev.entries)
                        continue
                    tr.push(ev.token_id, ev.logprob, job.tools_active and ev.token_id in self.marker_ids)
                    if tr.stopped:
                        break
                job.completion_tokens[slot] = len(tr.offsets)
                yield
                if tr.stopped:
                    return
        finally:
            await events.aclose()
        tr.finish()
        if gen.finish is not None:
            job.completion_tokens[slot] = gen.finish.n_generated  # includes a stop token

    async def _chat_choice(self, job: _Job, index: int) -> AsyncIterator[dict[str, Any]]:
        gen = self._submit(job.prompts[0], job.params[0][index])
        forced = bool(job.prefix_text)
        tr = TextTracker(self.tok, job.stops, section_at=0 if forced else None, skip_ids=job.skip_ids)
        yield {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        async for _ in self._feed(gen, tr, job, index):
            text, lps = tr.take()
            if text:
                yield {"index": index, "delta": {"content": text},
                       "logprobs": {"content": self._chat_logprobs(lps)} if job.logprobs else None,
                       "finish_reason": None}
        finish = None if tr.stopped else gen.finish
        reason = "stop" if tr.stopped or (finish is not None and finish.reason == "stop") else "length"
        final: dict[str, Any] = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        parsed_calls, error = None, None
        if job.tools_active and self.parser is not None and tr.section_at is not None and not tr.stopped:
            text = job.prefix_text + tr.text
            if job.forced_named and finish is not None and finish.stop_token_id == self.tool_call_end_id:
                text += self.parser.named_suffix
            parsed = self.parser.parse(text, job.calls_before)
            error = parsed.error
            if error is None and not parsed.tool_calls:
                error = "no tool call in the tool-calls section"
            unknown = sorted({c.name for c in parsed.tool_calls} - job.tool_names)
            if error is None and unknown:
                error = f"calls undeclared tools {unknown}"
            if error is None:
                parsed_calls = parsed.tool_calls
        if parsed_calls is not None:
            _, lps = tr.rest()
            final["delta"] = {"tool_calls": [{"index": k, **c.to_openai()} for k, c in enumerate(parsed_calls)]}
            final["finish_reason"] = "tool_calls"
        else:
            text, lps = tr.rest()
            if forced:
                text = job.prefix_text + text
            if text:
                final["delta"] = {"content": text}
            if error is not None:
                final["tool_call_error"] = error
        if job.logprobs:
            final["logprobs"] = {"content": self._chat_logprobs(lps)}
        yield final

    async def stream_chat(self, job: _Job) -> AsyncIterator[dict[str, Any]]:
        """Chat completion chunks; the usage rides on the last one (or a final usage-only chunk)."""
        job.completion_tokens = [0] * job.n
        choices = [self._chat_choice(job, i) for i in range(job.n)]
        async for out in _chunks(job, choices, partial(P.chat_chunk, job.id, job.created, self.model_name)):
            yield out

    async def run_chat(self, job: _Job) -> dict[str, Any]:
        job.completion_tokens = [0] * job.n
        msgs: list[dict[str, Any]] = [{"role": "assistant", "content": ""} for _ in range(job.n)]
        lps: list[list[dict]] = [[] for _ in range(job.n)]
        finals: list[dict[str, Any]] = [{} for _ in range(job.n)]
        async for choice in _merge([self._chat_choice(job, i) for i in range(job.n)]):
            i, delta = choice["index"], choice["delta"]
            msgs[i]["content"] += delta.get("content") or ""
            if "tool_calls" in delta:
                msgs[i]["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in delta["tool_calls"]]
            if choice["logprobs"]:
                lps[i] += choice["logprobs"]["content"]
            if choice["finish_reason"] is not None:
                finals[i] = choice
        out = []
        for i in range(job.n):
            if msgs[i].get("tool_calls") and not msgs[i]["content"]:
                msgs[i]["content"] = None
            c = {"index": i, "message": msgs[i], "logprobs": {"content": lps[i]} if job.logprobs else None,
                 "finish_reason": finals[i]["finish_reason"]}
            if "tool_call_error" in finals[i]:
                c["tool_call_error"] = finals[i]["tool_call_error"]
            out.append(c)
        return P.chat_completion(job.id, job.created, self.model_name, out, job.usage())

    # ------------------------------------------------------------------ completions
    def prepare_completion(self, body: Any) -> _Job:
        req: P.CompletionRequest = P.parse_request(P.CompletionRequest, body)
        self._check_model(req.model)
        self._check_capacity()
        stops, bias = P.check_sampling(req, self.tok.vocab_size)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.resolved_n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        raw = req.prompt
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise APIError(400, "the prompt is empty", param="prompt")
        has_bos = self.tok.bos_token is not None
        if req.add_bos and not has_bos:
            raise APIError(400, "this model's tokenizer has no BOS token", param="add_bos")
        prompts, echo_texts, bos_added = [], [], []
        for j, p in enumerate(raw):
            add_bos = req.add_bos if req.add_bos is not None else (isinstance(p, str) and has_bos)
            if isinstance(p, str):
                try:
                    ids, echo = self.tok.encode(p), p
                except (ValueError, UnicodeError) as e:  # e.g. a lone surrogate "\ud800"
                    raise APIError(400, f"prompt[{j}] cannot be tokenized: {e}", param="prompt") from None
            else:
                if any(not 0 <= t < self.tok.vocab_size for t in p):
                    raise APIError(400, f"prompt[{j}] has token ids outside [0, {self.tok.vocab_size})",
                                   param="prompt")
                ids, echo = list(p), self.tok.decode(p, skip_special_tokens=req.skip_special_tokens)
            if add_bos:
                ids = [self.tok.bos_id, *ids]
            if not ids:
                raise APIError(400, f"prompt[{j}] is empty", param="prompt")
            prompts.append(ids)
            echo_texts.append(echo)
            bos_added.append(add_bos)
        max_tokens = max(self._max_tokens(len(p), req.max_tokens, allow_zero=bool(req.echo), prompt_param="prompt")
                         for p in prompts)
        if req.max_tokens is None:  # "the rest of the context" differs per prompt: use the shortest
            max_tokens = min(self.context_len - len(p) for p in prompts)
        stop_ids = frozenset() if req.ignore_eos else self.completion_stop_ids
        if req.stop_token_ids:
            if any(not 0 <= t < self.tok.vocab_size for t in req.stop_token_ids):
                raise APIError(400, f"stop_token_ids must be in [0, {self.tok.vocab_size})", param="stop_token_ids")
            stop_ids = stop_ids | frozenset(req.stop_token_ids)
        want_prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        params = [[SamplingParams(max_tokens=max_tokens, temperature=req.resolved_temperature,
                                  top_p=req.resolved_top_p, seed=None if req.seed is None else req.seed + i,
                                  stop_token_ids=stop_ids, logit_bias=bias, logprobs=req.logprobs,
                                  prompt_logprobs=want_prompt_lp)
                   for i in range(req.resolved_n)] for _ in prompts]
        return self._check_job(_Job(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), stream=bool(req.stream),
            include_usage=req.include_usage, prompts=prompts, params=params, stops=stops, n=req.resolved_n,
            echo=bool(req.echo), echo_texts=echo_texts, bos_added=bos_added, completion_logprobs=req.logprobs,
            return_token_ids=bool(req.return_token_ids), tokens_as_ids=bool(req.return_tokens_as_token_ids),
            skip_ids=self._skip_ids(req, False)), prompt_param="prompt")

    def _completion_logprobs(self, entries: Sequence[TokenLogprob | None], offsets: Sequence[int],
                             ids: Sequence[int], tokens_as_ids: bool = False) -> dict[str, Any]:
        name = (lambda t: f"token_id:{t}") if tokens_as_ids else self.token_text
        return {
            "tokens": [name(t) for t in ids],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else {name(t): lp for t, lp in e.top} for e in entries],
            "text_offset": list(offsets),
        }

    def _echo_logprobs(self, job: _Job, j: int, entries: list[TokenLogprob | None]) -> dict[str, Any]:
        ids = job.prompts[j]
        offsets = []
        detok = IncrementalDetokenizer(self.tok)
        pos = 0
        for k, t in enumerate(ids):
            offsets.append(pos)
            if k == 0 and job.bos_added[j]:
                continue  # the added [BOS] is context only: it is not part of the echoed text
            if t in job.skip_ids:
                continue  # not in the echoed text either
            pos += len(detok.push(t))
        return self._completion_logprobs(entries, offsets, ids, job.tokens_as_ids)

    async def _completion_choice(self, job: _Job, j: int, i: int) -> AsyncIterator[dict[str, Any]]:
        index = j * job.n + i
        gen = self._submit(job.prompts[j], job.params[j][i])
        want_lp = job.completion_logprobs is not None
        tr = TextTracker(self.tok, job.stops, skip_ids=job.skip_ids)
        base = len(job.echo_texts[j]) if job.echo else 0

        def block(lps: list[TokenLogprob | None]) -> dict[str, Any] | None:
            if not want_lp:
                return None
            first = tr.lp_sent - len(lps)  # take() has just handed out entries first .. lp_sent-1
            offs = [base + o for o in tr.offsets[first:tr.lp_sent]]
            return self._completion_logprobs(lps, offs, [e.token_id for e in lps], job.tokens_as_ids)

        def chunk(text: str, lps: list[TokenLogprob | None], reason: str | None) -> dict[str, Any]:
            out = {"index": index, "text": text, "logprobs": block(lps), "finish_reason": reason}
            if job.return_token_ids:  # the ids of exactly the tokens whose text (and logprobs) this chunk holds
                out["token_ids"] = tr.token_ids[tr.lp_sent - len(lps):tr.lp_sent]
            return out

        prompt_lp: list[list[TokenLogprob | None]] = []
        echoed = not job.echo
        first_ids: dict[str, Any] = {"prompt_token_ids": job.prompts[j]} if job.return_token_ids else {}
        async for _ in self._feed(gen, tr, job, index, prompt_lp):
            if not echoed:  # the prompt logprobs (when asked for) come first, with or before the first tokens
                echoed = True
                echo_lp = self._echo_logprobs(job, j, prompt_lp[0]) if want_lp else None
                yield {"index": index, "text": job.echo_texts[j], "logprobs": echo_lp, "finish_reason": None,
                       **first_ids}
                first_ids = {}
            text, lps = tr.take()
            if text or (job.return_token_ids and lps):
                yield {**chunk(text, lps, None), **first_ids}
                first_ids = {}
        if not echoed:  # max_tokens 0 without logprobs: no events at all
            yield {"index": index, "text": job.echo_texts[j], "logprobs": None, "finish_reason": None, **first_ids}
            first_ids = {}
        finish = None if tr.stopped else gen.finish
        text, lps = tr.rest()
        reason = "stop" if tr.stopped or (finish is not None and finish.reason == "stop") else "length"
        out = {**chunk(text, lps, reason), **first_ids}
        if job.return_token_ids and finish is not None and finish.stop_token_id is not None:
            # As vLLM: the stop token is one of the generated ids (not in the text), with its logprob.
            out["token_ids"] = [*out["token_ids"], finish.stop_token_id]
            if out["logprobs"] is not None:
                stop_lp = self._completion_logprobs([finish.stop_logprob], [base + len(tr.text)],
                                                    [finish.stop_token_id], job.tokens_as_ids)
                out["logprobs"] = {k: v + stop_lp[k] for k, v in out["logprobs"].items()}
        yield out

    def _completion_choices(self, job: _Job) -> list[AsyncIterator[dict[str, Any]]]:
        job.completion_tokens = [0] * (len(job.prompts) * job.n)
        return [self._completion_choice(job, j, i) for j in range(len(job.prompts)) for i in range(job.n)]

    async def stream_completion(self, job: _Job) -> AsyncIterator[dict[str, Any]]:
        choices = self._completion_choices(job)
        async for out in _chunks(job, choices, partial(P.completion, job.id, job.created, self.model_name)):
            yield out

    async def run_completion(self, job: _Job) -> dict[str, Any]:
        n_choices = len(job.prompts) * job.n
        texts = [""] * n_choices
        lps: list[dict[str, list] | None] = [None] * n_choices
        reasons: list[str | None] = [None] * n_choices
        ids: list[dict[str, list[int]]] = [{"prompt_token_ids": [], "token_ids": []} for _ in range(n_choices)]
        async for choice in _merge(self._completion_choices(job)):
            k = choice["index"]
            texts[k] += choice["text"]
            for key in ("prompt_token_ids", "token_ids"):
                ids[k][key] += choice.get(key, [])
            if choice["logprobs"] is not None:
                if lps[k] is None:
                    lps[k] = {key: [] for key in choice["logprobs"]}
                for key, values in choice["logprobs"].items():
                    lps[k][key] += values
            if choice["finish_reason"] is not None:
                reasons[k] = choice["finish_reason"]
        if job.completion_logprobs is not None:
            lps = [x or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for x in lps]
        choices = [{"index": k, "text": texts[k], "logprobs": lps[k], "finish_reason": reasons[k],
                    **(ids[k] if job.return_token_ids else {})}
                   for k in range(n_choices)]
        return P.completion(job.id, job.created, self.model_name, choices, job.usage())


def _overloaded(why: str) -> APIError:
    return APIError(503, f"server overloaded: {why}; retry later", type="server_error", code="overloaded",
                    headers={"Retry-After": "1"})


async def _chunks(job: _Job, choices: list[AsyncIterator[dict[str, Any]]],
                  chunk: Callable[..., dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Stream chunks `chunk([choice], usage)` of the merged choices. Each chunk is held back by one so that the
    usage rides on the last one (or, with `include_usage`, on a final chunk with no choices); on an error what was
    generated before it still reaches the client."""
    pending: dict[str, Any] | None = None
    try:
        async for choice in _merge(choices):
            if pending is not None:
                yield pending
            pending = chunk([choice], None)
    except APIError:
        if pending is not None:
            yield pending
        raise
    if pending is None:
        return
    if job.include_usage:
        yield pending
        yield chunk([], job.usage())
    else:
        pending["usage"] = job.usage()
        yield pending


async def _merge(gens: list[AsyncIterator[dict[str, Any]]]) -> AsyncIterator[dict[str, Any]]:
    """Items of several async generators as they come; on exit (also early, or on error) all are closed, which
    cancels their generations."""
    if len(gens) == 1:
        try:
            async for item in gens[0]:
                yield item
        finally:
            await gens[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(g: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for item in g:
                await queue.put((0, item))
            await queue.put((0, done))
        except BaseException as e:  # hand errors (and cancellation) to the consumer
            await queue.put((1, e))
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            await g.aclose()

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        remaining = len(gens)
        while remaining:
            kind, item = await queue.get()
            if kind == 1:
                raise item
            if item is done:
                remaining -= 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
