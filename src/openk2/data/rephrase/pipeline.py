"""The rephrasing pipeline: documents in, rewritten documents (JSONL, with provenance) out. `openk2 rephrase`.

    config = RephraseConfig(inputs=["corpus.jsonl"], out="runs/rephrase/x", styles=["wrap-medium"], n=2)
    summary = asyncio.run(run_rephrase(config, LLMRephraser(client)))    # or WorldRephraser(world)

For every input document, style and rephrasing index k < n: chunk the document (`chunking`), rewrite chunk by
chunk, each request carrying the tail of the rewritten text so far (K2's chunk-wise autoregressive rewriting),
post-process each reply (`prompts`), verify each chunk (`fidelity`), reassemble, drop near-duplicates of earlier
rewrites of the same document, and append one JSON line to `rephrased.jsonl` (accepted) or `rejected.jsonl`
(with every reason). A document comes back whole or not at all: any failed chunk rejects the document.

Output directory (`out`):
    rephrased[.shard-I-of-N].jsonl  {"text", "key", "source": {"id", "path", "sha256"}, "style", "prompt_version",
                                     "model", "seed", "rephrasing", "chunks": [...], "fidelity": {...}}
    rejected[.shard-I-of-N].jsonl   the same fields plus "reasons" (and "text" when a rewrite exists)
    usage[...].json, run[...].json  token/cost accounting per model; the config and counts
    cache/                          the response cache (shared by shards)

Resumable: both JSONL files are the done markers (a record's "key" hashes document id, style, prompt version,
model and k), a torn last line from a kill is cut off on restart, and the response cache answers every request
already made. `shard=(i, N)` processes the documents whose id hashes to i mod N. At most `concurrency`
documents are in flight; chunks of one document are sequential by construction.

Bad input: an empty or non-UTF-8 document, an unreadable record, a reply that ignores the format (after
`format_retries` retries with another seed), a truncated reply (finish_reason "length") or an endpoint failure
(after the backend's retries) are rejected records with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openk2.data.rephrase.chunking import Chunk, chunk_document, reassemble, tail
from openk2.data.rephrase.fidelity import FidelityConfig, verify
from openk2.data.rephrase.prompts import FormatError, Style, approx_tokens
from openk2.data.sources import SourceError, SourceSpec, resolve_files
from openk2.llm import LLMError, Usage, UsageTracker


# ------------------------------------------------------------------------------------------------------ input
@dataclass(frozen=True)
class InputDoc:
    id: str  # "file:line" (JSONL), "file" (text), "file#row" (parquet); the record's own "id" is appended
    path: str
    text: str | None
    error: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256((self.text or "").encode("utf-8")).hexdigest()[:16]


def read_inputs(paths: Sequence[str | Path], kind: str = "auto", text_field: str = "text") -> Iterator[InputDoc]:
    """Every document of the sources, in order; unreadable, non-UTF-8 or empty ones as `InputDoc.error`.
    Missing paths raise `SourceError` (nothing to record a rejection against)."""
    for p in paths:
        for path, k in resolve_files(SourceSpec(p, kind=kind, text_field=text_field)):
            yield from _read_file(path, k, text_field)


def _doc(doc_id: str, path: Path, text: str | None, error: str | None = None) -> InputDoc:
    if error is None and (text is None or not text.strip()):
        error = "empty document"
    return InputDoc(doc_id, str(path), text if error is None else None, error)


def _read_file(path: Path, kind: str, text_field: str) -> Iterator[InputDoc]:
    if kind == "text":
        raw = path.read_bytes()
        try:
            yield _doc(str(path), path, raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield _doc(str(path), path, None, f"not valid UTF-8 (byte {e.start})")
    elif kind == "jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield _doc(where, path, None, f"not valid UTF-8 (byte {e.start})")
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    yield _doc(where, path, None, f"invalid JSON: {e}")
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                    yield _doc(where, path, None, f"no string field {text_field!r}")
                    continue
                rid = rec.get("id")
                yield _doc(f"{where}#{rid}" if isinstance(rid, str | int) else where, path, rec[text_field])
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise SourceError(f"{path}: reading parquet needs pyarrow") from e
        pf = pq.ParquetFile(path)
        row = 0
        for g in range(pf.num_row_groups):
            for v in pf.read_row_group(g, columns=[text_field]).column(0).to_pylist():
                yield _doc(f"{path}#{row}", path, v, None if isinstance(v, str) else f"null {text_field!r}")
                row += 1


def in_shard(doc_id: str, shard: tuple[int, int]) -> bool:
    i, n = shard
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:12], 16) % n == i


# --------------------------------------------------------------------------------------------------- rephrasers
@dataclass
class Reply:
    text: str | None
    finish_reason: str | None = "stop"
    usage: Usage = field(default_factory=Usage)


class Rephraser(ABC):
    """Rewrites one chunk in a style, given the rewritten text so far. `name` goes into provenance."""

    name: str = "rephraser"
    usage: UsageTracker

    @abstractmethod
    async def rewrite(self, style: Style, chunk: Chunk, context: str, *, doc: InputDoc, seed: int) -> Reply: ...

    async def aclose(self) -> None:  # noqa: B027
        pass


class LLMRephraser(Rephraser):
    """Through an `openk2.llm.LLMClient` (any model spec: run dir, HF dir, openai:URL, replay)."""

    def __init__(self, client: Any, language: str = "English") -> None:
        self.client, self.language = client, language
        self.name = client.model or "llm"
        self.usage = client.usage

    async def rewrite(self, style: Style, chunk: Chunk, context: str, *, doc: InputDoc, seed: int) -> Reply:
        r = await self.client.chat(style.messages(chunk.text, context, self.language), temperature=style.temperature,
                                   top_p=style.top_p, max_tokens=style.max_output_tokens, seed=seed)
        return Reply(r.content, r.finish_reason, r.usage)

    async def aclose(self) -> None:
        await self.client.aclose()


# ------------------------------------------------------------------------------------------------------- config
@dataclass
class RephraseConfig:
    inputs: Sequence[str | Path]
    out: str | Path
    styles: Sequence[Style]
    n: int = 1  # rephrasings per document and style
    seed: int = 0
    kind: str = "auto"
    text_field: str = "text"
    chunk_tokens: int | None = None  # default: each style's chunk_tokens
    context_tokens: int = 256  # tail of the rewritten text sent with the next chunk
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    dedup_threshold: float = 0.9  # Jaccard of character 5-gram sets vs earlier rewrites of the same doc; 0 = off
    format_retries: int = 1
    concurrency: int = 8
    shard: tuple[int, int] = (0, 1)
    limit: int | None = None  # first N input documents (of this shard)
    count_tokens: Callable[[str], int] = approx_tokens
    progress: bool = True

    @property
    def suffix(self) -> str:
        i, n = self.shard
        return "" if n == 1 else f".shard-{i:05d}-of-{n:05d}"


def task_key(doc_id: str, style: Style, model: str, k: int) -> str:
    return hashlib.sha256(json.dumps([doc_id, style.name, style.version, model, k]).encode()).hexdigest()[:20]


def _shingles(text: str, n: int = 5) -> set[int]:
    s = " ".join(text.lower().split())
    return {int.from_bytes(hashlib.blake2b(s[i:i + n].encode(), digest_size=8).digest(), "little")
            for i in range(max(1, len(s) - n + 1))}


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(1, len(a | b))


# ------------------------------------------------------------------------------------------------------- output
class _JsonlLog:
    """Append-only JSONL; on open, a torn last line (a kill mid-write) is cut off."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                with open(path, "r+b") as f:
                    f.truncate(keep)
            for line in data[:keep].splitlines():
                with contextlib.suppress(ValueError):
                    self.records.append(json.loads(line))
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


