"""Fidelity verification of a rewrite against its source, each check on or off (`FidelityConfig.checks`).

Deterministic (cheap, in CI): `numbers` (every number of the source appears in the rewrite, and the rewrite
has none the source lacks), `dates` (month names likewise; days and years are numbers), `entities` (proper-noun
words: capitalised words that occur inside a sentence; source ones must survive, rewrite ones must occur in the
source), `length` (output/input token ratio within the style's bounds). Model-based: `embedding` (cosine
similarity of the two texts under an `Embedder` (`openk2.data.rephrase.embedding`: WordLlama's static
sentence embeddings shipped in the `wordllama` wheel, any local transformers sentence-embedding directory, or
hashed character n-grams), at least `embedding_threshold`) and `judge` (an LLM lists added, dropped and
altered facts as JSON; any entry, or an unparseable verdict, rejects). The required prefix / format is checked
by the style's post-processing (`prompts.Style.postprocess`) and reported as the `format` check by the
pipeline.

A rewrite passes when every enabled check passes; the pipeline keeps rejected rewrites with the reasons.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from openk2.data.rephrase.embedding import Embedder, HashingEmbedder, cosine
from openk2.data.rephrase.prompts import approx_tokens

DETERMINISTIC = ("numbers", "dates", "entities", "length")
ALL_CHECKS = ("format", *DETERMINISTIC, "embedding", "judge")
DEFAULT_CHECKS = ("format", *DETERMINISTIC)

MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")
_MONTH_ABBR = {m[:3]: m for m in MONTHS} | {"sept": "september"}
_STOP = frozenset(
    [
        "i", "a", "an", "the", "he", "she", "it", "they", "we", "you", "his", "her", "its", "their", "our",
        "my", "your", "him", "them", "me", "us", "this", "that", "these", "those", "there", "here", "what",
        "which", "who", "whom", "whose", "when", "where", "why", "how", "yes", "no", "not", "and", "or", "but",
        "if", "then", "so", "as", "at", "by", "for", "from", "in", "into", "of", "on", "to", "with", "q", "a",
        "mr", "mrs", "ms", "dr", "prof", "sir", "madam", "monday", "tuesday", "wednesday", "thursday", "friday",
        "saturday", "sunday", "today", "question", "answer", "interviewer", "guest", "note"
    ]) | set(MONTHS)
_WORD = re.compile(r"[A-Za-z][\w'’-]*")


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    reasons: tuple[str, ...] = ()
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ok": self.ok}
        if self.reasons:
            d["reasons"] = list(self.reasons)
        if self.score is not None:
            d["score"] = round(self.score, 4)
        return d


def numbers(text: str) -> set[str]:
    out = set()
    for m in re.finditer(r"\d[\d,]*(?:\.\d+)?", text):
        v = m.group().rstrip(",").replace(",", "")
        out.add(v.rstrip("0").rstrip(".") if "." in v else (v.lstrip("0") or "0"))
    return out


def months(text: str) -> set[str]:
    out = set()
    for w in re.findall(r"[A-Za-z]+", text):
        lw = w.lower()
        if lw in MONTHS and w[0].isupper():
            out.add(lw)
        elif lw.rstrip(".") in _MONTH_ABBR and w[0].isupper() and len(lw) <= 4 and lw != "may":
            out.add(_MONTH_ABBR[lw.rstrip(".")])
    return out


def proper_words(text: str) -> set[str]:
    """Capitalised words that occur somewhere other than the start of a sentence or line (lowercased)."""
    out = set()
    for m in _WORD.finditer(text):
        w = m.group()
        if not w[0].isupper() or w.isupper() and len(w) > 1 or re.split(r"['’]", w.lower())[0] in _STOP:
            continue
        before = text[: m.start()].rstrip(" \t\"'“‘([")
        if not before or before[-1] in ".!?\n—–-:" and before[-1] != ":":
            continue  # sentence- or line-initial: capitalised anyway
        out.add(_base(w))
    return out


def _base(word: str) -> str:
    return re.sub(r"['’]s?$", "", word.lower())


def _words(text: str) -> set[str]:
    return {_base(w) for w in _WORD.findall(text)}


def check_numbers(source: str, rewrite: str) -> CheckResult:
    s, r = numbers(source), numbers(rewrite)
    reasons = [f"dropped number {n}" for n in sorted(s - r)] + [f"added number {n}" for n in sorted(r - s)]
    return CheckResult("numbers", not reasons, tuple(reasons))


def check_dates(source: str, rewrite: str) -> CheckResult:
    s, r = months(source), months(rewrite)
    reasons = [f"dropped month {m}" for m in sorted(s - r)] + [f"added month {m}" for m in sorted(r - s)]
    return CheckResult("dates", not reasons, tuple(reasons))


def check_entities(source: str, rewrite: str) -> CheckResult:
    rw, sw = _words(rewrite), _words(source)
    dropped = sorted(proper_words(source) - rw)
    added = sorted(proper_words(rewrite) - sw)
    reasons = [f"dropped entity {w}" for w in dropped] + [f"added entity {w}" for w in added]
    return CheckResult("entities", not reasons, tuple(reasons))


def check_length(source: str, rewrite: str, bounds: tuple[float, float],
                 count_tokens: Callable[[str], int] = approx_tokens) -> CheckResult:
    ratio = count_tokens(rewrite) / max(1, count_tokens(source))
    ok = bounds[0] <= ratio <= bounds[1]
    return CheckResult("length", ok, () if ok else (f"length ratio {ratio:.2f} outside [{bounds[0]}, {bounds[1]}]",),
                       ratio)


# --------------------------------------------------------------------------------------------------- judge
JUDGE_PROMPT = """You check a rewrite against its source text for factual fidelity.

