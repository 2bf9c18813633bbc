"""Tokenize sources into memory-mapped shards with a manifest, resumably and crash-safely.

Layout of `out_dir`::

    manifest.json                          # what the loader reads; replaced atomically
    sources/<name>-<key16>/source.json     # per-source record, written last: its presence marks completion
    sources/<name>-<key16>/train-00000.tokens.npy   # flat uint16 (uint32 if vocab > 65536) token ids
    sources/<name>-<key16>/train-00000.offsets.npy  # int64, n_docs + 1: doc i is tokens[off[i]:off[i+1]]
    sources/<name>-<key16>/val-00000.{tokens,offsets}.npy

Every document is stored as `[bos_id] + encode(text)`, whole within one shard, so document boundaries are
known and the loader can start every row at a BOS.

Validation split: a document is held out if the first 8 bytes of sha256(text), read as a fraction of 2^64,
is below `val_fraction` (capped at `val_max_docs` per source, in source order), or if its source has
`split="val"`. Hashing the text, not the position, keeps the split stable when a source grows or is
reordered, and puts exact duplicates on the same side, so they cannot leak from train into validation.

Resumability: a source's directory name contains a key hashing the tokenizer fingerprint, the source
fingerprint (paths, sizes, mtimes; or the texts) and every setting that affects its shards. A re-run
reuses every complete source directory, re-tokenizes only what changed, and rewrites nothing if the
manifest's `build_key` is unchanged. A source is built under `<dir>.tmp.<pid>`, fsynced and renamed into place;
the manifest is written to a temporary file and `os.replace`d. A crash therefore leaves either the old
manifest (pointing at complete old shards) or the new one (pointing at complete new shards). Runs that
share a cache may build the same source at once: the first complete build wins, the others are discarded.
Old source directories are not deleted.

Parallelism: with `num_workers=0` (default) the tokenizer's own `encode_batch` does the work (HF
`tokenizers` runs it on all cores in Rust, with no pickling); with `num_workers > 0` a spawn-based process
pool loads one tokenizer per worker from `tokenizer_factory`, for tokenizers without native batching.
On 2 cores the native path is faster (numbers in the shards test docstring and the issue report).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

from openk2.data.sources import (
    ReadStats,
    Source,
    TextListSource,
    describe_source,
    iter_documents,
    source_fingerprint,
)
from openk2.utils.io import atomic_write_json, fsync_path

log = logging.getLogger(__name__)

FORMAT = "openk2.shards/1"
MANIFEST = "manifest.json"


@runtime_checkable
class TokenizerLike(Protocol):
    """All the data pipeline needs from a tokenizer (`openk2.data.tokenizer.Tokenizer` satisfies it)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


# Diverse enough that two different tokenizers almost surely disagree on at least one id.
_FINGERPRINT_TEXTS = [
    "Hello, world! 12345 67.89 e=mc^2",
    "  leading spaces\n\ttabs\r\nand CRLF  ",
    "Ünïcödé — 中文 日本語 한국어 🙂👍",
    "def f(x):\n    return x ** 2  # comment\n",
    "Xyla Morven was born in Trevane on 3 May 1987.",
]


