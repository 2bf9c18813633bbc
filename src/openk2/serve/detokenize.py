"""From generated token ids to the text a client receives: incremental UTF-8-safe detokenization, stop strings,
a held-back tool-call section, skipped special tokens, and how much may be streamed so far."""

from __future__ import annotations

import bisect

from openk2.data.tokenizer import Tokenizer
from openk2.serve.engine import TokenLogprob


class IncrementalDetokenizer:
    """Text deltas of a growing token sequence. A token that ends inside a UTF-8 character yields "" until the
    character completes; only the last few tokens are re-decoded each time (a window that starts at a character
    boundary), so the cost per token does not grow with the length."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text
        self._done = ""  # decode(ids[_prefix:_read]), kept so each token costs one decode

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is pending, even an incomplete character (as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        full = self.tokenizer.decode(self.ids[self._prefix:])
        if len(full) > len(self._done) and (final or not full.endswith("\ufffd")):
            delta = full[len(self._done):]
            self._prefix, self._read, self._done = self._read, len(self.ids), delta
            return delta
        if final:
            self._prefix = self._read = len(self.ids)
            self._done = ""
        return ""


class TextTracker:
    """Generated text of one choice: stop strings, a held-back tool-call section, and what may be streamed."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], section_at: int | None = None,
                 skip_ids: frozenset[int] = frozenset()) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.skip_ids = skip_ids  # special tokens left out of the text (skip_special_tokens)
        self.stops = stops
        self.max_stop = max((len(s) for s in stops), default=0)
        self.text = ""
        self.offsets: list[int] = []  # where each token's text starts
        self.logprobs: list[TokenLogprob | None] = []
        self.token_ids: list[int] = []  # parallel to logprobs
        self.section_at = section_at  # index in text where a tool-call section starts (held back)
        self.stopped = False  # a stop string was found (text is cut before it)
        self.emitted = 0  # chars handed out by take()
        self.lp_sent = 0  # logprob entries handed out

    def push(self, token_id: int, logprob: TokenLogprob | None, is_marker: bool) -> None:
        if is_marker and self.section_at is None:
            self.section_at = len(self.text)
        self.offsets.append(len(self.text))
        self.logprobs.append(logprob)
        self.token_ids.append(token_id)
        if token_id not in self.skip_ids:
            self._add(self.detok.push(token_id))

    def finish(self) -> None:
        self._add(self.detok.flush())

    def _add(self, delta: str) -> None:
        if not delta:
            return
        before = len(self.text)
        self.text += delta
        if not self.stops or self.stopped:
            return
        # Stop strings apply to plain text only: never inside a tool-call section.
        end = len(self.text) if self.section_at is None else self.section_at
        start = max(0, before - self.max_stop + 1)
        hits = [i for i in (self.text.find(s, start, end) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _holdback(self) -> int:
        for k in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def take(self, final: bool = False) -> tuple[str, list[TokenLogprob | None]]:
        """Text (and the logprobs of its tokens) that can be sent now; `final` sends everything left,
        except a held tool-call section."""
        limit = len(self.text) if (final or self.stopped) else len(self.text) - self._holdback()
        if self.section_at is not None:
            limit = min(limit, self.section_at)
        out = self.text[self.emitted:limit] if limit > self.emitted else ""
        self.emitted = max(self.emitted, limit)
        return out, self._take_logprobs(final)

    def rest(self) -> tuple[str, list[TokenLogprob | None]]:
        """Everything not yet handed out, the held section included (a malformed section goes out as text)."""
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out, self._take_logprobs(True)

    def _take_logprobs(self, final: bool) -> list[TokenLogprob | None]:
        # Offsets never decrease, so "tokens starting before x" is a bisection.
        n = len(self.logprobs)
        if self.stopped:  # drop the tokens that lie entirely in the cut-off stop string and after it
            n = bisect.bisect_left(self.offsets, len(self.text))
        if not final:
            n = min(n, bisect.bisect_left(self.offsets, self.emitted))
        out = self.logprobs[self.lp_sent:n]
        self.lp_sent = max(self.lp_sent, n)
        return out