# --------------------------------------------------------------------------------------------------------- run
class _Reject(Exception):
    def __init__(self, reasons: list[str], partial: dict[str, Any] | None = None) -> None:
        super().__init__("; ".join(reasons))
        self.reasons, self.partial = reasons, partial or {}


async def rewrite_document(doc: InputDoc, style: Style, k: int, rephraser: Rephraser, cfg: RephraseConfig
                           ) -> dict[str, Any]:
    """One rewrite of `doc` in `style`: {"text", "chunks", "fidelity"}; raises _Reject with reasons."""
    assert doc.text is not None
    chunked = chunk_document(doc.text, cfg.chunk_tokens or style.chunk_tokens, cfg.count_tokens)
    seed = cfg.seed * 1_000_003 + k
    parts: list[tuple[str, str]] = []
    chunk_info, fidelity = [], []
    reasons: list[str] = []
    for c in chunked.chunks:
        context = tail(reassemble("", parts), cfg.context_tokens, cfg.count_tokens) if parts else ""
        text, why = None, []
        for attempt in range(cfg.format_retries + 1):
            s = seed + attempt * 7919
            try:
                reply = await rephraser.rewrite(style, c, context, doc=doc, seed=s)
            except LLMError as e:
                raise _Reject([f"chunk {c.index}: endpoint failure: {e}"]) from None
            if reply.finish_reason == "length":
                why.append(f"chunk {c.index}: reply truncated (finish_reason=length, max_tokens="
                           f"{style.max_output_tokens})")
                continue
            if "format" in cfg.fidelity.checks:
                try:
                    text = style.postprocess(reply.text, source=c.text, rng=random.Random(f"{doc.id}/{k}/{c.index}"),
                                             count_tokens=cfg.count_tokens)
                    break
                except FormatError as e:
                    why.append(f"chunk {c.index}: format: {e}")
            elif reply.text and reply.text.strip():
                text = reply.text.strip()
                break
            else:
                why.append(f"chunk {c.index}: empty reply")
        if text is None:
            raise _Reject(why)
        checks = await verify(c.text, text, cfg.fidelity, style.length_ratio, seed=seed)
        fidelity.append({r.name: r.to_dict() for r in checks})
        reasons += [f"chunk {c.index}: {r.name}: {reason}" for r in checks if not r.ok for reason in r.reasons]
        parts.append((text, c.sep))
        chunk_info.append({"index": c.index, "span": [c.start, c.end], "tokens": c.tokens, "oversize": c.oversize,
                           "context_tokens": cfg.count_tokens(context) if context else 0})
    out = {"text": reassemble("", parts).strip(), "chunks": chunk_info, "fidelity": fidelity}
    if reasons:
        raise _Reject(reasons, out)
    return out


