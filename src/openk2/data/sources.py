"""Text sources for pretraining: local files and directories, or in-memory documents, with mixture weights.

A source yields documents (strings). File formats, chosen by extension when `kind="auto"`:

* text (`.txt`, `.md`, `.markdown`): the whole file is one document;
* JSONL (`.jsonl`, `.ndjson`): one JSON object per line, the document in `text_field` (default "text");
  blank lines are ignored;
* parquet (`.parquet`): one document per row of column `text_field` (needs the optional `pyarrow`).

A directory is searched recursively, in sorted path order (hidden entries skipped), for files of the
requested kind (any of the above for "auto"). Missing paths, empty files, directories without matching
files and unreadable files (permissions, invalid UTF-8, broken parquet) always raise `SourceError` naming
the path. A corrupt *record* (invalid JSON, not an object, missing or non-string field, null parquet cell)
raises `SourceError` with `file:line` (or `file:row`) when `on_error="fail"`, and is skipped when
`on_error="skip"`, with one warning per file giving the count and the first location. Records whose text
is empty are dropped and counted (they carry nothing to train on).

`weight` is the relative share of *training tokens* the loader draws from the source (`loader.py`);
`split` decides which documents are held out for validation when shards are built (`shards.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("auto", "text", "jsonl", "parquet")
SPLITS = ("auto", "train", "val")
_EXTENSIONS = {
    "text": (".txt", ".md", ".markdown"),
    "jsonl": (".jsonl", ".ndjson"),
    "parquet": (".parquet",),
}


class SourceError(ValueError):
    """A source path or record that cannot be read; the message names the file (and line or row)."""


def _check_common(name: str, weight: float, split: str) -> None:
    if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"source {name}: weight must be a finite number >= 0, got {weight!r}")
    if split not in SPLITS:
        raise ValueError(f"source {name}: split must be one of {SPLITS}, got {split!r}")


@dataclass(frozen=True)
class SourceSpec:
    """Documents from a file or a directory tree.

    `split`: "auto" holds out a deterministic fraction of documents for validation (see `shards.py`),
    "train" keeps all for training, "val" uses all for validation only.
    """

    path: str | Path
    weight: float = 1.0
    kind: str = "auto"
    text_field: str = "text"
    name: str | None = None
    split: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"source {self.path}: kind must be one of {KINDS}, got {self.kind!r}")
        _check_common(self.label, self.weight, self.split)

    @property
    def label(self) -> str:
        return self.name or str(self.path)


@dataclass(frozen=True)
class TextListSource:
    """Documents already in memory, e.g. `world_documents(world)`."""

    name: str
    texts: Sequence[str]
    weight: float = 1.0
    split: str = "auto"

    def __post_init__(self) -> None:
        _check_common(self.name, self.weight, self.split)

    @property
    def label(self) -> str:
        return self.name


Source = SourceSpec | TextListSource


@dataclass
class ReadStats:
    """Counts collected while reading one source (recorded in the shard manifest)."""

    files: int = 0
    documents: int = 0
    skipped: int = 0  # corrupt records dropped with on_error="skip"
    empty: int = 0  # records with empty text, always dropped
    skipped_examples: list[str] = field(default_factory=list)  # first few "file:line: reason"


def _kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return next((k for k, exts in _EXTENSIONS.items() if suffix in exts), None)


def resolve_files(spec: SourceSpec) -> list[tuple[Path, str]]:
    """The (file, kind) pairs a spec reads, in deterministic order. Raises SourceError if there are none."""
    path = Path(spec.path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if path.is_file():
        kind = spec.kind if spec.kind != "auto" else _kind_of(path)
        if kind is None:
            raise SourceError(
                f"{path}: cannot tell the format from the extension; set kind to one of {KINDS[1:]}"
            )
        return [(path, kind)]
    if not path.is_dir():
        raise SourceError(f"{path}: not a regular file or directory")
    files = []
    for root, dirs, names in os.walk(path, onerror=_raise_walk_error):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            if n.startswith("."):
                continue
            f = Path(root) / n
            kind = _kind_of(f)
            if kind is not None and spec.kind in ("auto", kind):
                files.append((f, kind))
    # Sorted by path components, not walk order, so the order is the same on every filesystem.
    files.sort(key=lambda fk: fk[0].relative_to(path).parts)
    if not files:
        wanted = sum(_EXTENSIONS.values(), ()) if spec.kind == "auto" else _EXTENSIONS[spec.kind]
        raise SourceError(f"{path}: directory contains no files with extension {' '.join(wanted)}")
    return files


def _raise_walk_error(e: OSError) -> None:
    raise SourceError(f"{e.filename}: cannot list directory: {e.strerror}")


def iter_documents(source: Source, on_error: str = "fail", stats: ReadStats | None = None) -> Iterator[str]:
    """Yield the documents of `source` in deterministic order (see the module docstring for errors)."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    stats = stats if stats is not None else ReadStats()
    before = stats.documents
    yield from _iter_source(source, on_error, stats)
    if stats.documents == before:
        raise SourceError(f"{source.label}: source has no documents")