Source:
{source}

Rewrite:
{rewrite}

List every fact the rewrite adds (not in the source), drops (in the source, missing from the rewrite) or alters
(states differently: another name, number, date, place or relation). Style, wording and order do not matter.
Reply with JSON only, in this form:
{{"added": ["..."], "dropped": ["..."], "altered": ["..."]}}"""


def parse_judge(reply: str | None) -> CheckResult:
    """The judge check from the judge model's reply; an unparseable reply rejects (reason says so)."""
    m = re.search(r"\{.*\}", reply or "", re.S)
    try:
        verdict = json.loads(m.group()) if m else None
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict) or not all(isinstance(verdict.get(k, []), list)
                                                for k in ("added", "dropped", "altered")):
        return CheckResult("judge", False, (f"unparseable judge reply: {(reply or '')[:200]!r}",))
    reasons = tuple(f"{k}: {v}" for k in ("added", "dropped", "altered") for v in verdict.get(k, []) if str(v).strip())
    return CheckResult("judge", not reasons, reasons)


@dataclass
class FidelityConfig:
    checks: tuple[str, ...] = DEFAULT_CHECKS
    embedding_threshold: float = 0.5
    embedder: Embedder | None = None
    judge: Any = None  # an openk2.llm.LLMClient
    judge_max_tokens: int = 512
    count_tokens: Callable[[str], int] = approx_tokens
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [c for c in self.checks if c not in ALL_CHECKS]
        if bad:
            raise ValueError(f"unknown fidelity check(s) {bad}; valid: {', '.join(ALL_CHECKS)}")
        if "embedding" in self.checks and self.embedder is None:
            self.embedder = HashingEmbedder()
        if "judge" in self.checks and self.judge is None:
            raise ValueError("the judge check needs a judge model (--judge-model)")


def verify_sync(source: str, rewrite: str, config: FidelityConfig,
                length_bounds: tuple[float, float] = (0.5, 2.0)) -> list[CheckResult]:
    """Every enabled check except `judge` and `format`."""
    out = []
    for name in config.checks:
        if name == "numbers":
            out.append(check_numbers(source, rewrite))
        elif name == "dates":
            out.append(check_dates(source, rewrite))
        elif name == "entities":
            out.append(check_entities(source, rewrite))
        elif name == "length":
            out.append(check_length(source, rewrite, length_bounds, config.count_tokens))
        elif name == "embedding":
            assert config.embedder is not None
            a, b = config.embedder.embed([source, rewrite])
            sim = cosine(a, b)
            ok = sim >= config.embedding_threshold
            out.append(CheckResult("embedding", ok, () if ok else (
                f"similarity {sim:.3f} < {config.embedding_threshold}",), sim))
    return out


async def verify(source: str, rewrite: str, config: FidelityConfig, length_bounds: tuple[float, float] = (0.5, 2.0),
                 seed: int = 0) -> list[CheckResult]:
    """`verify_sync` plus the LLM judge when enabled (greedy, cached like every request)."""
    out = verify_sync(source, rewrite, config, length_bounds)
    if "judge" in config.checks:
        from openk2.llm import LLMError

        prompt = JUDGE_PROMPT.format(source=source, rewrite=rewrite)
        try:
            reply = await config.judge.chat([{"role": "user", "content": prompt}], temperature=0.0,
                                            max_tokens=config.judge_max_tokens, seed=seed)
            out.append(parse_judge(reply.content))
        except LLMError as e:
            out.append(CheckResult("judge", False, (f"judge endpoint failure: {e}",)))
    return out
