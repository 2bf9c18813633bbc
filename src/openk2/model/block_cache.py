"""Large CPU blocks reused across training steps: a caching allocator for the training forward and backward.

Why: a CPU training step allocates its activations in the forward and frees them in the backward, and the C library
(glibc's malloc) gives memory it gets back above its thresholds to the kernel: the top of its heap beyond 2x the
mmap threshold, and every block above that threshold outright. The next step's forward then touches fresh pages,
each a page fault and a zeroed 4 KiB: on bench config A, 16k-22k faults and ~47 ms of system time in a ~450 ms step
(docs/benchmarks.md, "A caching allocator for training steps"). torch keeps freed blocks for reuse on CUDA (its caching
allocator) but not on CPU. Process-wide malloc settings (`GLIBC_TUNABLES`, `mallopt`) would change every library in
the process; this cache changes only the allocations of openk2's own training steps.

What: the kernel library (`few_rows`, `csrc/block_cache.cpp`) puts an allocator in front of torch's CPU allocator,
once, the first time a training forward runs on CPU. It passes every allocation through unchanged, except blocks of
at least 64 KiB requested by a thread inside a training forward of `K2Model` (CPU, gradients on) or inside the
backward of one (from the loss's or the logits' gradient to the embeddings' output). Those come from, and return to,
per-size-class lists of freed blocks. A block freed and not taken again by the next step is released when the step
after begins, and at most `MAX_CACHED_BYTES` stay cached (the oldest go first); `release()` frees them all. Values
are unchanged: only where the memory comes from differs. On bench configs A and B, each setting in its own process
(`bench/train_switch.py OPENK2_BLOCK_CACHE`): 13-821 faults and 2-5 ms of system time a step instead of 16k-22k and
47-53 ms, the step 2-7% faster, beyond the VM's noise in 5 of 6 pairs.

`OPENK2_BLOCK_CACHE=0` in the environment turns it off; a CPU without AVX2/FMA (the library's requirement) or a
failed library build leaves torch's allocator alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from openk2.model import few_rows
from openk2.model.switches import env_switch


def _quarter_of_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name: assume 16 GiB
        return 4 << 30


#: At most this many freed bytes stay cached: a quarter of the machine's memory, at most 8 GiB. A step that frees more
#: hands the rest back to the C library (oldest first).
MAX_CACHED_BYTES = min(8 << 30, _quarter_of_memory())

_state: dict[str, bool] = {}


def enabled_by_env() -> bool:
    return env_switch("OPENK2_BLOCK_CACHE")


def available() -> bool:
    """Switched on, the kernel library loaded, and the cache in front of torch's CPU allocator (installed on the first
    call; it stays unavailable if another allocator with a higher priority is registered)."""
    if "available" not in _state:
        ok = enabled_by_env() and few_rows.library_loaded()
        _state["available"] = ok and bool(torch.ops.openk2_kernels.block_cache_install(MAX_CACHED_BYTES))
    return _state["available"]


def applies(device: torch.device) -> bool:
    """Whether a forward on `device` is a training forward the cache serves: CPU, gradients on, not being traced."""
    return (device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and available())


@contextlib.contextmanager
def training_forward() -> Iterator[None]:
    """The calling thread's large allocations come from the cache within the block (`applies` checked by the
    caller). Outside any backward, entering begins a step: blocks left unused since the previous one are released."""
    ops = torch.ops.openk2_kernels
    ops.block_cache_enter_forward(torch._C._current_graph_task_id() != -1)
    try:
        yield
    finally:
        ops.block_cache_exit_forward()


def _open_backward(grad: torch.Tensor) -> None:
    torch.ops.openk2_kernels.block_cache_backward(True)


def _close_backward(grad: torch.Tensor) -> None:
    torch.ops.openk2_kernels.block_cache_backward(False)


def begin_backward_at(*outputs: torch.Tensor | None) -> None:
    """The backward from `outputs` (the loss, the logits) allocates from the cache: a gradient hook on each turns it on
    for the thread running the backward (CPU backward runs on the calling thread)."""
    for out in outputs:
        if out is not None and out.requires_grad:
            out.register_hook(_open_backward)


def end_backward_at(first_activation: torch.Tensor) -> None:
    """... until the backward reaches `first_activation` (the embeddings' output). A backward that never reaches it
    (frozen embeddings, a partial `torch.autograd.grad`) ends at the next training forward instead."""
    if first_activation.requires_grad:
        first_activation.register_hook(_close_backward)


@dataclass(frozen=True)
class Stats:
    hits: int  # allocations served from freed blocks
    misses: int  # allocations that took new memory
    cached_bytes: int  # freed bytes held now
    live_blocks: int  # blocks handed out and not yet freed
    max_cached_bytes: int


def stats() -> Stats | None:
    """The cache's counters since the process began; None where it is unavailable."""
    if not available():
        return None
    return Stats(*torch.ops.openk2_kernels.block_cache_stats())


def release() -> None:
    """Free every cached block (blocks in use return to the cache when freed, as before)."""
    if available():
        torch.ops.openk2_kernels.block_cache_release()


def active() -> bool:
    """Whether the calling thread allocates from the cache now."""
    return available() and bool(torch.ops.openk2_kernels.block_cache_active())
