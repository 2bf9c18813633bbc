"""One distributed training step, shared by the distributed trainer and the equality tests.

Normalization follows the single-process trainer exactly: the loss of a step is the sum over every valid target
token of the *global* batch (all data-parallel ranks, all micro-batches) divided by their count, so each rank
back-propagates (its summed loss / global token count) and FSDP sums gradients (torchtitan; anchors.md §E.12).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from openk2.parallel.optim import clip_grad_norm_, grad_norm_
from openk2.parallel.parallelize import ParallelModel

IGNORE_INDEX = -100


def _reduce_device(group: dist.ProcessGroup | None) -> torch.device:
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float], group: dist.ProcessGroup | None = None) -> list[float]:
    """Sum python numbers over `group` (float64, so token counts stay exact)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=_reduce_device(group))
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t.cpu().tolist()


def train_step(
    pm: ParallelModel,
    optimizer: torch.optim.Optimizer,
    micro: Sequence[tuple[Tensor, Tensor]],
    *,
    grad_clip: float = 0.0,
) -> dict[str, Any]:
    """Forward/backward over this rank's micro-batches, global clip, optimizer step. Returns the global loss
    (mean over the global batch's valid tokens), token counts and the pre-clip gradient norm, equal on all ranks.

    The caller sets the learning rate; `micro` holds (inputs_BT, targets_BT) of this rank's data shard (ranks of
    one pipeline pass the same batches)."""
    dims = pm.dims
    dev = dims.device
    n_local = sum(int((y != IGNORE_INDEX).sum()) for _, y in micro)
    (n_tokens,) = all_reduce_sum([n_local], dims.dp_group)
    pm.train()
    loss_local = torch.zeros((), dtype=torch.float64)
    for x_BT, y_BT in micro:
        loss_local += pm.forward_backward(x_BT.to(dev), y_BT.to(dev), n_tokens).double().cpu()
    params = [p for p in pm.model.parameters()]
    if grad_clip > 0:
        grad_norm = float(clip_grad_norm_(params, grad_clip))
    else:
        grad_norm = float(grad_norm_(params))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # Pipeline ranks without the last stage contribute 0: summing over the world counts each data shard once.
    (loss_sum,) = all_reduce_sum([float(loss_local)], None)
    return {"loss": loss_sum / max(n_tokens, 1.0), "n_tokens": n_tokens, "grad_norm": grad_norm}


@torch.no_grad()
def eval_loss(pm: ParallelModel, batches: Sequence[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """(summed loss, valid tokens) over every rank's `batches`; all ranks must pass the same number."""
    pm.train(False)
    dev = pm.dims.device
    loss, n = 0.0, 0
    for x_BT, y_BT in batches:
        loss += float(pm.loss_sum(x_BT.to(dev), y_BT.to(dev)))
        n += int((y_BT != IGNORE_INDEX).sum())
    pm.train(True)
    (loss_sum,) = all_reduce_sum([loss], None)
    (n_tokens,) = all_reduce_sum([n], pm.dims.dp_group)
    return loss_sum, n_tokens


__all__ = ["all_reduce_sum", "eval_loss", "train_step"]
