"""RMSNorm with a backward of a few whole-tensor passes on CPU.

Why: `nn.RMSNorm` is a composite of pow, mean, add, rsqrt and two products, and autograd differentiates each of them:
about fifteen ops and their temporaries per norm and step, on tensors as large as the residual stream. This function
computes the same numbers in four forward passes (the row norms, two products) and five backward ones, with the row
dot products as `vecdot` reductions (no temporaries): the training step 1.021x on config A (17 norms a step,
in-process A/B, docs/benchmarks.md, "Loss chunks, RMSNorm's backward, the experts' sum"). Where the kernel library
builds (`openk2.model.few_rows`), one pass of its own forward and one backward take their place (`csrc/rms_norm.cpp`:
the training step 1.008-1.028x on config A, 1.018x on B). Only plain fp32 CPU training takes either; inference, CUDA
(which has a fused kernel), DTensors and other dtypes keep torch's.
"""

from __future__ import annotations

import torch
from torch import nn

from openk2.model import few_rows
from openk2.model.few_rows import as_rows
from openk2.model.matmul import plain_fp32_cpu


class _RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps) over the last dim; saves x * rstd for the backward."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
        D = x_ND.shape[-1]
        rstd_N1 = torch.linalg.vector_norm(x_ND, dim=-1, keepdim=True).square_().div_(D).add_(eps).rsqrt_()
        xhat_ND = x_ND * rstd_N1
        ctx.save_for_backward(xhat_ND, rstd_N1, w_D)
        return xhat_ND * w_D

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        xhat_ND, rstd_N1, w_D = ctx.saved_tensors
        D = grad_ND.shape[-1]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # dx = rstd * (g*w - xhat * mean(g*w * xhat))
            gw_ND = grad_ND * w_D
            minus_mean_N1 = torch.linalg.vecdot(gw_ND, xhat_ND, dim=-1).unsqueeze(-1).div_(-D)
            grad_x = torch.addcmul(gw_ND, xhat_ND, minus_mean_N1).mul_(rstd_N1)
        if ctx.needs_input_grad[1]:
            grad_w = torch.linalg.vecdot(grad_ND.reshape(-1, D), xhat_ND.reshape(-1, D), dim=0)
        return grad_x, grad_w, None


class _KernelRMSNorm(torch.autograd.Function):
    """`_RMSNormFunction` through the kernel library (`few_rows.rms_norm`): one pass forward, one backward; saves x
    (alive anyway as the residual stream) and rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
        x_ND = as_rows(x)
        y_ND, rstd_N = few_rows.rms_norm(x_ND, w_D, eps)
        ctx.save_for_backward(x_ND, rstd_N, w_D)
        return y_ND.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_ND, rstd_N, w_D = ctx.saved_tensors
        grad_x_ND, grad_w = few_rows.rms_norm_backward(as_rows(grad), x_ND, rstd_N, w_D, ctx.needs_input_grad[0],
                                                       ctx.needs_input_grad[1])
        return (grad_x_ND.view(grad.shape) if ctx.needs_input_grad[0] else None,
                grad_w if ctx.needs_input_grad[1] else None, None)


# CPU training norms through the kernel library where it builds (`_KernelRMSNorm`); False: `_RMSNormFunction`.
_KERNEL = True


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameter and state-dict names) whose CPU training forward and backward run
    `_KernelRMSNorm` (or `_RMSNormFunction` without the kernel library)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (w is not None and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
                and plain_fp32_cpu(x, w)):
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
            # Compiled code keeps aten's passes, which Inductor fuses with the ops around them.
            if _KERNEL and x.numel() and not torch.compiler.is_compiling() and few_rows.available():
                return _KernelRMSNorm.apply(x, w, eps)
            return _RMSNormFunction.apply(x, w, eps)
        return super().forward(x)
