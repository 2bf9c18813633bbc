"""The copy curriculum: repeated random-token rows in pretraining's batches, their ids drawn from an alphabet that
widens on a schedule (`data.copy_schedule`).

    loader = CopyCurriculumLoader(packed_loader, parse_copy_schedule(
        [{"until": 80, "share": 1.0, "ids": 256, "span": 32}, {"until": 360, "share": 0.5, "span": 32}]), ...)

Why. No speedrun model copies a string from its context (no induction heads), so SFT cannot teach a tool call
that names an unseen person (docs/experiments.md, "Name copying: the model has no copy circuit"). Pure repeated
random-token rows (`openk2.data.repeat_rows`) over all 1,523 ordinary ids never form induction heads in the
speedrun's 360 MuonClip steps; rows whose ids come from a 256-token alphabet form them by step ~80, and switching to
all ids after that copies every id by step ~320 (docs/experiments.md, "Induction heads in the nano model"). This
module puts that curriculum into the pretraining stream, next to the world corpus.

Schedule. A list of phases `{until = STEP, share = S, ids = N}` with increasing `until`: the steps before the first
`until` (0-based, exclusive) are phase 0, those before the second phase 1, ...; in a phase, `share` of each global
batch's rows are repeat rows whose random ids lie in `[0, ids)` (`ids = 0`: every ordinary token, i.e. up to the
first special id; 256 = the byte tokens of the byte-level BPE), the other rows are the pretraining stream's, which
simply advances less (equal tokens per step). Steps from the last `until` on have no repeat rows. The row counts
per step are midtraining's exact rounding (`openk2.train.midtrain.chat_rows_at`, counted from the phase's first
step), the repeat rows are the last rows before any midtraining chat rows (midtraining wraps this loader and takes
the last rows of the batch; the two together may not need more rows than the batch has: the repeat rows are then
cut).

A row is `openk2.data.repeat_rows.repeat_row` (`span = 0`): bos, `seq_len / 2` random ids, the same ids again,
loss on the repeat only; or, with `span = N`, a `span_row`: segments `[r, gap, r]` of random lengths <= N, loss on
each repeat. Measured: fixed-offset rows teach a head that copies from exactly `seq_len / 2` back, a positional
shortcut that copies nothing at other distances; only varied offsets reward induction (docs/experiments.md, "The
copy curriculum in pretraining"). A row's ids are a pure function of (seed, step, row), so resuming needs only the
number of batches drawn and data-parallel ranks draw the rows they keep and no others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from openk2.data.loader import STATE_FORMAT as PACKED_STATE_FORMAT
from openk2.data.loader import PackedLoader
from openk2.data.repeat_rows import repeat_row, rows_to_batch, span_row
from openk2.train.midtrain import chat_rows_at

STATE_FORMAT = "openk2.copy_curriculum_loader/1"
_PHASE_KEYS = {"until", "share", "ids", "span"}


@dataclass(frozen=True)
class CopyPhase:
    until: int  # first step (0-based) after this phase
    share: float  # share of each batch's rows that are repeat rows
    ids: int  # random ids from [0, ids); 0 = every ordinary token
    span: int = 0  # 0: `repeat_row` (one half repeated); N: `span_row` (segments <= N, random gaps: varied offsets)


def parse_copy_schedule(entries: list[Any]) -> list[CopyPhase]:
    """`data.copy_schedule` as phases; raises ValueError naming the bad entry."""
    phases: list[CopyPhase] = []
    for i, entry in enumerate(entries):
        where = f"data.copy_schedule[{i}]"
        if not isinstance(entry, dict) or not {"until", "share"} <= set(entry) or set(entry) - _PHASE_KEYS:
            raise ValueError(f"{where} must be a table {{until = STEP, share = S, ids = N, span = L}} (ids optional, "
                             f"0 = all ordinary tokens; span optional, 0 = one half repeated), got {entry!r}")
        until, share, ids, span = entry["until"], entry["share"], entry.get("ids", 0), entry.get("span", 0)
        if isinstance(until, bool) or not isinstance(until, int) or until <= (phases[-1].until if phases else 0):
            raise ValueError(f"{where}.until must be an int step above the previous phase's (and > 0), got {until!r}")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ValueError(f"{where}.share must lie in [0, 1], got {share!r}")
        if isinstance(ids, bool) or not isinstance(ids, int) or ids < 0 or 0 < ids < 2:
            raise ValueError(f"{where}.ids must be 0 (all ordinary tokens) or an alphabet size >= 2, got {ids!r}")
        if isinstance(span, bool) or not isinstance(span, int) or span < 0 or span == 1:
            raise ValueError(f"{where}.span must be 0 (one half repeated) or a segment length >= 2, got {span!r}")
        phases.append(CopyPhase(until, float(share), ids, span))
    return phases


def phase_at(phases: list[CopyPhase], step: int) -> tuple[int, CopyPhase] | None:
    """The phase of `step` (0-based) and its first step, or None after the last phase."""
    start = 0
    for phase in phases:
        if step < phase.until:
            return start, phase
        start = phase.until
    return None


def copy_rows_at(phases: list[CopyPhase], step: int, batch_size: int) -> int:
    """How many of the `batch_size` rows of step `step` are repeat rows."""
    found = phase_at(phases, step)
    if found is None:
        return 0
    start, phase = found
    return chat_rows_at(step, start, phase.share, batch_size)


class CopyCurriculumLoader:
    """The pretraining loader with repeat rows on `phases`' schedule (the trainer's and midtraining's loader
    interface: `next_batch(rows, n_rows)`, `batch_size`, `seq_len`, `stats`, `state_dict`, `load_state_dict`)."""

    def __init__(self, base: PackedLoader, phases: list[CopyPhase], *, bos_id: int, first_special: int,
                 seed: int = 0) -> None:
        if base.seq_len % 2:
            raise ValueError(f"repeat rows need an even seq_len (bos + two equal halves), got {base.seq_len}")
        too_big = [p.ids for p in phases if p.ids > first_special]
        if too_big:
            raise ValueError(f"data.copy_schedule: alphabet of {too_big[0]} ids, but the tokenizer has only "
                             f"{first_special} ordinary tokens (ids = 0 means all of them)")
        self.base, self.phases, self.seed = base, phases, seed
        self.batch_size, self.seq_len = base.batch_size, base.seq_len
        self.bos_id, self.first_special = bos_id, first_special
        self.batches = 0  # global batches drawn = the step about to be trained

    def copy_rows(self, step: int) -> int:
        return copy_rows_at(self.phases, step, self.batch_size)

    def row(self, step: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Repeat row `index` (0-based among the step's repeat rows) of step `step`: ids and mask, a pure
        function of (seed, step, index)."""
        found = phase_at(self.phases, step)
        phase = found[1] if found is not None else CopyPhase(0, 0.0, 0)
        high = phase.ids or self.first_special
        rng = np.random.default_rng([self.seed, 0xC0, step, index])
        if phase.span:
            return span_row(rng, self.seq_len + 1, phase.span, 0, high, self.bos_id)
        return repeat_row(rng, self.seq_len // 2, 0, high, self.bos_id)

    def next_batch(self, rows: slice | None = None, n_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of `batch_size` rows (`n_rows` if given: midtraining fills the rest), or only its `rows`
        (a data-parallel rank's contiguous share); the pretraining stream advances by its whole share either
        way."""
        n = self.batch_size if n_rows is None else n_rows
        keep = range(n)[rows] if rows is not None else range(n)
        step = self.batches
        self.batches += 1
        k = min(self.copy_rows(step), n)
        n_base = n - k
        x_BT, y_BT = self.base.next_batch(slice(min(keep.start, n_base), min(keep.stop, n_base)), n_rows=n_base)
        kept = range(max(keep.start - n_base, 0), max(keep.stop - n_base, 0))
        if len(kept) == 0:
            return x_BT, y_BT
        cx_BT, cy_BT = rows_to_batch([self.row(step, i) for i in kept])
        return torch.cat([x_BT, cx_BT.to(x_BT.device)]), torch.cat([y_BT, cy_BT.to(y_BT.device)])

    def __iter__(self) -> CopyCurriculumLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def stats(self) -> dict[str, Any]:
        return {**self.base.stats(), "copy_rows": sum(self.copy_rows(s) for s in range(self.batches))}

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "base": self.base.state_dict(), "batches": self.batches,
                "phases": [asdict(p) for p in self.phases], "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") == PACKED_STATE_FORMAT:  # a checkpoint written without the curriculum
            self.base.load_state_dict(state)
            self.batches = int(state["stats"]["rows"]) // self.batch_size
            return
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an {STATE_FORMAT} state (format={state.get('format')!r})")
        if state.get("phases") != [asdict(p) for p in self.phases] or state.get("seed") != self.seed:
            raise ValueError("copy curriculum schedule changed (data.copy_schedule or train.seed): exact resume "
                             "impossible")
        self.base.load_state_dict(state["base"])
        self.batches = int(state["batches"])


__all__ = ["CopyCurriculumLoader", "CopyPhase", "copy_rows_at", "parse_copy_schedule", "phase_at"]
