"""Splitting documents for chunk-wise autoregressive rewriting (K2 §2.2, Fig. 4), and putting them back.

`chunk_document(text, max_tokens)` cuts a document only at paragraph or sentence boundaries into chunks of at
most `max_tokens` (a single sentence longer than the budget becomes one chunk of its own: a sentence is never
split). Each `Chunk` keeps its character span and the whitespace that followed it, so

    reassemble(doc.lead, [(c.text, c.sep) for c in doc.chunks]) == text

and a model that echoes its input gives the document back byte for byte; rewritten chunks are joined with the
original separators (a paragraph break stays a paragraph break).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from openk2.data.rephrase.prompts import approx_tokens

# Words after which a period does not end a sentence.
_ABBREVIATIONS = frozenset(
    [
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "cf", "fig", "figs", "no",
        "nos", "vol", "al", "approx", "dept", "inc", "ltd", "co", "corp", "mt", "ft", "jan", "feb", "mar",
        "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "u.s", "u.k", "ph.d", "a.m", "p.m"
    ])
# Sentence end: . ! ? (optionally closing quotes/brackets), then whitespace, then something that starts a sentence.
_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s+[\"'“‘(\[]?[A-Z0-9])")
_PARA = re.compile(r"\n[ \t]*\n\s*")


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # character span of `text` in the document
    end: int
    text: str  # no leading or trailing whitespace
    sep: str  # the whitespace after the chunk in the document ("" for the last)
    tokens: int
    oversize: bool = False  # one sentence longer than the budget


@dataclass(frozen=True)
class ChunkedDocument:
    lead: str  # whitespace before the first chunk
    chunks: tuple[Chunk, ...]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `text`, whitespace excluded, in order; paragraph breaks always end one."""
    spans = []
    for pstart, pend in _paragraph_spans(text):
        start = pstart
        for m in _END.finditer(text, pstart, pend):
            end = m.end()
            word = re.search(r"([\w.]+)[.!?][\"'”’)\]]*$", text[start:end])
            if text[m.start()] == "." and word and (word.group(1).lower() in _ABBREVIATIONS
                                                    or len(word.group(1)) == 1 and word.group(1).isalpha()):
                continue  # "Dr. Smith", "J. Smith": not a sentence end
            spans.append((start, end))
            start = end + len(text[end:pend]) - len(text[end:pend].lstrip())
        if start < pend:
            spans.append((start, pend))
    return spans


def _paragraph_spans(text: str) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for m in [*_PARA.finditer(text), None]:
        end = m.start() if m else len(text)
        seg = text[pos:end]
        if seg.strip():
            s = pos + len(seg) - len(seg.lstrip())
            spans.append((s, s + len(seg.strip())))
        if m:
            pos = m.end()
    return spans


def chunk_document(text: str, max_tokens: int, count_tokens: Callable[[str], int] = approx_tokens
                   ) -> ChunkedDocument:
    """Greedy packing of whole sentences into chunks of at most `max_tokens`; a chunk ends at a paragraph break
    when the next paragraph does not fit whole."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sents = sentence_spans(text)
    if not sents:
        return ChunkedDocument(text, ())
    para_end = {e for _, e in _paragraph_spans(text)}
    groups: list[list[tuple[int, int, int]]] = []  # sentences (start, end, tokens) per chunk
    current: list[tuple[int, int, int]] = []
    used = 0
    for s, e in sents:
        n = count_tokens(text[s:e])
        if current and used + n > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append((s, e, n))
        used += n
        # Prefer paragraph boundaries: close the chunk at a paragraph end once it is at least half full.
        if e in para_end and used >= max_tokens // 2:
            groups.append(current)
            current, used = [], 0
    if current:
        groups.append(current)
    chunks = []
    for i, g in enumerate(groups):
        start, end = g[0][0], g[-1][1]
        nxt = groups[i + 1][0][0] if i + 1 < len(groups) else len(text)
        tokens = count_tokens(text[start:end])
        chunks.append(Chunk(i, start, end, text[start:end], text[end:nxt], tokens,
                            oversize=len(g) == 1 and tokens > max_tokens))
    return ChunkedDocument(text[: sents[0][0]], tuple(chunks))


def reassemble(lead: str, parts: Sequence[tuple[str, str]]) -> str:
    """`lead` + each (rewritten chunk, separator) in order."""
    return lead + "".join(t + sep for t, sep in parts)


def tail(text: str, max_tokens: int, count_tokens: Callable[[str], int] = approx_tokens) -> str:
    """The last whole sentences of `text` that fit in `max_tokens` (the context for the next chunk); the last
    sentence alone if even that is longer."""
    spans = sentence_spans(text)
    if not spans:
        return ""
    start, used = spans[-1][0], 0
    for s, e in reversed(spans):
        used += count_tokens(text[s:e])
        if used > max_tokens and s != spans[-1][0]:
            break
        start = s
    return text[start:].strip()
