"""Multi-process test harness: spawn `world` gloo ranks on 127.0.0.1 and compare with a single-process run.

Workers are module-level functions (spawn pickles them by name). Each returns a picklable result through a
`torch.multiprocessing` queue; the parent raises if any rank fails.
"""

from __future__ import annotations

import io
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from openk2.model import build_model, get_preset
from openk2.model.transformer import K2Model
from openk2.serve.testing import free_port

TINY = dict(num_hidden_layers=4, vocab_size=128)
REPO_ROOT = Path(__file__).resolve().parents[2]


def tiny_config(**overrides: Any):
    return get_preset("tiny", **{**TINY, **overrides})


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory tensors that die with this process
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report, then let the parent fail the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 240) -> list[Any]:
    """Run `fn(rank, world, *args)` on `world` gloo ranks; returns the per-rank results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue), daemon=True) for r in range(world)]
    # Spawned interpreters unpickle `fn` by module name (tests.parallel....) with the parent's sys.path.
    added = str(REPO_ROOT) not in sys.path
    if added:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        for p in procs:
            p.start()
    finally:
        if added:
            sys.path.remove(str(REPO_ROOT))
    results: dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                time.sleep(0.5)
                if queue.empty():
                    break
            time.sleep(0.05)
            continue
        rank, status, out = queue.get()
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(out), weights_only=False)
        else:
            errors.append(f"rank {rank}:\n{out}")
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    if len(results) != world:
        raise AssertionError(f"only ranks {sorted(results)} of {world} finished (exit codes "
                             f"{[p.exitcode for p in procs]})")
    return [results[r] for r in range(world)]


def batches(cfg, n_steps: int, batch: int, seq: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
        out.append((x[:, :-1].contiguous(), x[:, 1:].contiguous()))
    return out


def reference_run(cfg, steps, *, lr: float = 2e-2, grad_clip: float = 1.0, optimizer: str = "muonclip",
                  qk_clip_tau: float | None = 100.0, seed: int = 0, model_fn: Callable | None = None,
                  accum: int = 1):
    """The single-process Trainer step (openk2.train.trainer): per-step losses and the final state.

    `accum` splits each global batch into that many gradient-accumulation micro-batches (the trainer's
    `grad_accum`), matching the partial sums a layout forms (data-parallel shards, pipeline micro-batches):
    AdamW turns float reassociation of near-zero gradients into ~1e-4 weight differences even between two
    single-process runs that only split the batch differently."""

    # One intra-op thread, like every spawned rank: matmul blocking then matches, and the remaining differences
    # are the layout's own (reduction order), not the thread count's.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_run(cfg, steps, lr, grad_clip, optimizer, qk_clip_tau, seed, model_fn, accum)
    finally:
        torch.set_num_threads(threads)


def _reference_run(cfg, steps, lr, grad_clip, optimizer, qk_clip_tau, seed, model_fn, accum):
    from openk2.optim import MuonClip

    torch.manual_seed(seed)
    model: K2Model = build_model(cfg, seed=seed)
    if model_fn is not None:
        model_fn(model)
    model.train()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    else:
        opt = MuonClip(model, lr=lr, weight_decay=0.1, momentum=0.95, qk_clip_tau=qk_clip_tau)
    losses = []
    for x, y in steps:
        n = int((y != -100).sum())
        total = 0.0
        for x_mb, y_mb in zip(x.chunk(accum), y.chunk(accum), strict=True):
            loss = model(x_mb, labels=y_mb, reduction="sum", return_logits=False).loss
            (loss / n).backward()
            total += float(loss.detach())
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / n)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, state


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (elementwise relative error is meaningless for AdamW on near-zero gradients,
    whose update is ~sign(noise) x lr; the tensor-level error is the one a layout must not change)."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def assert_close_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    bad = {k: rel_err(got[k], want[k]) for k in want if want[k].is_floating_point()}
    bad = {k: e for k, e in bad.items() if not e <= rtol}
    assert not bad, f"relative errors above {rtol}: {bad}"
    for k in want:
        if not want[k].is_floating_point():
            assert torch.equal(got[k], want[k]), k
