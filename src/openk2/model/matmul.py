"""fp32 matrix products on CPU through oneDNN.

Why: on the AMD EPYC hosts we develop and test on, the MKL in torch's CPU wheel runs fp32 GEMMs at about half
oneDNN's speed (training shapes: ~85 vs ~180 GFLOP/s on one thread), its GEMVs at a third to a half (decode),
and does not split a GEMV over two threads; oneDNN does (docs/benchmarks.md, "oneDNN matmuls"). On a Zen 4 host
the gap is smaller (GEMMs at ~0.9x, small-K training shapes at ~0.5x; "Weights on huge pages"). torch itself
calls oneDNN for fp32 matmuls only inside frozen Inductor graphs, so the model calls it here: `Linear` (every
projection of the model), `mm` (the LM head's chunked cross-entropy, the routed experts' per-expert products),
and the compiled decode step. The op is one of ours (`openk2::onednn_mm`, with its backward), so autograd,
Dynamo and Inductor (as an extern kernel, on the live weights) see a plain op.

Only plain fp32 CPU tensors take this path (a DTensor, CUDA, another dtype or CPU autocast keep aten's), and
only products large enough for oneDNN's higher per-call cost to pay (`MIN_ELEMENTS`). `OPENK2_ONEDNN=0` in the
environment turns it off: aten's (MKL) matmuls everywhere, as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from openk2.model import few_rows
from openk2.model.switches import env_switch

ENABLED = (
    torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and env_switch("OPENK2_ONEDNN")
)
#: The routed experts' products of a training step (forward and backward, one oneDNN call per expert) take oneDNN
#: only up to this many intra-op threads: at two threads their per-expert backward products scale worse than
#: aten's grouped ones (nano step, 2 threads: experts on oneDNN 577 ms vs 522 ms on aten's, dense products on
#: oneDNN in both). Every other product, training or not, takes oneDNN at any thread count: oneDNN's dense fp32
#: GEMMs run at ~2x MKL's on one and on two threads (a nano training step at 2 threads: 626 -> 522 ms), and the
#: decode step's matrix-vector products split over threads (docs/benchmarks.md, "Dense training products").
MAX_EXPERT_TRAINING_THREADS = 1
#: A product goes through oneDNN when its weight-like operand or its output has at least this many elements
#: (1 MiB fp32): below that, at decode's 1-8 rows, MKL's lower per-call cost wins (measured on config A).
MIN_ELEMENTS = 1 << 18


def _onednn(a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """a @ b by oneDNN (`mkldnn._linear_pointwise` computes a @ w.T; strided operands are fine, except a broadcast
    one: a zero stride sends oneDNN down a reorder path that took 872 ms for a 2048 x 256 gradient, the backward of
    `moe(x).sum()`, where a copy takes 0.3 ms). oneDNN copies a transposed left operand (every weight gradient's,
    `_weight_grad`) contiguous through aten, on one thread: the kernel library's transposing copy does it at 4-5x
    that speed (`few_rows.transpose_copy`)."""
    if 0 in a_MK.stride():
        a_MK = a_MK.contiguous()
    elif a_MK.stride(0) == 1 and a_MK.shape[1] > 1 and few_rows.available():
        a_MK = few_rows.transpose_copy(a_MK)
    if 0 in b_KN.stride():
        b_KN = b_KN.contiguous()
    return torch.ops.mkldnn._linear_pointwise(a_MK, b_KN.t(), None, "none", [], "")


@torch.library.custom_op("openk2::onednn_mm", mutates_args=())
def onednn_mm(a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """`_onednn` as an op of our own: what autograd, Dynamo and Inductor see in compiled code."""
    return _onednn(a_MK, b_KN)


@onednn_mm.register_fake
def _(a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    return a_MK.new_empty(a_MK.shape[0], b_KN.shape[1])


def _weight_grad(a_MK: torch.Tensor, grad_MN: torch.Tensor,
                 product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _onednn) -> torch.Tensor:
    """a.T @ grad [K, N], a product's right-operand gradient, by oneDNN (`product`: `_onednn`, or the op `onednn_mm`
    in compiled code), which copies its left operand contiguous: the smaller of the two transposes, the activations
    [K, M] or (as (grad.T @ a).T, when N < K) the gradient [N, M]. A `Linear`'s weight gradient is then laid out like
    the weight in the second case. The eight weight-gradient shapes of the bench's configs A and B: 15.5 vs 17.1 ms
    (the training step 1.01-1.03x, docs/benchmarks.md); the two forms' numbers were the same bit for bit on every shape
    checked."""
    if grad_MN.shape[1] < a_MK.shape[1]:
        return product(grad_MN.t(), a_MK).t()
    return product(a_MK.t(), grad_MN)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_MN: torch.Tensor):
    a_MK, b_KN = ctx.saved_tensors
    grad_a = onednn_mm(grad_MN, b_KN.t()) if ctx.needs_input_grad[0] else None
    grad_b = _weight_grad(a_MK, grad_MN, onednn_mm) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b


onednn_mm.register_autograd(_backward, setup_context=_setup_context)


class _EagerMM(torch.autograd.Function):
    """`onednn_mm` for eager code (training, prefill): the same products without a custom op's per-call cost
    (~0.1 ms through the dispatcher and its Python autograd wrapper, ~5% of a nano training step)."""

    @staticmethod
    def forward(ctx, a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a_MK, b_KN)
        return _onednn(a_MK, b_KN)

    @staticmethod
    def backward(ctx, grad_MN: torch.Tensor):
        a_MK, b_KN = ctx.saved_tensors
        grad_a = _onednn(grad_MN, b_KN.t()) if ctx.needs_input_grad[0] else None
        grad_b = _weight_grad(a_MK, grad_MN) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def product(a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """a @ b by oneDNN, differentiable: the custom op under torch.compile, a plain autograd function eagerly."""
    if torch.compiler.is_compiling():
        return onednn_mm(a_MK, b_KN)
    if torch.is_grad_enabled() and (a_MK.requires_grad or b_KN.requires_grad):
        return _EagerMM.apply(a_MK, b_KN)
    return _onednn(a_MK, b_KN)


def plain_fp32_cpu(*tensors: torch.Tensor) -> bool:
    """Plain (not DTensor or other subclass) fp32 CPU tensors, and no CPU autocast: what our own CPU products
    (oneDNN's, the few-row kernel's) may compute in place of aten's."""
    return not torch.is_autocast_enabled("cpu") and all(
        type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32
        for t in tensors)


