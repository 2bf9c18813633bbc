"""A model's CPU weights on transparent huge pages (2 MiB), for decode.

Why: a decode step streams every active weight from memory once per token, and on 4 KiB pages each 4 KiB of a
weight is a TLB miss and a page walk; the hardware prefetchers also stop at 4 KiB page boundaries. On 2 MiB pages
the same stream runs faster: config C's batch-1 decode 1.07-1.14x, batch 8 1.05-1.09x, config A at batch 8
1.05-1.07x (in-process A/Bs, 2 threads, AMD EPYC Zen 4; docs/benchmarks.md, "Weights on huge pages"). An earlier
measurement on a Zen 2 host, with all of torch's allocations on huge pages, read slower (same section): not yet
re-measured there with this change.

Linux backs memory with huge pages where `/sys/kernel/mm/transparent_hugepage/enabled` says `always`, or says
`madvise` (the common default) and the program asked for them with `madvise(MADV_HUGEPAGE)`. torch's CPU allocator
asks only when `THP_MEM_ALLOC_ENABLE=1` was set before its first allocation, so in the `madvise` case each weight
of at least `MIN_BYTES` is copied once into its own 2 MiB-aligned anonymous mapping advised for huge pages, and the
parameter takes that memory (`param.data`): the same Parameter objects, so optimizers and in-place updates (RL)
keep working on them, and tied parameters stay tied. Under `always` and `never`, and off Linux, nothing is copied.
`OPENK2_HUGE_PAGES=0` in the environment turns it off.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path

import torch
from torch import nn

from openk2.model.switches import env_switch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
#: Weights from this size move. A mapping is rounded up to whole huge pages, so a 1 MiB weight takes 2 MiB: that
#: waste is bounded by the small weights, and a token of config C reads ~5 MiB of 1-2 MiB attention weights per layer.
MIN_BYTES = 1 << 20
_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent huge page mode: "always", "madvise", "never", or "unavailable" (not Linux)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "unavailable"
    try:
        text = _THP_ENABLED.read_text()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unavailable"


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` at the start of a 2 MiB-aligned anonymous mapping advised for huge pages. The mapping
    lives as long as the returned tensor (torch keeps the buffer object alive), whose storage is exactly its own
    bytes (`torch.save` writes no padding)."""
    nbytes = t.numel() * t.element_size()
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # one page spare to align the start
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    start = -torch.frombuffer(area, dtype=torch.uint8).data_ptr() % HUGE_PAGE
    out = torch.frombuffer(memoryview(area)[start:start + nbytes], dtype=t.dtype).view(t.shape)
    out.copy_(t)  # the first touch: the kernel backs the advised range with huge pages now
    return out


def _movable(p: torch.Tensor, min_bytes: int) -> bool:
    """A plain CPU tensor that owns its whole storage (not a view into a larger one, whose other users would keep
    the old memory), large enough to move."""
    nbytes = p.numel() * p.element_size()
    return (type(p.detach()) is torch.Tensor and p.device.type == "cpu" and nbytes >= min_bytes
            and p.is_contiguous() and p.storage_offset() == 0 and p.untyped_storage().nbytes() == nbytes)


def move_weights_to_huge_pages(model: nn.Module, min_bytes: int | None = None) -> int:
    """Put `model`'s CPU parameters of at least `min_bytes` (default `MIN_BYTES`) on huge pages (see the module
    docstring); returns the bytes moved. Idempotent: a weight already moved is not copied again."""
    if not env_switch("OPENK2_HUGE_PAGES") or thp_mode() != "madvise":
        return 0
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    moved_by_ptr: dict[int, torch.Tensor] = {}
    done: set[int] = model.__dict__.setdefault("_huge_page_ptrs", set())
    total = 0
    # Normal tensors even when the caller is in inference mode (generate): the weights may be trained later (RL).
    with torch.inference_mode(False), torch.no_grad():
        for p in model.parameters():  # each Parameter once, tied ones included
            ptr = p.data_ptr()
            if ptr in done or not _movable(p, min_bytes):
                continue
            if ptr not in moved_by_ptr:  # two Parameters over one storage move together
                moved_by_ptr[ptr] = huge_page_copy(p.detach())
                total += p.numel() * p.element_size()
            p.data = moved_by_ptr[ptr]
    done.update(t.data_ptr() for t in moved_by_ptr.values())
    if total:
        log.info("moved %.1f MiB of weights onto huge pages", total / 2**20)
    return total
