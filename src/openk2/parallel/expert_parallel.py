"""Expert parallelism: routed experts sharded over the `ep` ranks of an expert group, tokens exchanged with
`all_to_all_single`.

Each rank keeps experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) and routes its own tokens with the (replicated)
router, exactly as one process would. The dispatch is the single-process one (stable sort of token-slots by
expert) with two all-to-alls around the expert computation:

    sort slots by expert -> all-to-all (rows for each rank's experts, with their gate weights)
    -> regroup received rows by local expert -> grouped SwiGLU experts -> undo -> all-to-all back -> unsort, sum K

Routing counts (`tokens_per_expert`, all E experts, this rank's tokens) are all-reduced over the data-parallel
ranks by the optimizer before the bias update, so every rank applies the same update.

`apply_expert_parallel` slices the expert weights and replaces `MoE._routed` on each instance; the model code is
untouched and holds no distributed imports.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd

from openk2.model.moe import MoE, sum_over_slots
from openk2.parallel.activation import tag


def expert_offset(experts: nn.Module) -> int:
    """Global index of the first expert in this rank's (pre-FSDP) expert stack."""
    return getattr(experts, "expert_offset", 0)


def apply_expert_parallel(model: nn.Module, dims) -> None:
    """Keep this rank's experts in every MoE layer of `model` and install the all-to-all forward."""
    ep, ep_rank, group = dims.layout.ep, dims.ep_rank, dims.ep_group
    for moe in model.moe_layers():
        E = moe.n_experts
        if E % ep:
            raise ValueError(f"ep={ep} does not divide the {E} routed experts")
        n_local = E // ep
        lo = ep_rank * n_local
        experts = moe.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(full.detach()[lo:lo + n_local].clone(),
                                                requires_grad=full.requires_grad))
        experts.expert_offset = lo
        experts.n_experts_global = E
        moe.ep_group, moe.ep_size, moe.n_local_experts = group, ep, n_local
        moe._routed = types.MethodType(ep_dispatch, moe)  # routing, loads and shared expert stay MoE.forward's


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(0) - x


def ep_dispatch(moe: MoE, x_ND: torch.Tensor, expert_ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Sum over k of gate weight x expert_k(token), with the experts on other ranks of `moe.ep_group`."""
    ep, n_local, group = moe.ep_size, moe.n_local_experts, moe.ep_group
    flat_ids = expert_ids_NK.reshape(-1)
    counts_E = torch.bincount(flat_ids, minlength=moe.n_experts)
    order_S = flat_ids.argsort(stable=True)
    x_SD = x_ND.index_select(0, order_S // moe.top_k)
    w_S1 = weights_NK.reshape(-1, 1)[order_S]
    # How many rows each source rank sends to each of our local experts: [ep (source), n_local].
    recv_counts_RL = all_to_all_single(counts_E, None, None, group).view(ep, n_local)
    send_splits = counts_E.view(ep, n_local).sum(1).tolist()
    recv_splits = recv_counts_RL.sum(1).tolist()
    with tag("fp8"):  # the experts' up-projection input: FP8 storage when that switch is on
        x_recv = all_to_all_single_autograd(x_SD, recv_splits, send_splits, group)
    w_recv = all_to_all_single_autograd(w_S1, recv_splits, send_splits, group)
    # Received rows come grouped by (source, local expert); the experts want them grouped by expert.
    counts_LR = recv_counts_RL.t().reshape(-1)
    starts_LR = _exclusive_cumsum(recv_counts_RL.reshape(-1)).view(ep, n_local).t().reshape(-1)
    total = int(recv_counts_RL.sum())
    within = torch.arange(total, device=x_ND.device) - torch.repeat_interleave(
        _exclusive_cumsum(counts_LR), counts_LR, output_size=total)
    perm = torch.repeat_interleave(starts_LR, counts_LR, output_size=total) + within
    y_local = moe.experts(x_recv.index_select(0, perm), recv_counts_RL.sum(0), w_recv.index_select(0, perm))
    y_recv = y_local.new_empty(y_local.shape).index_copy(0, perm, y_local)
    y_SD = all_to_all_single_autograd(y_recv, send_splits, recv_splits, group)
    return sum_over_slots(y_SD, order_S, moe.top_k)


__all__ = ["apply_expert_parallel", "ep_dispatch", "expert_offset"]
