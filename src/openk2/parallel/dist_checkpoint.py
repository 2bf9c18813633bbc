"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP), loadable under any other layout.

Layout independence comes from naming every tensor by what it *is*, never by where it lives:

* dense parameters under their model name, as DTensors (FSDP shards) or plain tensors (one process); DCP stores
  global shapes and reshards on load;
* routed experts per expert under their Hugging Face names (`model.layers.3.mlp.experts.17.gate_proj.weight`),
  each written by the one rank that holds it (experts are never split: EP slices the expert dim and FSDP shards
  it on that dim), so any ep / dp_shard / pp layout can read any other's experts;
* optimizer state as `optim.<name>.<state>` with the same naming (Muon momentum, AdamW moments and step);
* everything else (step, tokens, RNG, the data loaders of every data shard, the layout) as one pickled object.

A checkpoint is a directory `<run>/checkpoints/step_000000123/` holding DCP's files (`.metadata`, `*.distcp`)
and `dcp.json`; it is written under a temporary name and renamed by rank 0 after every rank finished, so a crash
never leaves a partial latest checkpoint. One process can read it without a process group (`no_dist`): resume
on one rank, or `openk2 export-hf <run> <dir>` (`load_full_model`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from openk2.parallel.expert_parallel import expert_offset
from openk2.parallel.optim import global_offset, local
from openk2.utils.io import fsync_path

MARKER = "dcp.json"
FORMAT = "openk2.dcp/1"
_EXPERTS_RE = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_STEP_DIR = re.compile(r"^step_(\d{9})$")


def is_dcp_checkpoint(path: Path) -> bool:
    return (Path(path) / MARKER).is_file() and (Path(path) / ".metadata").is_file()


def latest(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint directory under `ckpt_root` (what `save` writes into)."""
    root = Path(ckpt_root)
    dirs = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name)) if root.is_dir() else []
    return dirs[-1] if dirs else None


def _module_of(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0])


def _split_experts(name: str, model: nn.Module, param: Tensor, value: Tensor) -> Iterator[tuple[str, Tensor]]:
    """Per-expert (HF name, [.., ..] view) pairs of `value`, a tensor laid out like `param`'s local shard."""
    m = _EXPERTS_RE.match(name)
    assert m is not None
    prefix, proj = m.groups()
    first = expert_offset(_module_of(model, name)) + global_offset(param)[0]
    v = local(value)
    for i in range(v.shape[0]):
        yield f"{prefix}.{first + i}.{proj}.weight", v[i]


def _as_param_layout(param: Tensor, value: Tensor) -> Tensor:
    """A local state tensor shaped like `param`'s shard, as a DTensor with `param`'s sharding (or plain)."""
    if isinstance(param, DTensor) and not isinstance(value, DTensor):
        return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                                  stride=param.stride())
    return value


def model_entries(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors under layout-independent names (views/aliases: DCP loads into them in place)."""
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if _EXPERTS_RE.match(name):
            out.update(_split_experts(name, model, p, p))
        else:
            out[name] = p
    persistent = {n for n, _ in model.named_buffers() if _is_persistent(model, n)}
    for name, b in model.named_buffers():
        if name in persistent:
            out[name] = b
    return out


def _is_persistent(model: nn.Module, name: str) -> bool:
    mod = _module_of(model, name) if "." in name else model
    return name.rsplit(".", 1)[-1] not in mod._non_persistent_buffers_set


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create every parameter's state (zeros) so that a checkpoint can be loaded into it."""
    from openk2.parallel.optim import DistributedMuonClip

    fused = None
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            kind = group.get("kind", "adamw")
            if kind == "muon":
                ref = local(p) if isinstance(optimizer, DistributedMuonClip) else p
                state["momentum_buffer"] = torch.zeros_like(ref)
                continue
            fused = bool(group.get("fused"))
            ref = local(p) if isinstance(optimizer, DistributedMuonClip) else p
            state["step"] = (torch.zeros((), dtype=torch.float32, device=local(p).device) if fused
                             else torch.tensor(0.0, dtype=torch.float32))
            state["exp_avg"] = torch.zeros_like(ref)
            state["exp_avg_sq"] = torch.zeros_like(ref)


def optimizer_entries(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Optimizer state tensors under `optim.<name>.<key>` (experts split per expert like the weights)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            for key, value in optimizer.state[p].items():
                if not isinstance(value, Tensor):
                    continue
                if value.ndim == 0:  # AdamW's step: replicated
                    out[f"optim.{name}.{key}"] = value
                elif _EXPERTS_RE.match(name):
                    for ename, v in _split_experts(name, model, p, value):
                        out[f"optim.{ename}.{key}"] = v
                else:
                    out[f"optim.{name}.{key}"] = _as_param_layout(p, value)
    return out


def optimizer_extra(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    extra: dict[str, Any] = {"lrs": [g["lr"] for g in optimizer.param_groups]}
    for attr in ("steps", "skipped_steps"):
        if hasattr(optimizer, attr):
            extra[attr] = getattr(optimizer, attr)
    return extra


@contextlib.contextmanager
def _quiet_single_process(distributed: bool) -> Iterator[None]:
    """DCP warns that it "assumes" a single process whenever no process group exists; one process is a layout
    like any other here, so that warning is noise."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        yield


def _gather_objects(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def save(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Collective: every rank calls it. Writes `ckpt_root/step_{step:09d}` and keeps the newest `keep_last`."""
    ckpt_root = Path(ckpt_root)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    final = ckpt_root / f"step_{step:09d}"
    tmp = ckpt_root / f".tmp_step_{step:09d}_dcp"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if distributed:
        dist.barrier()
    state: dict[str, Any] = dict(model_entries(model))
    if optimizer is not None:
        state.update(optimizer_entries(model, optimizer))
        extra = {**extra, "optimizer": optimizer_extra(optimizer)}
    state["extra"] = pickle.dumps(extra)  # one opaque object (DCP would flatten a dict into keys)
    try:
        with _quiet_single_process(distributed):
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not distributed)
    except BaseException as e:
        if rank == 0:  # e.g. a full disk: the previous checkpoint stays the latest, no debris
            shutil.rmtree(tmp, ignore_errors=True)
        # DCP wraps each rank's error as (exception, traceback); re-raise the cause, e.g. "OSError: No space left
        # on device", not the wrapper.
        failures = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
        if failures and isinstance(failures[0], BaseException):
            raise failures[0] from e
        raise
    if distributed:
        dist.barrier()
    if rank == 0:
        (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "step": step}) + "\n")
        fsync_path(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(ckpt_root)
        dirs = sorted(p for p in ckpt_root.iterdir() if _STEP_DIR.match(p.name))
        for old in dirs[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_root.glob(".tmp_step_*"):  # leftovers of killed writers
            shutil.rmtree(stale, ignore_errors=True)
    if distributed:
        dist.barrier()
    return final


def load(ckpt_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Collective: load a checkpoint written under any layout into this rank's `model` (and `optimizer`) in place.
    Returns the `extra` object saved with it (step, tokens, loaders, ...)."""
    ckpt_dir = Path(ckpt_dir)
    if not is_dcp_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: not an openk2 DCP checkpoint (no {MARKER} / .metadata)")
    state: dict[str, Any] = dict(model_entries(model))
    if optimizer is not None:
        init_optimizer_state(optimizer)
        state.update(optimizer_entries(model, optimizer))
    state["extra"] = b""
    distributed = dist.is_available() and dist.is_initialized()
    with _quiet_single_process(distributed):
        dcp.load(state, checkpoint_id=str(ckpt_dir), no_dist=not distributed)
    extra = pickle.loads(state["extra"])
    if optimizer is not None:
        info = extra.get("optimizer", {})
        for group, lr in zip(optimizer.param_groups, info.get("lrs", []), strict=False):
            group["lr"] = lr
        for attr in ("steps", "skipped_steps"):
            if attr in info and hasattr(optimizer, attr):
                setattr(optimizer, attr, info[attr])
    return extra


def read_extra(ckpt_dir: Path) -> dict[str, Any]:
    """The `extra` object of a checkpoint, read by one process (no model needed)."""
    state: dict[str, Any] = {"extra": b""}
    with _quiet_single_process(False):
        dcp.load(state, checkpoint_id=str(ckpt_dir), no_dist=True)
    return pickle.loads(state["extra"])


def load_full_model(ckpt_dir: Path, device: str | torch.device = "cpu"):
    """The whole model of a DCP checkpoint in one process (eval mode): for export and serving."""
    from openk2.model import ModelConfig, build_model

    extra = read_extra(ckpt_dir)
    model = build_model(ModelConfig.from_hf_dict(extra["model_config"]), device=device)
    state = model_entries(model)
    with _quiet_single_process(False):
        dcp.load(state, checkpoint_id=str(ckpt_dir), no_dist=True)
    return model.eval()


@torch.no_grad()
def full_state_dict(model: nn.Module, dims) -> dict[str, Tensor]:
    """Collective: the full model state dict (K2Model names, 3-D experts) on every rank, gathered from shards,
    expert groups and pipeline stages. Meant for tests and small models (everything is materialized)."""
    out: dict[str, Tensor] = {}
    params = dict(model.named_parameters())
    for name, t in list(params.items()) + list(model.named_buffers()):
        if name not in params and not _is_persistent(model, name):
            continue
        full = t.full_tensor() if isinstance(t, DTensor) else t.detach()
        if _EXPERTS_RE.match(name) and dims.layout.ep > 1:
            parts = [torch.empty_like(full) for _ in range(dims.layout.ep)]
            dist.all_gather(parts, full.contiguous(), group=dims.ep_group)
            full = torch.cat(parts)
        out[name] = full.detach().cpu().clone()
    if dims.layout.pp > 1:
        merged: dict[str, Tensor] = {}
        for part in _gather_objects(out, dims.pp_group):
            merged.update(part)
        out = merged
    return out


__all__ = ["full_state_dict", "init_optimizer_state", "is_dcp_checkpoint", "latest", "load", "load_full_model",
           "model_entries", "optimizer_entries", "read_extra", "save"]
