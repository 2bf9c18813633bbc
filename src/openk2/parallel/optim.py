"""MuonClip on sharded parameters: Moonlight's distributed Muon ([ML] Algorithm 1, `k2-recipe.md` §1.5) and
QK-Clip on local rows.

FSDP2 leaves each rank with Shard(0) slices of the parameters and of their (summed, reduce-scattered) gradients.
Per Muon matrix:

1. momentum (and Nesterov) on the local slice, elementwise, so it equals the single-process update's slice;
2. gather the full update only where the slice cuts matrices: a 2-D weight split by rows is all-gathered; a 3-D
   expert stack split on the expert dim already holds whole experts, and a replicated tensor is whole, so
   neither communicates;
3. Newton–Schulz on whole matrices (batched by shape, as in the single-process optimizer);
4. keep the local slice, decay and update the local parameter shard. FSDP gathers the new weights at the next
   forward (Moonlight's step 6).

AdamW is elementwise and runs on the local shards. QK-Clip: per-head max logits are all-reduced (max) over the
data-parallel ranks, then each rank scales the `q_b_proj` / `kv_b_proj` rows it holds. Expert loads are
all-reduced (sum) before the bias update, so every rank applies the same update. With the same gradients a
distributed step equals the single-process step up to float reassociation (tests/parallel).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from openk2.optim.muon import adjusted_lr_ratio, batched_orthogonalize, plan_buckets
from openk2.optim.muonclip import MuonClip
from openk2.optim.qk_clip import clip_factors, is_mla


# --------------------------------------------------------------------- DTensor helpers
def local(t: Tensor) -> Tensor:
    """The tensor this rank stores (the local shard of a DTensor; an alias, so in-place updates stick)."""
    return t._local_tensor if isinstance(t, DTensor) else t


def global_offset(p: Tensor) -> tuple[int, ...]:
    """Offset of the local shard inside the global tensor (zeros for a plain tensor)."""
    if not isinstance(p, DTensor):
        return (0,) * p.ndim
    return compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)[1]


def cuts_matrices(p: Tensor) -> bool:
    """True when the local shard of `p` holds parts of matrices (a shard of one of the last two dims on a mesh
    dim with more than one rank): Newton–Schulz then needs the gathered full tensor."""
    if not isinstance(p, DTensor):
        return False
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard) and p.device_mesh.size(mesh_dim) > 1:
            dim = placement.dim % p.ndim
            if dim >= p.ndim - 2:
                return True
    return False


def full_like_param(p: DTensor, local_t: Tensor) -> Tensor:
    """All-gather a tensor laid out like `p`'s local shard into the full tensor (uneven shards included)."""
    return DTensor.from_local(local_t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride()).full_tensor()


def local_slice(p: Tensor, full: Tensor) -> Tensor:
    """The slice of a full tensor that `p`'s local shard covers."""
    if not isinstance(p, DTensor):
        return full
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))]


def replication(t: Tensor, plain_replicas: int) -> int:
    """How many ranks hold the same elements as this rank's shard of `t` (over its mesh; plain tensors:
    `plain_replicas`). Ranks outside a DTensor's mesh (pipeline stages, expert groups) hold different ones."""
    if not isinstance(t, DTensor):
        return plain_replicas
    n = 1
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            n *= t.device_mesh.size(mesh_dim)
    return n