def takes_onednn(*tensors: torch.Tensor, experts_training: bool = False) -> bool:
    """Plain fp32 CPU tensors, oneDNN built in and on, no CPU autocast, and, for the routed experts' products of a
    training step (`experts_training`), at most `MAX_EXPERT_TRAINING_THREADS` threads."""
    return (ENABLED and (not experts_training or torch.get_num_threads() <= MAX_EXPERT_TRAINING_THREADS)
            and plain_fp32_cpu(*tensors))


def mm(a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D operands, through oneDNN where it pays (see the module docstring)."""
    big = max(b_KN.numel(), a_MK.shape[0] * b_KN.shape[1]) >= MIN_ELEMENTS
    return product(a_MK, b_KN) if big and takes_onednn(a_MK, b_KN) else a_MK @ b_KN


def linear(x_TK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` for inputs of any rank, through oneDNN where it pays; a few rows without autograd (a short
    prompt's prefill, eager decoding) through the few-row kernel (`openk2.model.few_rows`)."""
    K, N = x_TK.shape[-1], w_NK.shape[0]
    rows = x_TK.numel() // K
    if (rows <= few_rows.MAX_ROWS and bias_N is None and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x_TK.requires_grad or w_NK.requires_grad))
            and plain_fp32_cpu(x_TK, w_NK) and few_rows.takes(x_MK := x_TK.reshape(rows, K), w_NK)):
        return few_rows.mm(x_MK, w_NK).view(*x_TK.shape[:-1], N)
    if max(w_NK.numel(), rows * N) < MIN_ELEMENTS or not takes_onednn(x_TK, w_NK):
        return F.linear(x_TK, w_NK, bias_N)
    y_TN = product(x_TK.reshape(rows, K), w_NK.t()).view(*x_TK.shape[:-1], N)
    return y_TN if bias_N is None else y_TN + bias_N


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict names) whose product goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