async def run_rephrase(cfg: RephraseConfig, rephraser: Rephraser, log: Callable[[str], None] | None = None
                       ) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the run summary (also written to run[suffix].json)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    accepted = _JsonlLog(out / f"rephrased{cfg.suffix}.jsonl")
    rejected = _JsonlLog(out / f"rejected{cfg.suffix}.jsonl")
    done = {r.get("key") for r in accepted.records} | {r.get("key") for r in rejected.records}
    index: dict[str, list[tuple[str, set[int]]]] = {}  # dedup: source id -> accepted (key, shingles)
    for r in accepted.records:
        index.setdefault(r["source"]["id"], []).append((r["key"], _shingles(r["text"])))
    counts = {"documents": 0, "tasks": 0, "skipped_done": 0, "accepted": 0, "rejected": 0}
    reject_reasons: dict[str, int] = {}
    t0 = time.perf_counter()

    def provenance(doc: InputDoc, style: Style, k: int) -> dict[str, Any]:
        return {"key": task_key(doc.id, style, rephraser.name, k),
                "source": {"id": doc.id, "path": doc.path, "sha256": doc.sha256}, "style": style.name,
                "prompt_version": style.version, "model": rephraser.name, "seed": cfg.seed, "rephrasing": k}

    def reject(rec: dict[str, Any], reasons: list[str]) -> None:
        rejected.write({**rec, "reasons": reasons})
        counts["rejected"] += 1
        for r in reasons:
            kind = re.sub(r"^chunk \d+: ", "", r).split(":")[0]
            reject_reasons[kind] = reject_reasons.get(kind, 0) + 1

    def tasks() -> Iterator[tuple[InputDoc, Style, int]]:
        n_docs = 0
        for doc in read_inputs(cfg.inputs, cfg.kind, cfg.text_field):
            if not in_shard(doc.id, cfg.shard):
                continue
            if cfg.limit is not None and n_docs >= cfg.limit:
                return
            n_docs += 1
            counts["documents"] += 1
            for style in cfg.styles:
                for k in range(cfg.n):
                    yield doc, style, k

    async def one(doc: InputDoc, style: Style, k: int) -> None:
        rec = provenance(doc, style, k)
        if doc.error is not None:
            reject(rec, [f"input: {doc.error}"])
            return
        try:
            result = await rewrite_document(doc, style, k, rephraser, cfg)
        except _Reject as e:
            reject({**rec, **e.partial}, e.reasons)
            return
        sh = _shingles(result["text"])
        if cfg.dedup_threshold > 0:
            for other_key, other in index.get(doc.id, []):
                sim = jaccard(sh, other)
                if sim >= cfg.dedup_threshold:
                    reject({**rec, **result}, [f"near-duplicate: Jaccard {sim:.2f} with {other_key}"])
                    return
        index.setdefault(doc.id, []).append((rec["key"], sh))
        accepted.write({"text": result.pop("text"), **rec, **result})
        counts["accepted"] += 1

    progress = _Progress(cfg.progress)
    try:
        async for _ in _bounded(one, tasks(), cfg.concurrency, done, rephraser.name, counts):
            progress.update(counts, rephraser.usage)
    finally:
        progress.close()
        accepted.close()
        rejected.close()
    usage = rephraser.usage.summary()
    rephraser.usage.save(out / f"usage{cfg.suffix}.json")
    summary = {"inputs": [str(p) for p in cfg.inputs], "styles": {s.name: s.version for s in cfg.styles},
               "n": cfg.n, "seed": cfg.seed, "model": rephraser.name, "shard": list(cfg.shard),
               "checks": list(cfg.fidelity.checks), "counts": counts, "reject_reasons": reject_reasons,
               "seconds": round(time.perf_counter() - t0, 2), "usage_total": usage["total"],
               "files": {"accepted": accepted.path.name, "rejected": rejected.path.name}}
    (out / f"run{cfg.suffix}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


async def _bounded(fn: Callable[..., Any], items: Iterator[tuple[InputDoc, Style, int]], limit: int, done: set,
                   model: str, counts: dict[str, int]) -> AsyncIterator[None]:
    """Run fn(*item) for every not-yet-done item with at most `limit` in flight, reading `items` lazily."""
    pending: set[asyncio.Task] = set()
    for doc, style, k in items:
        counts["tasks"] += 1
        if task_key(doc.id, style, model, k) in done:
            counts["skipped_done"] += 1
            continue
        pending.add(asyncio.ensure_future(fn(doc, style, k)))
        if len(pending) >= limit:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in finished:
                t.result()
                yield None
    while pending:
        finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for t in finished:
            t.result()
            yield None


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=False)
            self.task = self.bar.add_task("rephrasing", total=None)
            self.bar.start()

    def update(self, counts: dict[str, int], usage: UsageTracker) -> None:
        if self.bar is not None:
            total = usage.summary()["total"]
            self.bar.update(self.task, description=(
                f"docs {counts['documents']} | accepted {counts['accepted']} rejected {counts['rejected']} "
                f"resumed {counts['skipped_done']} | tokens in {total['prompt_tokens']:,} out "
                f"{total['completion_tokens']:,} cached req {total['cached_requests']} | ${total['cost_usd']:.4f}"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


