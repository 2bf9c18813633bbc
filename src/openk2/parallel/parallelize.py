"""Device meshes and `parallelize`: the one call that turns a single-process `K2Model` into this rank's share.

    dims = ParallelDims.build(layout.resolve(world_size), device)
    pm = parallelize(build_model(cfg, seed=0), dims)   # every rank builds the same model, then keeps its part
    loss_sum = pm.forward_backward(x_BT, y_BT, n_tokens_global)

The model code stays free of distributed imports: pipeline stages are carved out of the module tree, experts are
sliced and their `MoE.forward` replaced, activation-memory policies wrap decoder-layer forwards, and FSDP2
shards whatever parameters remain, in that order (torchtitan's `parallelize_*`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from openk2.model.transformer import K2Model
from openk2.parallel.layout import ParallelLayout

_MESH_DIMS = ("pp", "dp_replicate", "efsdp", "ep")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device_type: str) -> tuple[int, int, torch.device]:
    """Join the torchrun job (env:// rendezvous): NCCL on CUDA, gloo on CPU. Returns (rank, world, device)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return rank, world, device


@dataclass
class ParallelDims:
    """The resolved layout and this rank's meshes and groups."""

    layout: ParallelLayout
    device: torch.device
    world_mesh: DeviceMesh | None  # dims (pp, dp_replicate, efsdp, ep); None for one process
    flat: dict[str, DeviceMesh] = field(default_factory=dict)  # flattened views: dp_shard, dp

    @classmethod
    def build(cls, layout: ParallelLayout, device: torch.device) -> ParallelDims:
        if layout.world_size == 1:
            return cls(layout, device, None)
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build needs an initialized process group (torchrun, or "
                               "torch.distributed.init_process_group)")
        if dist.get_world_size() != layout.world_size:
            raise RuntimeError(f"layout resolved for {layout.world_size} ranks, process group has "
                               f"{dist.get_world_size()}")
        L = layout
        mesh = init_device_mesh(device.type, (L.pp, L.dp_replicate, L.efsdp, L.ep), mesh_dim_names=_MESH_DIMS)
        # Flattened views FSDP and the reductions need; created once, collectively, on every rank.
        flat = {"dp_shard": mesh["efsdp", "ep"]._flatten("dp_shard"),
                "dp": mesh["dp_replicate", "efsdp", "ep"]._flatten("dp")}
        # FSDP meshes, built once (each new mesh dim is a collective group creation on every rank).
        if L.dp_replicate > 1:
            flat["dense"] = flat["dp"]._unflatten(0, (L.dp_replicate, L.dp_shard), ("dp_replicate", "dp_shard"))
            flat["expert"] = mesh["dp_replicate", "efsdp"]
        else:
            flat["dense"] = flat["dp_shard"]
            flat["expert"] = mesh["efsdp"]
        return cls(layout, device, mesh, flat)

    # ------------------------------------------------------------------ ranks
    def _coord(self, name: str) -> int:
        return 0 if self.world_mesh is None else self._sub(name).get_local_rank()

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.world_mesh is not None else 0

    @property
    def pp_rank(self) -> int:
        return self._coord("pp")

    @property
    def ep_rank(self) -> int:
        return self._coord("ep")

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data shard (ranks of one pipeline read the same data)."""
        return self._coord("dp")

    # ----------------------------------------------------------------- meshes
    def _sub(self, name: str) -> DeviceMesh:
        assert self.world_mesh is not None
        return self.flat[name] if name in self.flat else self.world_mesh[name]

    @property
    def dense_mesh(self) -> DeviceMesh:
        """FSDP mesh of every parameter but the routed experts: dp_shard, or (dp_replicate, dp_shard) for HSDP."""
        return self._sub("dense")

    @property
    def expert_mesh(self) -> DeviceMesh:
        """FSDP mesh of the routed experts: the data-parallel ranks holding the same experts (efsdp)."""
        return self._sub("expert")

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """All ranks of this pipeline stage (they read different data): token counts, max logits, loads."""
        return None if self.world_mesh is None else self._sub("dp").get_group()

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return None if self.world_mesh is None else self._sub("ep").get_group()

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return None if self.world_mesh is None else self._sub("pp").get_group()


class ParallelModel:
    """This rank's part of the model and how to run a forward/backward on it.

    `model` has the K2Model API the optimizer and checkpoints use (`param_groups`, `attention_layers`,
    `moe_layers`, `update_expert_biases`, `config`) with the original parameter names; under pipeline
    parallelism it holds only this rank's stages.
    """

    def __init__(self, dims: ParallelDims, model: nn.Module, pipeline: object | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.dims = dims
        self.model = model
        self.pipeline = pipeline  # openk2.parallel.pipeline.Pipeline when pp > 1
        # One process has no FSDP mixed-precision policy: it computes under autocast instead (DtypePolicy).
        self.autocast_dtype = autocast_dtype

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dims.device.type, dtype=self.autocast_dtype)

    @property
    def config(self):
        return self.model.config

    def train(self, mode: bool = True) -> ParallelModel:
        self.model.train(mode)
        if self.pipeline is not None:
            for s in self.pipeline.stage_modules:
                s.train(mode)
        return self

    def forward_backward(self, x_BT: torch.Tensor, y_BT: torch.Tensor, n_tokens: float) -> torch.Tensor:
        """Forward and backward of one batch; gradients of (summed loss / n_tokens) accumulate in `.grad`.
        Returns this rank's summed loss (fp32 scalar, detached; 0 on pipeline ranks without the last stage)."""
        if self.pipeline is not None:
            return self.pipeline.forward_backward(x_BT, y_BT, n_tokens)
        with self._autocast():
            loss_sum = self.model(x_BT, labels=y_BT, reduction="sum", return_logits=False).loss
        (loss_sum / n_tokens).backward()
        return loss_sum.detach().float()

    @torch.no_grad()
    def loss_sum(self, x_BT: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
        """Summed loss of a batch without gradients (validation); 0 on pipeline ranks without the last stage."""
        if self.pipeline is not None:
            out = self.pipeline.loss_sum(x_BT, y_BT)
        else:
            with self._autocast():
                out = self.model(x_BT, labels=y_BT, reduction="sum", return_logits=False).loss.detach().float()
        self.reshard()
        return out

    def reshard(self) -> None:
        """Put FSDP's sharded parameters back: a forward without backward leaves the roots' parameters gathered
        (roots do not reshard after forward), and the optimizer and checkpoints work on the shards."""
        from torch.distributed.fsdp import FSDPModule

        roots = self.pipeline.stage_modules if self.pipeline is not None else [self.model]
        for root in roots:
            for m in root.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()


def parallelize(
    model: K2Model,
    dims: ParallelDims,
    *,
    param_dtype: torch.dtype | None = None,
) -> ParallelModel:
    """Apply the layout to `model` (built identically on every rank): pipeline split, expert parallelism,
    activation-memory policies, FSDP2. `param_dtype` is the compute dtype FSDP casts parameters to (None:
    bf16 on CUDA, the parameters' own dtype on CPU); gradients are reduced in fp32. One process (no FSDP) runs
    its forwards under autocast to `param_dtype` instead."""
    layout = dims.layout
    layout.validate_model(model.config)
    pipeline = None
    rank_model: nn.Module = model
    if layout.pp > 1:
        from openk2.parallel.pipeline import Pipeline

        pipeline = Pipeline.split(model, dims)
        rank_model = pipeline.rank_model
    if layout.ep > 1:
        from openk2.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(rank_model, dims)
    if layout.activation_switches:
        from openk2.parallel.activation import apply_activation_memory

        apply_activation_memory(rank_model, layout)
    if dims.world_mesh is not None:
        from openk2.parallel.fsdp import apply_fsdp

        if param_dtype is None and dims.device.type == "cuda":
            param_dtype = torch.bfloat16
        roots = pipeline.stage_modules if pipeline is not None else [rank_model]
        apply_fsdp(rank_model, roots, dims, param_dtype=param_dtype)
    if pipeline is not None:
        pipeline.activation_dtype = param_dtype or torch.float32
        pipeline.build_schedule()
    autocast = param_dtype if dims.world_mesh is None and param_dtype not in (None, torch.float32) else None
    return ParallelModel(dims, rank_model, pipeline, autocast_dtype=autocast)


__all__ = ["ParallelDims", "ParallelModel", "init_distributed", "launched_by_torchrun", "parallelize"]
