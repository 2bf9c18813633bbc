"""Weight sync from the trainer to the rollout engine (rl-design §6.2 `WeightSync`).

    InProcessSync(engine_or_module)     colocated, one process: copy the tensors in (no serialisation)
    BucketedSync(group, src=0)          torch.distributed: rank `src` packs tensors into fixed-size flat byte buckets
                                        and broadcasts them; every other rank rebuilds the tensors bit-exactly

Bucketed protocol, per bucket (checkpoint-engine's shape, rl-design §4.5): a header object
`{version, entries: [{name, shape, dtype, offset, nbytes, tensor_offset, tensor_nbytes}], used, last}` goes
first (`broadcast_object_list`), then the bucket itself as one uint8 tensor. `offset` is the entry's place in the
bucket; a tensor bigger than a bucket is split into pieces (`tensor_offset` is the piece's place in the tensor's
bytes) and yielded once its last piece has arrived. With `double_buffer` the sender packs bucket k+1 while bucket
k is still in flight (async broadcast), so packing overlaps the transfer; memory stays at two buckets whatever
the model size. Receivers call `receive()` (a generator) while the sender calls `send()`; both must be in the
same process group, as with any collective. If the sender fails mid-sync (a bad tensor, an exception in the
iterator it was given), it sends an error header so the receivers raise too instead of waiting forever.
gloo on CPU (tested); NCCL with `device="cuda"` on a cluster (untested: no GPU here).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

ALIGN = 16  # byte alignment of every entry in a bucket (safe for any dtype view)


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a weight-sync header")
    return dtype


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8, device=flat.device)


def load_named_tensors(target: Any, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
    """Put tensors into a rollout engine (`update_weights(named_tensors, version)`) or copy them into an
    `nn.Module`'s parameters and buffers by name; an unknown name or a shape mismatch is an error that names it."""
    if hasattr(target, "update_weights"):
        target.update_weights(named_tensors, version)
        return
    if not isinstance(target, torch.nn.Module):
        raise TypeError(f"weight-sync target must have update_weights() or be an nn.Module, not {type(target)}")
    state = dict(target.named_parameters()) | dict(target.named_buffers())
    with torch.no_grad():
        for name, tensor in named_tensors:
            if name not in state:
                raise KeyError(f"weight sync: the target has no tensor named {name!r} "
                               f"(e.g. {', '.join(list(state)[:5])})")
            if state[name].shape != tensor.shape:
                raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)}, the target's is "
                                 f"{tuple(state[name].shape)}")
            state[name].copy_(tensor)


