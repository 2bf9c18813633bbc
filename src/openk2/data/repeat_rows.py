"""Repeated random-token rows: a row of random token ids followed by the same ids again, trained on the repeat.

    rows = repeat_rows(n=1000, half=128, vocab_size=1536, bos_id=tok.bos_id, seed=0)   # ids_T: [bos, r, r]

Why. The speedrun's world corpus names ~90 people thousands of times, so nothing in it rewards copying a string
from the context, and its nano model has no induction heads (docs/experiments.md, "Name copying: the model has no
copy circuit"). A random sequence can only be predicted the second time by finding where the current token
occurred before and copying what followed it: the purest signal for the induction circuit (Olsson et al. 2022),
with no n-gram statistics to fall back on. The loss mask covers the repeat only: the first half is unpredictable
noise whose only lesson would be a flat unigram prior over the vocabulary.

Ids are drawn uniformly from the ordinary tokens (`low` up to the first special id), so every embedding row the
model uses in text can be the one it has to copy.

Fixed or varied offsets. In a `repeat_row` every token's copy source lies exactly `half` positions back, so a head
that attends to that relative position solves it without looking at content: measured, the speedrun's model trained
on such rows copies at offset 128 (0.16 nats/token) and not at offset 40 or 64 (12.5), i.e. it learns a positional
shortcut, not induction (docs/experiments.md, "The copy curriculum in pretraining"). `span_row` packs segments of
random length with a random gap, `[r, g, r]` with `len(r)` in [2, span] and `len(g)` in [0, span], so the offset
varies from token to token and only finding the earlier occurrence by content (an induction head) predicts the
repeat.
"""

from __future__ import annotations

import numpy as np
import torch


def repeat_row(rng: np.random.Generator, half: int, low: int, high: int, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One row: ids `[bos, r_1..r_half, r_1..r_half]` (int64) and its mask (int8, 1 on the repeat's tokens)."""
    r = rng.integers(low, high, size=half, dtype=np.int64)
    ids = np.concatenate([np.array([bos_id], dtype=np.int64), r, r])
    mask = np.zeros(len(ids), dtype=np.int8)
    mask[1 + half:] = 1
    return ids, mask


def span_row(rng: np.random.Generator, length: int, span: int, low: int, high: int, bos_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """One row of `length` tokens: bos, then segments `[r, g, r]` (`len(r)` uniform in [2, span], `len(g)` in
    [0, span], random ids in [`low`, `high`)) until it is full, the last one cut; mask 1 on each second `r` but
    its first token."""
    if span < 2:
        raise ValueError(f"span must be >= 2, got {span}")
    ids, mask = [np.array([bos_id], dtype=np.int64)], [np.zeros(1, dtype=np.int8)]
    filled = 1
    while filled < length:
        n, gap = int(rng.integers(2, span + 1)), int(rng.integers(0, span + 1))
        r = rng.integers(low, high, size=n, dtype=np.int64)
        ids += [r, rng.integers(low, high, size=gap, dtype=np.int64), r]
        # the repeat's first token is unpredictable (nothing marks where a repeat starts): no loss on it
        mask += [np.zeros(n + gap + 1, dtype=np.int8), np.ones(n - 1, dtype=np.int8)]
        filled += 2 * n + gap
    return np.concatenate(ids)[:length], np.concatenate(mask)[:length]


def repeat_rows(n: int, half: int, vocab_size: int, bos_id: int, seed: int = 0, low: int = 0
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` rows of `repeat_row`, ids in [`low`, `vocab_size`) minus nothing else: pass the first special id as
    `vocab_size` to keep special tokens out. Deterministic in `seed`."""
    if half < 1 or n < 0 or not 0 <= low < vocab_size:
        raise ValueError(f"need half >= 1, n >= 0 and 0 <= low < vocab_size; got {half=}, {n=}, {low=}, {vocab_size=}")
    rng = np.random.default_rng([seed, 0x1D])
    return [repeat_row(rng, half, low, vocab_size, bos_id) for _ in range(n)]


class RepeatLoader:
    """Endless batches of fresh repeat rows in the trainer's loader interface (`next_batch(rows)` returning
    inputs_BT and targets_BT with -100 where the mask is 0). Used by `bench/induction_screen.py`."""

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, bos_id: int, seed: int = 0, low: int = 0,
                 span: int = 0) -> None:
        """`span` > 0: `span_row`s (varied offsets) instead of `repeat_row`s."""
        if seq_len % 2 and not span:
            raise ValueError(f"seq_len must be even (two halves after bos), got {seq_len}")
        self.batch_size, self.seq_len, self.span = batch_size, seq_len, span
        self.half, self.low, self.high, self.bos_id = seq_len // 2, low, vocab_size, bos_id
        self.rng = np.random.default_rng([seed, 0x1D])

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.span:
            return rows_to_batch([span_row(self.rng, self.seq_len + 1, self.span, self.low, self.high, self.bos_id)
                                  for _ in range(n)])
        rows = [repeat_row(self.rng, self.half, self.low, self.high, self.bos_id) for _ in range(n)]
        return rows_to_batch(rows)

    def next_batch(self, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x_BT, y_BT = self.batch(self.batch_size)
        return (x_BT[rows], y_BT[rows]) if rows is not None else (x_BT, y_BT)


def rows_to_batch(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ids[:-1] and targets ids[1:] (-100 where the target's mask is 0) of equal-length rows."""
    ids_BT = torch.from_numpy(np.stack([ids for ids, _ in rows]))
    mask_BT = torch.from_numpy(np.stack([m for _, m in rows])).bool()
    y_BT = ids_BT[:, 1:].clone()
    y_BT[~mask_BT[:, 1:]] = -100
    return ids_BT[:, :-1].contiguous(), y_BT


__all__ = ["RepeatLoader", "repeat_row", "repeat_rows", "rows_to_batch", "span_row"]
