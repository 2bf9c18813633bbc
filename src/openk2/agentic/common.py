"""Small pieces every stage of the agentic pipeline shares: rejections, JSON replies, stable hashes, text vectors.

A stage never raises on bad input (a malformed schema, a dead MCP server, an LLM reply that is not JSON, a call
to an unknown tool): it records a `Rejection` naming the item, the stage and the reason, and carries on.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

_WORD_RE = re.compile(r"[A-Za-z][a-z]+|[A-Z]+(?![a-z])|\d+")


@dataclass
class Rejection:
    """An item a stage dropped: `item` names it (tool name, task id, source), `reason` says why."""

    stage: str
    item: str
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReplyError(ValueError):
    """An LLM reply that does not hold what the prompt asked for (no JSON, wrong shape)."""


_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def parse_json_reply(text: str | None, expect: type | tuple[type, ...] = (dict, list)) -> Any:
    """The JSON value in an LLM reply: the whole text, a ```json fence, or the first balanced {...}/[...] span.

    Raises ReplyError (with the start of the reply) when none parses or the value is not of type `expect`.
    """
    if not text or not text.strip():
        raise ReplyError("empty reply")
    candidates = [text.strip(), *(m.strip() for m in _FENCE_RE.findall(text))]
    for opener in "{[":
        start = text.find(opener)
        if start >= 0:
            candidates.append(text[start:])
    decoder = json.JSONDecoder()
    for c in candidates:
        try:
            value, _ = decoder.raw_decode(c)
        except ValueError:
            continue
        if isinstance(value, expect):
            return value
    names = expect.__name__ if isinstance(expect, type) else "/".join(t.__name__ for t in expect)
    raise ReplyError(f"reply is not valid JSON ({names}): {text.strip()[:120]!r}")


def stable_hash(obj: Any, n: int = 12) -> str:
    """A short sha256 of the canonical JSON of `obj` (ids that survive reruns and processes)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:n]


def words(text: str) -> list[str]:
    """Lower-case word pieces; camelCase and snake_case split (`getUserById` -> get, user, by, id)."""
    return [w.lower() for w in _WORD_RE.findall(text.replace("_", " "))]


def text_vector(tokens: Iterable[str], dim: int = 256) -> list[float]:
    """A unit-length hashed bag of words and word bigrams (no model needed; for near-duplicates and maps)."""
    toks = list(tokens)
    vec = [0.0] * dim
    for feat in toks + [f"{a}_{b}" for a, b in zip(toks, toks[1:], strict=False)]:
        h = int.from_bytes(hashlib.blake2b(feat.encode(), digest_size=8).digest(), "little")
        vec[h % dim] += 1.0 if (h >> 63) & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0