def _iter_source(source: Source, on_error: str, stats: ReadStats) -> Iterator[str]:
    if isinstance(source, TextListSource):
        for i, t in enumerate(source.texts):
            if not isinstance(t, str):
                _bad(stats, on_error, f"{source.name}[{i}]: document is {type(t).__name__}, not str")
            elif t:
                stats.documents += 1
                yield t
            else:
                stats.empty += 1
        return
    for path, kind in resolve_files(source):
        stats.files += 1
        skipped_before = stats.skipped
        if kind == "text":
            docs = _read_text(path)
        elif kind == "jsonl":
            docs = _read_jsonl(path, source.text_field, on_error, stats)
        else:
            docs = _read_parquet(path, source.text_field, on_error, stats)
        for d in docs:
            if d:
                stats.documents += 1
                yield d
            else:
                stats.empty += 1
        if stats.skipped > skipped_before:
            first = next((e for e in stats.skipped_examples if e.startswith(f"{path}:")), "")
            log.warning("%s: skipped %d corrupt record(s) (first: %s)", path, stats.skipped - skipped_before, first)


def _bad(stats: ReadStats, on_error: str, message: str) -> None:
    if on_error == "fail":
        raise SourceError(message)
    stats.skipped += 1
    if len(stats.skipped_examples) < 5:
        stats.skipped_examples.append(message)


def _open_nonempty(path: Path, mode: str = "rb") -> Any:
    try:
        f = open(path, mode)  # noqa: SIM115 - returned to the caller, who closes it
    except OSError as e:
        raise SourceError(f"{path}: cannot open: {e.strerror}") from e
    if os.fstat(f.fileno()).st_size == 0:
        f.close()
        raise SourceError(f"{path}: file is empty")
    return f


def _read_text(path: Path) -> Iterator[str]:
    with _open_nonempty(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not valid UTF-8 (byte {e.start})") from e
    if not text.strip():
        raise SourceError(f"{path}: file is empty (whitespace only)")
    yield text


def _read_jsonl(path: Path, text_field: str, on_error: str, stats: ReadStats) -> Iterator[str]:
    with _open_nonempty(path) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                _bad(stats, on_error, f"{where}: not valid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                _bad(stats, on_error, f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict):
                _bad(stats, on_error, f"{where}: expected a JSON object, got {type(record).__name__}")
            elif text_field not in record:
                _bad(stats, on_error, f"{where}: no field {text_field!r} (fields: {', '.join(sorted(record))})")
            elif not isinstance(record[text_field], str):
                _bad(stats, on_error, f"{where}: field {text_field!r} is {type(record[text_field]).__name__}, not str")
            else:
                yield record[text_field]


def _read_parquet(path: Path, text_field: str, on_error: str, stats: ReadStats) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SourceError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    _open_nonempty(path).close()
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"{path}: unreadable parquet file: {e}") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise SourceError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
    col_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise SourceError(f"{path}: column {text_field!r} has type {col_type}, not string")
    row = 0
    # Row group at a time: bounded memory for large files.
    for g in range(pf.num_row_groups):
        try:
            values = pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise SourceError(f"{path}: unreadable row group {g}: {e}") from e
        for v in values:
            if v is None:
                _bad(stats, on_error, f"{path}:row {row}: null {text_field!r}")
            else:
                yield v
            row += 1


def source_fingerprint(source: Source) -> str:
    """A hash that changes when the documents may have changed: file paths, sizes and modification times
    for file sources (cheap, like make), the full contents for in-memory sources."""
    h = hashlib.sha256()
    if isinstance(source, TextListSource):
        h.update(b"texts\0")
        for t in source.texts:
            b = t.encode("utf-8", "surrogatepass") if isinstance(t, str) else repr(t).encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    else:
        h.update(json.dumps(["files", source.kind, source.text_field]).encode())
        for path, kind in resolve_files(source):
            st = path.stat()
            h.update(json.dumps([str(path.resolve()), kind, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


def describe_source(source: Source) -> dict[str, Any]:
    """JSON-able description of a source for manifests."""
    if isinstance(source, TextListSource):
        return {"type": "texts", "name": source.name, "weight": source.weight, "split": source.split,
                "documents": len(source.texts)}  # fmt: skip
    return {"type": "files", "name": source.label, "path": str(source.path), "kind": source.kind,
            "text_field": source.text_field, "weight": source.weight, "split": source.split}  # fmt: skip
