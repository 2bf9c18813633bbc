"""BOS-aligned best-fit packing of token shards into `(inputs_BT, targets_BT)` batches (nanochat's loader,
anchors.md §A and §E.14), resumable, sharded by data-parallel rank, honouring source mixture weights.

Packing. Each row holds T+1 tokens (inputs are row[:-1], targets row[1:]) and is filled with whole
documents, each starting with its BOS, so every row starts with a BOS. A buffer of `buffer_size`
documents is kept full from the document stream; to fill the remaining space of a row, the *largest*
buffered document that fits is taken (ties: lowest buffer slot); when none fits, the *shortest* one is
cropped to the space left and its tail is dropped. Rows are therefore 100% utilised; the price is the
cropped tokens, reported as `stats()["cropped_fraction"]`.

Targets. Every position is predicted, including the BOS that starts the next document in a row (as in
nanochat): documents carry no EOS, so predicting that BOS is how the model learns where a document ends.
Attention is not masked between documents of a row (as in nanochat). The only -100 targets are the
padding of `validation_batches`.

Document stream. Per source, each epoch is a permutation of its training documents drawn from
`seed`, source index and epoch number; rank r of `world_size` takes positions r, r + world_size, ... of it,
so ranks read disjoint documents within an epoch. Sources are interleaved deterministically by token
share: the next document comes from the source with the smallest `tokens_drawn / weight` (ties: the first
source), so each source's share of drawn tokens tracks weight / sum(weights) to within one document. A
source that runs out starts its next epoch (a small, heavy source is repeated); the stream never ends.

Resuming. `state_dict()` holds per-source epoch, cursor and drawn-token counters and the buffer as
(source, document) index pairs -- O(buffer_size) integers, never token data. `load_state_dict` rebuilds
the buffer from the shards, so the next batches equal those of an uninterrupted loader. The batch size
may change on resume (the row stream is independent of it); seed, rank, world size, sequence length,
buffer size, weights and shards may not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openk2.data.shards import load_manifest

STATE_FORMAT = "openk2.loader/1"
IGNORE_INDEX = -100


class ShardDataset:
    """Memory-mapped view of a shard directory written by `build_shards`."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.root = path if path.is_dir() else path.parent
        self.manifest = load_manifest(path)
        self.bos_id: int = self.manifest["tokenizer"]["bos_id"]
        self.vocab_size: int = self.manifest["tokenizer"]["vocab_size"]
        self.build_key: str = self.manifest["build_key"]
        self.names: list[str] = [s["name"] for s in self.manifest["sources"]]
        self.weights: list[float] = [float(s["weight"]) for s in self.manifest["sources"]]
        # (split, source) -> (shard token arrays, shard id per doc, start per doc, length per doc)
        self._index: dict[tuple[str, int], tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]] = {}
        for s, entry in enumerate(self.manifest["sources"]):
            for split in ("train", "val"):
                arrays, shard_ids, starts, lengths = [], [], [], []
                for k, shard in enumerate(entry[split]["shards"]):
                    arrays.append(np.load(self.root / shard["tokens"], mmap_mode="r"))
                    off = np.load(self.root / shard["offsets"])
                    shard_ids.append(np.full(len(off) - 1, k, dtype=np.int32))
                    starts.append(off[:-1])
                    lengths.append(np.diff(off))
                self._index[split, s] = (
                    arrays, _cat(shard_ids, np.int32), _cat(starts, np.int64), _cat(lengths, np.int64)
                )  # fmt: skip

    def num_docs(self, source: int, split: str = "train") -> int:
        return len(self._index[split, source][3])

    def lengths(self, source: int, split: str = "train") -> np.ndarray:
        """Token count (BOS included) of every document of `source` in `split`."""
        return self._index[split, source][3]

    def tokens(self, source: int, index: int, split: str = "train") -> np.ndarray:
        """Document `index` of `source` (a read-only view into the memory map, BOS first)."""
        arrays, shard_ids, starts, lengths = self._index[split, source]
        start = starts[index]
        return arrays[shard_ids[index]][start : start + lengths[index]]


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _to_batch(rows_BR: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(rows_BR)
    inputs_BT = rows[:, :-1].contiguous()
    targets_BT = rows[:, 1:].contiguous()
    device = torch.device(device)
    if device.type == "cuda":
        inputs_BT, targets_BT = inputs_BT.pin_memory(), targets_BT.pin_memory()
        return inputs_BT.to(device, non_blocking=True), targets_BT.to(device, non_blocking=True)
    return inputs_BT.to(device), targets_BT.to(device)


def _open(data: ShardDataset | str | Path) -> ShardDataset:
    return data if isinstance(data, ShardDataset) else ShardDataset(data)


class PackedLoader:
    """Infinite iterator of `(inputs_BT, targets_BT)` int64 tensors from the training split.

    `weights` overrides the manifest's mixture weights by source name. `stats()` reports packing quality.
    """

    def __init__(
        self,
        data: ShardDataset | str | Path,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        buffer_size: int = 1000,
        weights: dict[str, float] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if batch_size < 1 or seq_len < 1 or buffer_size < 1:
            raise ValueError("batch_size, seq_len and buffer_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.data = _open(data)
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed, self.buffer_size, self.device = seed, buffer_size, device
        unknown = set(weights or {}) - set(self.data.names)
        if unknown:
            raise ValueError(f"weights for unknown sources {sorted(unknown)}; sources are {self.data.names}")
        w = [float((weights or {}).get(n, self.data.weights[i])) for i, n in enumerate(self.data.names)]
        # Sources without training documents (e.g. split="val") are simply not sampled.
        self.sources = [i for i in range(len(w)) if w[i] > 0 and self.data.num_docs(i) > 0]
        if not self.sources:
            raise ValueError("no source has both a positive weight and training documents")
        for i in self.sources:
            if self.data.num_docs(i) < world_size:
                raise ValueError(
                    f"source {self.data.names[i]!r} has {self.data.num_docs(i)} training documents, fewer than "
                    f"world_size={world_size}: some ranks would get none"
                )
        self.weights = np.array([w[i] for i in self.sources], dtype=np.float64)
        n = len(self.sources)
        self._epoch = np.zeros(n, dtype=np.int64)
        self._cursor = np.zeros(n, dtype=np.int64)
        self._drawn = np.zeros(n, dtype=np.int64)
        self._perm: list[tuple[int, np.ndarray] | None] = [None] * n
        self._lengths = [self.data.lengths(i) for i in self.sources]
        self._stats = {"rows": 0, "documents": 0, "tokens": 0, "cropped_tokens": 0, "source_tokens": [0] * n}
        self._buf_src = np.zeros(buffer_size, dtype=np.int64)  # index into self.sources
        self._buf_doc = np.zeros(buffer_size, dtype=np.int64)
        self._buf_len = np.zeros(buffer_size, dtype=np.int64)
        for slot in range(buffer_size):
            self._refill(slot)

    # -- document stream ----------------------------------------------------------------------------------

    def _rank_slice(self, j: int) -> np.ndarray:
        cached = self._perm[j]
        if cached is None or cached[0] != self._epoch[j]:
            n_docs = len(self._lengths[j])
            rng = np.random.default_rng([self.seed, self.sources[j], int(self._epoch[j])])
            cached = (int(self._epoch[j]), rng.permutation(n_docs)[self.rank :: self.world_size])
            self._perm[j] = cached
        return cached[1]

    def _next_doc(self) -> tuple[int, int]:
        j = int(np.argmin(self._drawn / self.weights))
        order = self._rank_slice(j)
        doc = int(order[self._cursor[j]])
        self._cursor[j] += 1
        if self._cursor[j] == len(order):
            self._epoch[j] += 1
            self._cursor[j] = 0
        self._drawn[j] += self._lengths[j][doc]
        return j, doc

    def _refill(self, slot: int) -> None:
        j, doc = self._next_doc()
        self._buf_src[slot], self._buf_doc[slot], self._buf_len[slot] = j, doc, self._lengths[j][doc]

    # -- packing ------------------------------------------------------------------------------------------

    def _fill_row(self, row: np.ndarray | None) -> None:
        """Pack the next row into `row`; with `row=None` only advance the stream (rows other ranks read)."""
        pos, cap = 0, self.seq_len + 1
        while pos < cap:
            remaining = cap - pos
            fitting = np.where(self._buf_len <= remaining, self._buf_len, -1)
            slot = int(fitting.argmax())
            if fitting[slot] < 0:
                slot = int(self._buf_len.argmin())
                take = remaining
            else:
                take = int(fitting[slot])
            j, doc, length = int(self._buf_src[slot]), int(self._buf_doc[slot]), int(self._buf_len[slot])
            if row is not None:
                row[pos : pos + take] = self.data.tokens(self.sources[j], doc)[:take]
            self._stats["documents"] += 1
            self._stats["tokens"] += take
            self._stats["cropped_tokens"] += length - take
            self._stats["source_tokens"][j] += take
            self._refill(slot)
            pos += take
        self._stats["rows"] += 1

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def next_batch(self, rows: slice | None = None, n_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of `batch_size` rows (`n_rows` if given: midtraining fills the rest with chat rows), or
        only its `rows` (a data-parallel rank's share of a global batch): the stream advances by the whole batch
        either way, but only the kept rows are copied."""
        n = self.batch_size if n_rows is None else n_rows
        keep = range(n)[rows] if rows is not None else range(n)
        if keep.step != 1:
            raise ValueError(f"rows must be a contiguous slice, got {rows}")
        rows_BR = np.empty((len(keep), self.seq_len + 1), dtype=np.int64)
        for b in range(n):
            self._fill_row(rows_BR[b - keep.start] if b in keep else None)
        return _to_batch(rows_BR, self.device)

    def stats(self) -> dict[str, Any]:
        """Packing statistics since the start of training (carried through state dicts).

        utilization: fraction of row slots holding real tokens (1.0 by construction); cropped_fraction:
        fraction of the tokens of used documents that were cropped away; source_share: share of emitted
        tokens per source name; epochs: completed epochs per source on this rank.
        """
        s = self._stats
        used = s["tokens"] + s["cropped_tokens"]
        return {
            "rows": s["rows"],
            "documents": s["documents"],
            "tokens": s["tokens"],
            "cropped_tokens": s["cropped_tokens"],
            "utilization": 1.0 if s["rows"] else 0.0,
            "cropped_fraction": s["cropped_tokens"] / used if used else 0.0,
            "source_share": {
                self.data.names[i]: (s["source_tokens"][j] / s["tokens"] if s["tokens"] else 0.0)
                for j, i in enumerate(self.sources)
            },
            "epochs": {self.data.names[i]: int(self._epoch[j]) for j, i in enumerate(self.sources)},
        }

    # -- checkpointing ------------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {
            "build_key": self.data.build_key,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "buffer_size": self.buffer_size,
            "sources": [self.data.names[i] for i in self.sources],
            "weights": self.weights.tolist(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Small, JSON-able state (counters and buffer document ids); see the module docstring."""
        return {
            "format": STATE_FORMAT,
            **self._identity(),
            "epoch": self._epoch.tolist(),
            "cursor": self._cursor.tolist(),
            "drawn": self._drawn.tolist(),
            "buffer_src": self._buf_src.tolist(),
            "buffer_doc": self._buf_doc.tolist(),
            "stats": {**self._stats, "source_tokens": list(self._stats["source_tokens"])},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an {STATE_FORMAT} state (format={state.get('format')!r})")
        mine = self._identity()
        diff = [k for k in mine if state.get(k) != mine[k]]
        if diff:
            detail = ", ".join(f"{k}: saved {state.get(k)!r} vs now {mine[k]!r}" for k in diff)
            raise ValueError(f"loader state does not match this loader, exact resume impossible ({detail})")
        self._epoch = np.array(state["epoch"], dtype=np.int64)
        self._cursor = np.array(state["cursor"], dtype=np.int64)
        self._drawn = np.array(state["drawn"], dtype=np.int64)
        self._perm = [None] * len(self.sources)
        self._buf_src = np.array(state["buffer_src"], dtype=np.int64)
        self._buf_doc = np.array(state["buffer_doc"], dtype=np.int64)
        self._buf_len = np.array([self._lengths[j][d] for j, d in zip(self._buf_src, self._buf_doc, strict=True)],
                                 dtype=np.int64)  # fmt: skip
        st = state["stats"]
        self._stats = {**st, "source_tokens": list(st["source_tokens"])}


# ---------------------------------------------------------------------------------------------------------
# Validation


def _plan_rows(lengths: np.ndarray, cap: int, buffer_size: int) -> list[list[tuple[int, int]]]:
    """Best-fit packing of documents given by `lengths`, in stream order, into rows of `cap` tokens.

    Unlike training, a row is closed (and later padded) when no buffered document fits, so every token
    of a document shorter than a row is evaluated exactly once; only documents longer than a whole row
    are cropped. Returns per row a list of (document position, tokens taken).
    """
    rows: list[list[tuple[int, int]]] = []
    buf = np.zeros(0, dtype=np.int64)  # document positions, kept in stream order so ties go to the oldest
    nxt, n = 0, len(lengths)
    row: list[tuple[int, int]] = []
    pos = 0
    while True:
        if len(buf) < buffer_size and nxt < n:
            top = min(n, nxt + buffer_size - len(buf))
            buf = np.concatenate([buf, np.arange(nxt, top)])
            nxt = top
        if not len(buf):
            break
        buf_len = lengths[buf]
        fitting = np.where(buf_len <= cap - pos, buf_len, -1)
        k = int(fitting.argmax())
        if fitting[k] >= 0:
            row.append((int(buf[k]), int(buf_len[k])))
            pos += int(buf_len[k])
            buf = np.delete(buf, k)
        elif pos == 0:  # longer than a whole row: crop the shortest such document
            k = int(buf_len.argmin())
            row.append((int(buf[k]), cap))
            pos = cap
            buf = np.delete(buf, k)
        else:
            pos = cap  # close the row; the rest is padding
        if pos == cap:
            rows.append(row)
            row, pos = [], 0
    if row:
        rows.append(row)
    return rows


def validation_batches(
    data: ShardDataset | str | Path,
    batch_size: int,
    seq_len: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    sources: Sequence[str] | None = None,
    buffer_size: int = 1000,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One deterministic pass over the validation split as `(inputs_BT, targets_BT)` batches.

    Documents of the chosen `sources` (default: all) are taken in manifest order; rank r gets documents
    r, r + world_size, ... and packs them best-fit without cropping (see `_plan_rows`); padding has input
    BOS and target -100. Every rank yields the same number of batches (padding with empty rows), so
    data-parallel evaluation loops cannot deadlock on a collective. Average the loss over targets != -100.
    """
    ds = _open(data)
    names = list(sources) if sources is not None else ds.names
    unknown = set(names) - set(ds.names)
    if unknown:
        raise ValueError(f"unknown sources {sorted(unknown)}; sources are {ds.names}")
    docs = [(i, d) for i, n in enumerate(ds.names) if n in names for d in range(ds.num_docs(i, "val"))]
    if not docs:
        raise ValueError(f"no validation documents in sources {names}")
    lengths = np.array([ds.lengths(i, "val")[d] for i, d in docs], dtype=np.int64)
    cap = seq_len + 1
    plans = [_plan_rows(lengths[r::world_size], cap, buffer_size) for r in range(world_size)]
    n_batches = max(-(-len(p) // batch_size) for p in plans)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    mine = docs[rank::world_size]
    plan = plans[rank]
    for b in range(n_batches):
        rows_BR = np.full((batch_size, cap), -1, dtype=np.int64)
        for r, pieces in enumerate(plan[b * batch_size : (b + 1) * batch_size]):
            pos = 0
            for k, take in pieces:
                i, d = mine[k]
                rows_BR[r, pos : pos + take] = ds.tokens(i, d, "val")[:take]
                pos += take
        inputs_BT, targets_BT = _to_batch(rows_BR, "cpu")
        inputs_BT[inputs_BT < 0] = ds.bos_id
        targets_BT[targets_BT < 0] = IGNORE_INDEX
        yield inputs_BT.to(device), targets_BT.to(device)