# ------------------------------------------------------------------- gradient norm
@torch.no_grad()
def grad_norm_(params: Iterable[Tensor], plain_replicas: int = 1, group: dist.ProcessGroup | None = None) -> Tensor:
    """Global L2 norm of the gradients of `params` over all ranks (fp32 scalar on CPU, the same on every rank):
    local sums of squares, each divided by the number of ranks holding the same elements, summed over `group`
    (default: the world, which covers data, expert and pipeline parallelism)."""
    sq = torch.zeros((), dtype=torch.float64)
    by_rep: dict[int, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_rep.setdefault(replication(p.grad, plain_replicas), []).append(local(p.grad))
    for rep, grads in by_rep.items():
        grads = [g for g in grads if g.numel()]
        if grads:
            norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
            sq += torch.stack(norms).double().square().sum().cpu() / rep
    if dist.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        t = sq.to(dev)
        dist.all_reduce(t, group=group)
        sq = t.cpu()
    return sq.sqrt().float()


@torch.no_grad()
def clip_grad_norm_(params: Sequence[Tensor], max_norm: float, plain_replicas: int = 1,
                    group: dist.ProcessGroup | None = None) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` for parameters sharded over several meshes (FSDP + EP + PP)."""
    total = grad_norm_(params, plain_replicas, group)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    grads = [local(p.grad) for p in params if p.grad is not None]
    by_dev: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_dev.setdefault(g.device, []).append(g)
    for dev, gs in by_dev.items():
        torch._foreach_mul_(gs, coef.to(dev))
    return total


# ------------------------------------------------------------------------- optimizer
class DistributedMuonClip(MuonClip):
    """`MuonClip` for a model sharded by `openk2.parallel.parallelize` (FSDP2 DTensors, local experts, pipeline
    stages). Same arguments as `MuonClip`, plus `dp_group` (the ranks that read different data for the same
    layers: max logits and expert loads are reduced over it) and `plain_replicas` (ranks holding each plain,
    non-DTensor parameter; 1 unless parameters are replicated without FSDP)."""

    def __init__(self, model: nn.Module, lr: float, *, dp_group: dist.ProcessGroup | None = None,
                 plain_replicas: int = 1, **kwargs: Any) -> None:
        super().__init__(model, lr, **kwargs)
        self.dp_group = dp_group
        self.plain_replicas = plain_replicas
        self._dist_plans: dict[tuple[int, ...], Any] = {}

    # ------------------------------------------------------------------- step (MuonClip.step with these hooks)
    def _update_expert_biases(self) -> float:
        self._all_reduce_loads()
        return super()._update_expert_biases()

    def _grads_finite(self) -> bool:
        params = [p for g in self.param_groups for p in g["params"]]
        self._grad_norm = grad_norm_(params, self.plain_replicas)
        return bool(torch.isfinite(self._grad_norm))

    # ------------------------------------------------------------------- muon
    def _muon_group(self, group: dict[str, Any]) -> None:
        params, grads, bufs = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            g = local(p.grad)
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(g)
            bufs.append(state["momentum_buffer"])
        if not params:
            return
        momentum, lr, wd = group["momentum"], float(group["lr"]), group["weight_decay"]
        # (1) momentum / Nesterov on the local shards (elementwise: the single-process values' slices).
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else list(bufs)
        # (2) whole matrices: gather only what the sharding cuts.
        wholes = [full_like_param(p, u) if cuts_matrices(p) else u for p, u in zip(params, updates, strict=True)]
        key = tuple(id(p) for p in params)
        plan = self._dist_plans.get(key)
        if plan is None:
            plan = self._dist_plans[key] = plan_buckets([w.shape for w in wholes], self._max_batch_elems)
        # (3) batched Newton–Schulz, (4) keep the local slice.
        ortho = batched_orthogonalize(wholes, plan, group["ns_steps"], group["ns_coefficients"], group["ns_eps"],
                                      self._ns_dtype)
        ortho = [local_slice(p, o) if cuts_matrices(p) else o for p, o in zip(params, ortho, strict=True)]
        shards = [local(p) for p in params]
        decay = 1 - lr * wd
        if decay != 1.0:
            torch._foreach_mul_(shards, decay)
        by_alpha: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
        for p, s, o in zip(params, shards, ortho, strict=True):
            if s.numel() == 0:
                continue
            # The lr ratio uses the global matrix shape (p.shape of a DTensor is global).
            alpha = -(lr * adjusted_lr_ratio(p.shape[-2], p.shape[-1], group["adjust_lr"]))
            ps, os_ = by_alpha.setdefault(alpha, ([], []))
            ps.append(s)
            os_.append(o.to(s.dtype) if o.dtype != s.dtype else o)
        for alpha, (ps, os_) in by_alpha.items():
            torch._foreach_add_(ps, os_, alpha=alpha)

    # ------------------------------------------------------------------ adamw
    _local = staticmethod(local)  # MuonClip._adamw_group then updates each rank's shard in place

    # ---------------------------------------------------------------- qk-clip
    def _qk_clip(self) -> list[Tensor | None]:
        layers = self.attention_layers
        recorded: list[Tensor | None] = [a.max_logit_H for a in layers]
        present = [i for i, s in enumerate(recorded) if s is not None]
        if present and self.dp_group is not None:
            s_H = torch.cat([recorded[i].float() for i in present])
            dev = s_H.device
            if dist.get_backend(self.dp_group) == "nccl" and dev.type != "cuda":
                s_H = s_H.cuda()
            dist.all_reduce(s_H, op=dist.ReduceOp.MAX, group=self.dp_group)
            s_H = s_H.to(dev)
            for i, s in zip(present, s_H.split([recorded[i].numel() for i in present]), strict=True):
                recorded[i] = s
        if math.isinf(self.qk_clip_tau):  # tau = inf: monitoring only
            return recorded
        for attn, s_H in zip(layers, recorded, strict=True):
            if s_H is None:
                continue
            if not is_mla(attn):
                raise NotImplementedError("distributed QK-Clip supports openk2's MLA attention")
            scale_mla_rows_(attn, clip_factors(s_H, self.qk_clip_tau))
        return recorded

    def _all_reduce_loads(self) -> None:
        layers = self.model.moe_layers()
        if not layers or self.dp_group is None:
            return
        counts = torch.cat([m.tokens_per_expert for m in layers])
        dist.all_reduce(counts, group=self.dp_group)
        for m, c in zip(layers, counts.split([m.tokens_per_expert.numel() for m in layers]), strict=True):
            m.tokens_per_expert.copy_(c)


@torch.no_grad()
def scale_mla_rows_(attn: nn.Module, gamma_H: Tensor) -> None:
    """K2's per-head clip on whatever rows of the up-projections this rank holds: per head, q_nope and k_nope
    rows x sqrt(gamma), q_rope rows x gamma; v rows and the shared rotary key untouched (`qk_clip.scale_mla_`)."""
    H, N, R, V = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.v_dim
    sqrt_H = gamma_H.sqrt()
    q_rows = torch.cat([sqrt_H[:, None].expand(H, N), gamma_H[:, None].expand(H, R)], dim=1).reshape(-1)
    kv_rows = torch.cat([sqrt_H[:, None].expand(H, N), torch.ones_like(gamma_H)[:, None].expand(H, V)],
                        dim=1).reshape(-1)
    for proj, rows in ((attn.q_up_proj, q_rows), (attn.kv_b_proj, kv_rows)):
        if proj.bias is not None:
            raise NotImplementedError("QK-Clip for MLA assumes bias-free q/kv up-projections")
        w = proj.weight
        shard = local(w)
        start = global_offset(w)[0]
        factor = rows[start:start + shard.shape[0]].to(shard.device)
        # The fp32 factor is not cast down first: a bf16 weight is multiplied in fp32 and rounded once.
        shard.mul_(factor.view(-1, 1))


__all__ = ["DistributedMuonClip", "clip_grad_norm_", "cuts_matrices", "full_like_param", "global_offset",
           "grad_norm_", "local", "local_slice", "scale_mla_rows_"]
