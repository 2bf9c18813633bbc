"""FSDP2 (`fully_shard`) for K2: one unit per decoder layer (its routed experts sharded over the expert mesh), and a
root unit per model part (embeddings, final norm, LM head).

Mixed precision is explicit: on CUDA parameters are gathered in bf16 and gradients reduce-scattered in fp32 (fp32
master weights and optimizer state stay sharded); on CPU everything stays fp32. Gradients are *summed* over
data-parallel ranks (divide factor 1): the loss is already normalized by the global token count, so the sum is
exactly the single-process gradient of the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_common import ShardPlacementResult
from torch.distributed.fsdp._fully_shard._fsdp_init import _get_mesh_info
from torch.distributed.tensor import Shard

from openk2.model.moe import MoE
from openk2.parallel.parallelize import ParallelDims


def mixed_precision_policy(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    if param_dtype is None or param_dtype == torch.float32:
        return MixedPrecisionPolicy()  # fp32 throughout (CPU)
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = model.model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def apply_fsdp(
    model: nn.Module, roots: Sequence[nn.Module], dims: ParallelDims, param_dtype: torch.dtype | None = None
) -> None:
    """Shard `model` (a K2Model, or a pipeline rank model whose stage modules are `roots`) over the data-parallel
    ranks. Parameters of 3-D expert stacks are sharded on the expert dim, so each rank holds whole experts."""
    mp = mixed_precision_policy(param_dtype)
    dense_mesh = dims.dense_mesh
    # The routed experts are sharded over their own mesh (efsdp under EP) but stay in their layer's FSDP unit
    # (a per-parameter mesh): the unit's hooks then sit outside the layer's activation-checkpoint region, whose
    # recomputation must replay exactly the forward's ops.
    expert_info = (ShardPlacementResult(placement=Shard(0), mesh_info=_get_mesh_info(dims.expert_mesh, None))
                   if dims.layout.ep > 1 else None)
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        # Without EP the expert mesh is the dense one (same ranks), and FSDP wants one mesh per process group.
        moe = isinstance(mlp, MoE) and dims.layout.ep > 1
        experts = {id(p) for p in mlp.experts.parameters()} if moe else set()

        def placement(p: nn.Parameter, experts: set[int] = experts) -> ShardPlacementResult | None:
            return expert_info if id(p) in experts else None

        fully_shard(layer, mesh=dense_mesh, mp_policy=mp, shard_placement_fn=placement if experts else None)
    for root in roots:
        fully_shard(root, mesh=dense_mesh, mp_policy=mp)
    for m in {id(m): m for r in (model, *roots) for m in r.modules() if isinstance(m, FSDPModule)}.values():
        m.set_gradient_divide_factor(1.0)
        # A plain SUM (no PreMulSum, which gloo lacks; scaling by 1 is a no-op anyway).
        m.set_force_sum_reduction_for_comms(True)


__all__ = ["apply_fsdp", "decoder_layers", "mixed_precision_policy"]