def tokenizer_fingerprint(tokenizer: TokenizerLike) -> str:
    """A behavioural hash: vocab size, BOS id and the ids of a fixed multilingual probe text.

    Works for any `TokenizerLike` without access to its files; a tokenizer exposing a `fingerprint`
    string/method contributes it as well.
    """
    extra = getattr(tokenizer, "fingerprint", None)
    extra = extra() if callable(extra) else extra
    ids = [list(map(int, x)) for x in tokenizer.encode_batch(list(_FINGERPRINT_TEXTS))]
    blob = json.dumps({"vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "ids": ids, "extra": extra})
    return hashlib.sha256(blob.encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_validation_doc(text: str, fraction: float) -> bool:
    """The hash rule of the validation split (see the module docstring)."""
    h = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:8], "little") < fraction * 2.0**64


# ---------------------------------------------------------------------------------------------------------
# Encoding (shared by the in-process path and pool workers)

_WORKER_TOKENIZER: TokenizerLike | None = None


def _worker_init(factory: Callable[[], TokenizerLike]) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = factory()


def _worker_encode(texts: list[str], dtype: str) -> list[np.ndarray]:
    assert _WORKER_TOKENIZER is not None, "worker not initialised"
    return _encode_docs(_WORKER_TOKENIZER, texts, np.dtype(dtype))


def _encode_docs(tokenizer: TokenizerLike, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    out = []
    bos, vocab = tokenizer.bos_id, tokenizer.vocab_size
    for ids in tokenizer.encode_batch(texts):
        arr = np.empty(len(ids) + 1, dtype=np.int64)
        arr[0] = bos
        arr[1:] = ids
        # A wrong tokenizer/vocab pairing would silently wrap around in uint16; fail loudly instead.
        if arr.size > 1 and (arr.min() < 0 or arr.max() >= vocab):
            raise ValueError(f"token id out of range [0, {vocab}) from tokenizer")
        out.append(arr.astype(dtype))
    return out


# ---------------------------------------------------------------------------------------------------------
# Writing


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


class _SplitWriter:
    """Accumulates documents of one split and writes a shard whenever `shard_tokens` is reached."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.parts: list[np.ndarray] = []
        self.pending = 0
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self.tokens = 0

    def add(self, doc: np.ndarray) -> None:
        self.parts.append(doc)
        self.pending += len(doc)
        self.documents += 1
        self.tokens += len(doc)
        if self.pending >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        stem = f"{self.split}-{len(self.shards):05d}"
        offsets = np.zeros(len(self.parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in self.parts], out=offsets[1:])
        tokens = np.concatenate(self.parts).astype(self.dtype, copy=False)
        files = {"tokens": f"{stem}.tokens.npy", "offsets": f"{stem}.offsets.npy"}
        _save_npy(self.directory / files["tokens"], tokens)
        _save_npy(self.directory / files["offsets"], offsets)
        sizes = {k: (self.directory / v).stat().st_size for k, v in files.items()}
        self.shards.append({**files, "documents": len(self.parts), "num_tokens": int(len(tokens)), "bytes": sizes})
        self.parts, self.pending = [], 0

    def record(self) -> dict[str, Any]:
        self.flush()
        return {"documents": self.documents, "num_tokens": self.tokens, "shards": self.shards}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:40] or "source"


def _source_complete(directory: Path, key: str) -> dict[str, Any] | None:
    """The source record if `directory` holds a complete build for `key`, else None."""
    try:
        record = json.loads((directory / "source.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("key") != key:
        return None
    for split in ("train", "val"):
        for shard in record[split]["shards"]:
            for kind in ("tokens", "offsets"):
                p = directory / shard[kind]
                if not p.is_file() or p.stat().st_size != shard["bytes"][kind]:
                    return None
    return record


def _encoded_batches(
    texts: Iterator[list[str]],
    tokenizer: TokenizerLike,
    dtype: np.dtype,
    num_workers: int,
    factory: Callable[[], TokenizerLike] | None,
) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    if num_workers == 0:
        for batch in texts:
            yield batch, _encode_docs(tokenizer, batch, dtype)
        return
    ctx = mp.get_context("spawn")  # fork after the Rust thread pool started is unsafe (and warns)
    with ctx.Pool(num_workers, initializer=_worker_init, initargs=(factory,)) as pool:
        # Bounded in flight: Pool.imap would read the whole source ahead into memory.
        pending: deque[tuple[list[str], Any]] = deque()
        for batch in texts:
            pending.append((batch, pool.apply_async(_worker_encode, (batch, dtype.str))))
            if len(pending) >= 2 * num_workers:
                b, r = pending.popleft()
                yield b, r.get()
        while pending:
            b, r = pending.popleft()
            yield b, r.get()


def _batched(docs: Iterator[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def build_shards(
    sources: Sequence[Source],
    out_dir: str | Path,
    tokenizer: TokenizerLike | None = None,
    *,
    tokenizer_factory: Callable[[], TokenizerLike] | None = None,
    num_workers: int = 0,
    val_fraction: float = 0.01,
    val_max_docs: int | None = None,
    shard_tokens: int = 1 << 24,
    batch_docs: int = 256,
    on_error: str = "fail",
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `sources` into `out_dir` (see the module docstring) and return the manifest.

    Pass `tokenizer`, or `tokenizer_factory` (a picklable zero-argument callable, e.g.
    `functools.partial(Tokenizer.load, "tok/")`), which `num_workers > 0` requires.
    """
    if not sources:
        raise ValueError("no sources")
    labels = [s.label for s in sources]
    if len(set(labels)) != len(labels):
        raise ValueError(f"source names must be unique, got {labels}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if num_workers < 0 or (num_workers > 0 and tokenizer_factory is None):
        raise ValueError("num_workers > 0 needs tokenizer_factory (tokenizers are loaded once per worker)")
    if tokenizer is None:
        if tokenizer_factory is None:
            raise ValueError("pass tokenizer or tokenizer_factory")
        tokenizer = tokenizer_factory()
    out_dir = Path(out_dir)
    (out_dir / "sources").mkdir(parents=True, exist_ok=True)
    tok_fp = tokenizer_fingerprint(tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)

    records = []
    for source in sources:
        settings = {
            "format": FORMAT, "tokenizer": tok_fp, "source": source_fingerprint(source), "split": source.split,
            "val_fraction": val_fraction, "val_max_docs": val_max_docs, "shard_tokens": shard_tokens,
            "on_error": on_error, "dtype": dtype.str,
        }  # fmt: skip
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        directory = out_dir / "sources" / f"{_slug(source.label)}-{key[:16]}"
        record = _source_complete(directory, key)
        if record is not None:
            log.info("%s: reusing %s", source.label, directory)
        else:
            record = _build_source(
                source, directory, key, tokenizer, tokenizer_factory, num_workers, dtype,
                val_fraction, val_max_docs, shard_tokens, batch_docs, on_error, progress,
            )  # fmt: skip
        records.append(_manifest_entry(source, directory.relative_to(out_dir), record))

    build_key = hashlib.sha256(
        json.dumps([tok_fp, [(r["name"], r["weight"], r["key"]) for r in records]]).encode()
    ).hexdigest()
    path = out_dir / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
        if old.get("build_key") == build_key:
            return old
    manifest = {
        "format": FORMAT,
        "build_key": build_key,
        "tokenizer": {"fingerprint": tok_fp, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id},
        "dtype": dtype.name,
        "val_split": {"method": "sha256(text)[:8] / 2^64 < fraction", "fraction": val_fraction,
                      "max_docs_per_source": val_max_docs},  # fmt: skip
        "sources": records,
        "totals": {
            f"{split}_{k}": sum(r[split][k] for r in records)
            for split in ("train", "val")
            for k in ("documents", "num_tokens")
        },
    }
    atomic_write_json(path, manifest, indent=1, sort_keys=True)
    return manifest


def _manifest_entry(source: Source, rel_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    def split_entry(split: str) -> dict[str, Any]:
        r = record[split]
        shards = [
            {"tokens": str(rel_dir / s["tokens"]), "offsets": str(rel_dir / s["offsets"]),
             "documents": s["documents"], "num_tokens": s["num_tokens"]}  # fmt: skip
            for s in r["shards"]
        ]
        return {"documents": r["documents"], "num_tokens": r["num_tokens"], "shards": shards}

    return {
        "name": source.label,
        "weight": source.weight,
        "key": record["key"],
        "source": describe_source(source),
        "read": record["read"],
        "train": split_entry("train"),
        "val": split_entry("val"),
    }


def _build_source(
    source: Source,
    directory: Path,
    key: str,
    tokenizer: TokenizerLike,
    factory: Callable[[], TokenizerLike] | None,
    num_workers: int,
    dtype: np.dtype,
    val_fraction: float,
    val_max_docs: int | None,
    shard_tokens: int,
    batch_docs: int,
    on_error: str,
    progress: bool,
) -> dict[str, Any]:
    # One temporary directory per process: runs sharing a cache may build the same source at the same time.
    for debris in directory.parent.glob(directory.name + ".tmp.*"):  # of crashed builds of this very source
        pid = debris.name.rsplit(".", 1)[-1]
        if pid == str(os.getpid()) or not _pid_alive(pid):
            shutil.rmtree(debris, ignore_errors=True)
    tmp = directory.with_name(f"{directory.name}.tmp.{os.getpid()}")
    tmp.mkdir(parents=True)
    writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
    stats = ReadStats()
    total = len(source.texts) if isinstance(source, TextListSource) else None
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"tokenize {source.label}", unit="doc", disable=not progress, dynamic_ncols=True)
    n_val = 0
    docs = iter_documents(source, on_error=on_error, stats=stats)
    try:
        for texts, encoded in _encoded_batches(_batched(docs, batch_docs), tokenizer, dtype, num_workers, factory):
            for text, arr in zip(texts, encoded, strict=True):
                if source.split == "val":
                    held_out = True
                elif source.split == "train":
                    held_out = False
                else:
                    held_out = (val_max_docs is None or n_val < val_max_docs) and is_validation_doc(text, val_fraction)
                n_val += held_out
                writers["val" if held_out else "train"].add(arr)
            bar.update(len(texts))
            bar.set_postfix(tokens=writers["train"].tokens + writers["val"].tokens, refresh=False)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    record = {
        "key": key,
        "read": {"files": stats.files, "documents": stats.documents, "skipped": stats.skipped,
                 "empty": stats.empty, "skipped_examples": stats.skipped_examples},  # fmt: skip
        "train": writers["train"].record(),
        "val": writers["val"].record(),
        "build_seconds": round(seconds, 3),
    }
    n_tok = record["train"]["num_tokens"] + record["val"]["num_tokens"]
    log.info("%s: %d docs, %d tokens in %.2fs (%.0f tok/s)", source.label, stats.documents, n_tok, seconds,
             n_tok / max(seconds, 1e-9))  # fmt: skip
    atomic_write_json(tmp / "source.json", record, indent=1, sort_keys=True)
    for _ in range(3):
        done = _source_complete(directory, key)
        if done is not None:  # a concurrent build of the same source finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return done
        if directory.exists():  # an incomplete or stale build under the same key
            shutil.rmtree(directory, ignore_errors=True)
        try:
            os.replace(tmp, directory)
        except OSError:  # another process renamed its build into place in between: check it again
            continue
        fsync_path(directory.parent)
        return record
    raise RuntimeError(f"could not move the build of {source.label} into {directory}: concurrent writers?")


def _pid_alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read `manifest.json` from a shard directory (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no shard manifest (run build_shards first)") from e
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} manifest (format={manifest.get('format')!r})")
    return manifest
