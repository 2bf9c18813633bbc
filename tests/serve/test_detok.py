"""Incremental detokenization and stop-string handling of streamed text."""

from __future__ import annotations

import random

import pytest

from openk2.serve.detokenize import IncrementalDetokenizer, TextTracker
from openk2.serve.testing import toy_tokenizer


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def test_deltas_add_up_to_the_full_decode(tok):
    by_bytes = tok.mergeable_ranks()
    # Multi-byte characters split over byte tokens, plus random ids (including invalid UTF-8 and specials).
    split = [by_bytes[bytes([b])] for b in "天气 Köln €".encode()]
    rng = random.Random(0)
    for trial in range(30):
        ids = split + [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 40))] + split
        rng.shuffle(ids) if trial % 2 else None
        d = IncrementalDetokenizer(tok)
        deltas = [d.push(t) for t in ids]
        text = "".join(deltas) + d.flush()
        assert text == tok.decode(ids)
    d = IncrementalDetokenizer(tok)
    assert [d.push(t) for t in split[:3]] == ["", "", "天"]  # nothing until the character is complete


def test_tracker_stop_strings_and_holdback(tok):
    ids = tok.encode("It is sunny in Paris. The end")
    tr = TextTracker(tok, ["Paris.", "zzz"])
    streamed = ""
    for t in ids:
        tr.push(t, None, False)
        streamed += tr.take()[0]
        if tr.stopped:
            break
    streamed += tr.take(final=True)[0]
    assert tr.stopped and tr.text == "It is sunny in " and streamed == "It is sunny in "
    # Held back while it might still become a stop string, released once it cannot.
    tr = TextTracker(tok, ["sunny day"])
    streamed, held = "", []
    for t in tok.encode("a sunny night"):
        tr.push(t, None, False)
        streamed += tr.take()[0]
        rest = tr.text[len(streamed):]
        assert tr.text.startswith(streamed) and "sunny day".startswith(rest)
        held.append(rest)
    assert "sunny" in held  # "a sunny" was held back as a possible stop string ...
    assert streamed + tr.take(final=True)[0] == "a sunny night" and not tr.stopped  # ... and released
