"""The batching scheduler: one thread owns the model and serves every request in shared forward passes.

Continuous batching over a `SlotKVCache`. Requests are submitted from any thread (or event loop) and wait
in a FIFO queue. Each iteration of the engine loop

1. drops cancelled sequences (their cache rows are freed at once),
2. admits waiting sequences into free rows with ONE batched, left-padded prefill (bounded by a token
   budget, so a burst of long prompts cannot stall the running sequences for long), sampling each new
   sequence's first token from the prefill logits, and
3. runs ONE decode forward for all running sequences (one token each) and samples the next token of each.

A sequence leaves as soon as it finishes, so a new request joins at the next iteration instead of waiting
for the whole batch. Sampling is per sequence (temperature, top-p, seed, logit bias), each with its own
`torch.Generator`, so a seeded request's samples do not depend on what else is running (up to float
rounding of batched matmuls). Log-probabilities come from the log-softmax of the raw logits, before
temperature, top-p, bias or bans.

Results are streamed as events (`TokenEvent`, `PromptLogprobsEvent`, then exactly one `FinishEvent`) into
a `Generation` handle, iterated with `async for` when submitted from a running event loop, else with `for`.
Faults are isolated per sequence: sampling runs per sequence (`openk2.serve.sampling`, numerically safe for
every accepted setting), and a batched forward that raises is retried one sequence at a time, so whatever
fails ends only the sequence that causes it, with a `FinishEvent("error")` naming the cause, while the others
continue with exactly the tokens they would have got (up to float rounding of batched matmuls). The engine
never dies: a bug in the loop itself fails what is running and the loop goes on.

For the RL rollout engine (`openk2.rl.engine.TorchEngine`): `pause()` stops admitting and decoding once the
step in progress ends (so the weights can be swapped), `resume()` goes on, `cancel_all()` ends every unfinished
sequence and waits until the loop has done so (it works while paused), and `submit(stream=False)` delivers a
sequence's events in one batch at its end instead of one wake-up of the consumer per step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from openk2.model.decode import CompileSwitch
from openk2.model.generate import left_pad
from openk2.serve.generation import (
    Event,
    FinishEvent,
    Generation,
    PromptLogprobsEvent,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from openk2.serve.sampling import apply_bias_and_bans, is_greedy, sample_token
from openk2.serve.slot_cache import SlotKVCache, decode_rows

if TYPE_CHECKING:
    from openk2.model.transformer import K2Model

log = logging.getLogger(__name__)

# The request and event types live in `generation`; they are re-exported here, where callers have found them.
__all__ = ["Engine", "EngineStats", "Event", "FinishEvent", "Generation", "PromptLogprobsEvent", "SamplingParams",
           "TokenEvent", "TokenLogprob"]

@dataclass
class _Seq:
    gen: Generation
    generator: torch.Generator | None
    n_out: int = 0
    last_token: int = -1
    finished: bool = False

    @property
    def params(self) -> SamplingParams:
        return self.gen.params

    @property
    def prompt_len(self) -> int:
        return len(self.gen.prompt_ids)


@dataclass
class EngineStats:
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    errors: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    decode_steps: int = 0
    batch_size_sum: int = 0  # summed over decode steps, for the mean batch size
    started: float = field(default_factory=time.time)


class Engine:
    """Continuous-batching generation over `model`; see the module docstring.

    `max_batch` rows of `max_len` tokens are preallocated (`max_batch * max_len * cache.bytes_per_token`
    bytes). `vocab_limit` keeps sampling inside the tokenizer's vocabulary when the embedding has more rows.
    `compile` is the decode step's switch (`openk2.model.decode`): each new (padded batch, key window) shape
    compiles once, on the engine thread, the first time it occurs.
    """

    def __init__(
        self,
        model: K2Model,
        *,
        max_batch: int = 16,
        max_len: int | None = None,
        prefill_tokens: int = 4096,
        vocab_limit: int | None = None,
        max_waiting: int = 4096,
        compile: CompileSwitch = "auto",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        cfg = model.config
        self.model = model.eval()
        self.device = model.lm_head.weight.device
        self.max_batch = max_batch
        self.max_len = int(max_len or cfg.max_position_embeddings)
        self.prefill_tokens = max(prefill_tokens, 1)
        self.vocab_limit = min(vocab_limit or cfg.vocab_size, cfg.vocab_size)
        self.max_waiting = max_waiting
        self.compile = compile
        self.cache = SlotKVCache(cfg.num_hidden_layers, max_batch, self.max_len,
                                 cfg.kv_lora_rank + cfg.qk_rope_head_dim, self.device, model.lm_head.weight.dtype)
        self.stats = EngineStats()
        self._rows: list[_Seq] = []  # row i of the cache <-> _rows[i]
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._inbox: list[_Seq] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seed_rng = random.Random()
        self._outbox: list[tuple[Generation, Event]] = []
        # Pause support (the RL rollout engine): while paused the loop neither admits nor decodes, but still
        # drops cancelled sequences. `_dirty` wakes it for that; the iteration counters let a caller wait until
        # an iteration that started after its request has finished.
        self._paused = False
        self._dirty = False
        self._iter_started = 0
        self._iter_done = 0

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="openk2-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; unfinished sequences end with `FinishEvent("cancelled")`."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cv:
            leftovers = self._rows + list(self._waiting) + self._inbox
            self._rows, self._inbox = [], []
            self._waiting.clear()
        for s in leftovers:
            self._finish(s, "cancelled")
        self._flush()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pause(self) -> None:
        """Stop admitting and decoding; returns once the step in progress (if any) has finished, so the model
        is not in use until `resume()`. Running sequences keep their cache rows and continue after `resume()`;
        cancelling them (`Generation.cancel`, `cancel_all`) still takes effect while paused."""
        with self._cv:
            self._paused = True
            if self._thread is not None and self._thread is not threading.current_thread():
                while self._iter_done < self._iter_started:
                    self._cv.wait()

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def cancel_all(self) -> list[Generation]:
        """Cancel every sequence not yet finished (running or waiting) and wait until the loop has ended them
        (each gets `FinishEvent("cancelled")` after the tokens it already streamed); returns their handles."""
        with self._cv:
            seqs = [s for s in (*self._rows, *self._waiting, *self._inbox) if not s.finished]
            for s in seqs:
                s.gen.cancelled = True
            if not seqs:
                return []
            self._dirty = True
            target = self._iter_started + 1
            self._cv.notify_all()
            while self.running and self._iter_done < target:
                self._cv.wait()
        return [s.gen for s in seqs]

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def n_active(self) -> int:
        return len(self._rows)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting) + len(self._inbox)

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """The prompt as a list of ints if `submit` would accept it (capacity aside); else ValueError naming
        the limit. Servers call this for every sequence of a request before answering, so that a request
        which can never be served is refused before a streamed response has started."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.model.config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.model.config.vocab_size})")
        if len(prompt) + params.max_tokens > self.max_len or len(prompt) > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context of {self.max_len} tokens")
        return prompt

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, stream: bool = True) -> Generation:
        """Queue one sequence. Raises ValueError for an empty prompt, ids outside the vocabulary, or a
        prompt + max_tokens beyond `max_len` (see `check`); OverflowError when the waiting queue is full.
        `stream=False` delivers all the events at once when the sequence ends (same events, one wake-up of the
        consumer instead of one per step: a batch consumer such as RL rollouts saves a thread hand-off per token)."""
        prompt = self.check(prompt_ids, params)
        if not self.running:
            raise RuntimeError("the engine is not running (call start())")
        gen = Generation(self, prompt, params)
        gen.stream = stream
        generator = None
        if not is_greedy(params.temperature):
            seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
            # Any integer seed works: torch takes [0, 2**64), so seeds are reduced modulo 2**64.
            generator = torch.Generator(device=self.device).manual_seed(seed % 2**64)
        with self._cv:
            if self.n_waiting >= self.max_waiting:
                raise OverflowError(f"{self.n_waiting} requests are already waiting")
            self._inbox.append(_Seq(gen, generator))
            self.stats.submitted += 1
            self._cv.notify_all()
        return gen

    def _wake(self) -> None:
        with self._cv:
            self._dirty = True
            self._cv.notify_all()

    # ------------------------------------------------------------------ the loop (engine thread)
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._dirty
                               or (not self._paused and (self._inbox or self._rows or self._waiting))):
                        self._cv.wait()
                    if self._stopping:
                        return
                    self._dirty = False
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                    paused = self._paused
                    self._iter_started += 1
                try:
                    if paused:
                        self._drop_cancelled()
                    else:
                        self._step()
                except Exception as e:  # a bug in the loop itself: fail what is running, keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"engine error: {e!r}")
                finally:
                    self._flush()
                    with self._cv:
                        self._iter_done += 1
                        self._cv.notify_all()

    def _step(self) -> None:
        self._drop_cancelled()
        if self._waiting and len(self._rows) < self.max_batch:
            self._admit()
            self._flush()  # first tokens go out now, not after the decode step
        if self._rows:
            self._decode()

    def _drop_cancelled(self) -> None:
        if any(s.gen.cancelled for s in self._waiting):
            keep = collections.deque()
            for s in self._waiting:
                if s.gen.cancelled:
                    self._finish(s, "cancelled")
                else:
                    keep.append(s)
            self._waiting = keep
        gone = [i for i, s in enumerate(self._rows) if s.gen.cancelled]
        for i in gone:
            self._finish(self._rows[i], "cancelled")
        self._remove_rows(gone)

    def _take_prefill_batch(self) -> list[_Seq]:
        """FIFO head and the following sequences of the same kind (prompt logprobs or not) that fit."""
        free = self.max_batch - len(self._rows)
        head = self._waiting[0]
        full_logits = head.params.prompt_logprobs is not None
        batch: list[_Seq] = []
        longest = 0
        while self._waiting and len(batch) < free:
            s = self._waiting[0]
            if (s.params.prompt_logprobs is not None) != full_logits:
                break
            new_longest = max(longest, s.prompt_len)
            if batch and new_longest * (len(batch) + 1) > self.prefill_tokens:
                break
            batch.append(self._waiting.popleft())
            longest = new_longest
        return batch

    def _admit(self) -> None:
        batch = self._take_prefill_batch()
        lo = len(self._rows)
        self._rows.extend(batch)
        done = self._prefill(lo, batch)
        self._remove_rows(done)

    def _prefill(self, lo: int, batch: list[_Seq]) -> list[int]:
        """Prefill `batch` in rows lo.., sample its first tokens; returns the rows that finished. If the batched
        forward fails, each sequence is retried alone, so only the ones that fail by themselves get the error."""
        hi = lo + len(batch)
        full = batch[0].params.prompt_logprobs is not None
        saved = self.cache.lengths[lo:hi]
        try:
            ids_BT, valid_BT = left_pad([s.gen.prompt_ids for s in batch])
            ids_BT, valid_BT = ids_BT.to(self.device), valid_BT.to(self.device)
            view = self.cache.rows(lo, hi)
            logits_BTV = self.model(ids_BT, position_ids_BT=view.positions(valid_BT), cache=view,
                                    valid_BT=valid_BT, last_logits_only=not full).logits
        except Exception as e:
            self.cache.lengths[lo:hi] = saved  # a forward that failed midway must not leave rows advanced
            if len(batch) > 1:
                log.warning("batched prefill failed (%r); retrying its %d sequences one by one", e, len(batch))
                return [r for i, s in enumerate(batch) for r in self._prefill(lo + i, [s])]
            log.exception("prefill failed")
            self._finish(batch[0], "error", error=f"prefill failed: {e!r}")
            return [lo]
        self.stats.prefill_tokens += sum(s.prompt_len for s in batch)
        if full:
            T = ids_BT.shape[1]
            for s, logits_TV in zip(batch, logits_BTV, strict=True):
                n = s.prompt_len
                self._send(s.gen, PromptLogprobsEvent(self._prompt_logprobs(logits_TV[T - n:], s.gen.prompt_ids,
                                                                     s.params.prompt_logprobs)))
        done = [lo + i for i, s in enumerate(batch) if s.params.max_tokens == 0]
        for r in done:
            self._finish(self._rows[r], "length")
        live = [r for r in range(lo, hi) if r not in done]
        if live:
            last_logits = logits_BTV[:, -1]
            idx = [r - lo for r in live]
            finished = self._emit([self._rows[r] for r in live], last_logits[idx] if len(idx) < len(batch)
                                  else last_logits)
            done += [live[i] for i in finished]
        return done

    def _decode(self) -> None:
        B = len(self._rows)
        ids_B1 = torch.tensor([[s.last_token] for s in self._rows], device=self.device)
        saved = self.cache.lengths[:B]
        try:
            logits_BV = decode_rows(self.model, self.cache, ids_B1[:, 0], self.compile)
        except Exception as e:
            self.cache.lengths[:B] = saved
            # Find the culprit: each row alone (rows that fail by themselves end with the error, the rest go on).
            log.warning("batched decode failed (%r); retrying its %d rows one by one", e, B)
            self._decode_one_by_one(ids_B1)
            return
        self.stats.decode_steps += 1
        self.stats.batch_size_sum += B
        self.stats.decode_tokens += B
        self._remove_rows(self._emit(list(self._rows), logits_BV))  # seqs are the rows: indices are rows

    def _decode_rows(self, lo: int, ids_B1: torch.Tensor) -> torch.Tensor:
        hi = lo + ids_B1.shape[0]
        saved = self.cache.lengths[lo:hi]
        valid_B1 = torch.ones(hi - lo, 1, dtype=torch.bool, device=self.device)
        view = self.cache.rows(lo, hi)
        try:
            return self.model(ids_B1, position_ids_BT=view.positions(valid_B1), cache=view,
                              valid_BT=valid_B1).logits[:, -1]
        except Exception:
            self.cache.lengths[lo:hi] = saved
            raise

    def _decode_one_by_one(self, ids_B1: torch.Tensor) -> None:
        done = []
        for r, s in enumerate(list(self._rows)):
            try:
                logits_1V = self._decode_rows(r, ids_B1[r:r + 1])
            except Exception as e:
                log.exception("decode failed for one sequence")
                self._finish(s, "error", error=f"decode failed: {e!r}")
                done.append(r)
                continue
            self.stats.decode_tokens += 1
            if self._emit([s], logits_1V):
                done.append(r)
        self.stats.decode_steps += 1
        self.stats.batch_size_sum += len(ids_B1)
        self._remove_rows(done)

    # ------------------------------------------------------------------ sampling and events
    def _emit(self, seqs: list[_Seq], logits_BV: torch.Tensor) -> list[int]:
        """Sample one token per sequence, send the events; returns the indices (into seqs) that finished."""
        tokens, logprobs = self._sample(seqs, logits_BV)
        finished = []
        for i, (s, tok, lp) in enumerate(zip(seqs, tokens, logprobs, strict=True)):
            if tok is None:  # sampling failed: already finished with the error
                finished.append(i)
                continue
            s.n_out += 1
            s.last_token = tok
            if tok in s.params.stop_token_ids:
                self._finish(s, "stop", stop_token_id=tok, stop_logprob=lp)
                finished.append(i)
                continue
            self._send(s.gen, TokenEvent(tok, lp))
            if s.n_out >= s.params.max_tokens or s.prompt_len + s.n_out >= self.max_len:
                self._finish(s, "length")
                finished.append(i)
        return finished

    def _sample(self, seqs: list[_Seq], logits_BV: torch.Tensor
                ) -> tuple[list[int | None], list[TokenLogprob | None]]:
        """One token per sequence (None where sampling that sequence failed: it is finished with the error,
        and only it). Each row is sampled on its own, so nothing about one request reaches another's tokens."""
        logits_BV = logits_BV[:, : self.vocab_limit].float()
        tokens: list[int | None] = [None] * len(seqs)
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        for i, s in enumerate(seqs):
            p = s.params
            try:
                proc_V = apply_bias_and_bans(logits_BV[i], p.logit_bias, p.banned_token_ids, self.vocab_limit)
                tok = sample_token(proc_V, p.temperature, p.top_p, s.generator)
                if p.logprobs is not None:
                    logprobs[i] = self._token_logprob(logits_BV[i], tok, p.logprobs, p.logprobs_temperature)
            except Exception as e:
                log.warning("sampling failed for one sequence: %r", e)
                self._finish(s, "error", error=f"sampling failed: {e}")
                continue
            tokens[i] = tok
        return tokens, logprobs

    @staticmethod
    def _token_logprob(logits_V: torch.Tensor, token: int, k: int, temperature: float = 1.0) -> TokenLogprob:
        lsm_V = torch.log_softmax(logits_V if temperature == 1.0 else logits_V / temperature, dim=-1)
        top = ()
        if k > 0:
            vals, ids = lsm_V.topk(k)
            top = tuple(zip(ids.tolist(), vals.tolist(), strict=True))
        return TokenLogprob(token, float(lsm_V[token]), top)

    def _prompt_logprobs(self, logits_TV: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob | None]:
        """Logprob of prompt token t+1 under the logits at t (and the top k there); None for the first.
        Normalized over the first `vocab_limit` ids, like sampling (the service rejects prompt ids beyond)."""
        lsm_TV = torch.log_softmax(logits_TV[:-1, : self.vocab_limit].float(), dim=-1)
        targets_T1 = torch.tensor(ids[1:], device=lsm_TV.device).clamp(max=self.vocab_limit - 1)[:, None]
        chosen = lsm_TV.gather(1, targets_T1)[:, 0]
        out: list[TokenLogprob | None] = [None]
        if k > 0:
            top_vals, top_ids = lsm_TV.topk(k, dim=-1)
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        for t, (tok, lp) in enumerate(zip(ids[1:], chosen.tolist(), strict=True)):
            top = tuple(zip(top_ids[t], top_vals[t], strict=True)) if k > 0 else ()
            out.append(TokenLogprob(tok, lp, top))
        return out

    # ------------------------------------------------------------------ bookkeeping
    def _finish(self, s: _Seq, reason: str, stop_token_id: int | None = None, error: str | None = None,
                stop_logprob: TokenLogprob | None = None) -> None:
        if s.finished:
            return
        s.finished = True
        if reason == "cancelled":
            self.stats.cancelled += 1
        elif reason == "error":
            self.stats.errors += 1
        else:
            self.stats.completed += 1
        self._send(s.gen, FinishEvent(reason, s.n_out, stop_token_id, error, stop_logprob))

    def _send(self, gen: Generation, event: Event) -> None:
        if gen.stream:
            self._outbox.append((gen, event))
        elif isinstance(event, FinishEvent):
            self._outbox.extend((gen, e) for e in (*gen._held, event))
            gen._held.clear()
        else:
            gen._held.append(event)

    def _flush(self) -> None:
        """Deliver the step's events: one wake-up per consumer event loop, not one per token (each wake-up
        makes the loop thread contend for the GIL with this one)."""
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, Event]]] = {}
        for gen, event in outbox:
            if gen._loop is None:
                gen._q.put(event)
            else:
                by_loop.setdefault(gen._loop, []).append((gen, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's event loop is closed: nobody listens, free the rows
                for gen, _ in items:
                    gen.cancelled = True

    def _remove_rows(self, rows: Sequence[int] | range) -> None:
        """Free rows, keeping the live ones contiguous at 0..B-1 by moving the last row into each hole."""
        for r in sorted(set(rows), reverse=True):
            last = len(self._rows) - 1
            if r != last:
                self.cache.move(last, r)
                self._rows[r] = self._rows[last]
            else:
                self.cache.reset(r)
            self._rows.pop()

    def _fail_all(self, error: str) -> None:
        for s in self._rows:
            self._finish(s, "error", error=error)
        self._remove_rows(range(len(self._rows)))


def _deliver(items: list[tuple[Generation, Event]]) -> None:
    for gen, event in items:
        gen._aq.put_nowait(event)