class InProcessSync:
    """Trainer and engine in one process: `send` copies the tensors into `target` (an engine or a module);
    `receive` yields the tensors of the last `send` (references, no copy)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.version = 0
        self._last: list[tuple[str, torch.Tensor]] = []

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self._last = [(name, tensor.detach()) for name, tensor in named_tensors]
        load_named_tensors(self.target, iter(self._last), version)
        self.version = version

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self._last


class BucketedSync:
    """Broadcast named tensors from rank `src` in fixed-size byte buckets (see the module docstring).

    `target` (receivers only, optional): `receive_into()` loads what arrives into it via `load_named_tensors`."""

    def __init__(self, group: Any = None, src: int = 0, bucket_bytes: int = 64 << 20, double_buffer: bool = True,
                 device: str | torch.device = "cpu", target: Any = None) -> None:
        if bucket_bytes < ALIGN:
            raise ValueError(f"bucket_bytes must be at least {ALIGN}, got {bucket_bytes}")
        self.group, self.src, self.bucket_bytes = group, src, bucket_bytes - bucket_bytes % ALIGN
        self.double_buffer, self.device, self.target = double_buffer, torch.device(device), target
        self.version = 0
        self.stats: dict[str, float] = {}

    # --- sender ----------------------------------------------------------------------------------------------

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        import torch.distributed as dist

        if dist.get_rank(self.group) != self.src:
            raise RuntimeError(f"send() runs on the source rank {self.src}; call receive() on the others")
        n_buffers = 2 if self.double_buffer else 1
        buffers = [torch.empty(self.bucket_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_buffers)]
        pending: list[Any] = [None] * n_buffers
        which, used, entries, n_buckets, n_bytes = 0, 0, [], 0, 0

        def flush(last: bool) -> None:
            nonlocal which, used, entries, n_buckets
            header = [{"version": version, "entries": entries, "used": used, "last": last}]
            dist.broadcast_object_list(header, src=self.src, group=self.group)
            work = dist.broadcast(buffers[which][:max(used, 1)], src=self.src, group=self.group,
                                  async_op=self.double_buffer)
            pending[which] = work
            n_buckets += 1
            which = (which + 1) % n_buffers
            if pending[which] is not None:  # the buffer we pack next must have left
                pending[which].wait()
                pending[which] = None
            used, entries = 0, []

        try:
            for name, tensor in named_tensors:
                data = _as_bytes(tensor.to(self.device))
                total, done = data.numel(), 0
                n_bytes += total
                while True:
                    room = self.bucket_bytes - used
                    if room <= 0:
                        flush(last=False)
                        continue
                    piece = min(room, total - done)
                    buffers[which][used:used + piece].copy_(data[done:done + piece])
                    entries.append({"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype),
                                    "offset": used, "nbytes": piece, "tensor_offset": done, "tensor_nbytes": total})
                    used += -(-piece // ALIGN) * ALIGN
                    done += piece
                    if done >= total:
                        break
        except Exception as exc:
            # Tell the receivers, or they would wait for the next bucket forever.
            for work in pending:
                if work is not None:
                    work.wait()
            header = [{"version": version, "entries": [], "used": 0, "last": True,
                       "error": f"{type(exc).__name__}: {exc}"}]
            dist.broadcast_object_list(header, src=self.src, group=self.group)
            raise
        flush(last=True)
        for work in pending:
            if work is not None:
                work.wait()
        self.version = version
        self.stats = {"buckets": n_buckets, "bytes": n_bytes}

    # --- receivers -------------------------------------------------------------------------------------------

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in the sender's order, each as soon as its last byte has arrived. Consume the
        generator fully: the collectives of the next bucket are only issued when it is advanced."""
        import torch.distributed as dist

        if dist.get_rank(self.group) == self.src:
            raise RuntimeError("receive() runs on the receiving ranks; the source rank calls send()")
        bucket = torch.empty(self.bucket_bytes, dtype=torch.uint8, device=self.device)
        partial: dict[str, torch.Tensor] = {}
        received: dict[str, int] = {}
        while True:
            header: list[Any] = [None]
            dist.broadcast_object_list(header, src=self.src, group=self.group)
            meta = header[0]
            if meta.get("error"):
                raise RuntimeError(f"weight sync {meta['version']} failed on the sender: {meta['error']}")
            view = bucket[:max(meta["used"], 1)]
            dist.broadcast(view, src=self.src, group=self.group)
            for entry in meta["entries"]:
                name, total = entry["name"], entry["tensor_nbytes"]
                if name not in partial:
                    partial[name] = torch.empty(total, dtype=torch.uint8, device=self.device)
                    received[name] = 0
                start = entry["tensor_offset"]
                partial[name][start:start + entry["nbytes"]].copy_(view[entry["offset"]:entry["offset"]
                                                                        + entry["nbytes"]])
                received[name] += entry["nbytes"]
                if received[name] >= total:
                    data = partial.pop(name)
                    del received[name]
                    dtype = _dtype_from_name(entry["dtype"])
                    tensor = data.view(dtype) if total else torch.empty(0, dtype=dtype, device=self.device)
                    yield name, tensor.reshape(entry["shape"])
            self.version = meta["version"]
            if meta["last"]:
                if partial:
                    raise RuntimeError(f"weight sync ended with incomplete tensors: {', '.join(partial)}")
                return

    def receive_into(self, target: Any = None) -> int:
        """Receive a whole sync into `target` (or the one given at construction); returns the new version."""
        target = target if target is not None else self.target
        if target is None:
            raise ValueError("receive_into needs a target (an engine with update_weights or an nn.Module)")
        tensors = list(self.receive())  # the version is known once the stream ends
        load_named_tensors(target, tensors, self.version)
        return self.version


__all__ = ["ALIGN", "BucketedSync", "InProcessSync", "load_named_tensors"]
