"""`openk2.model.norm.RMSNorm` against `nn.RMSNorm`: values and gradients, and which calls take the fused function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from openk2.model import few_rows
from openk2.model import norm as norm_module
from openk2.model.norm import RMSNorm


def _outputs_and_grads(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad)
    return [y.detach(), x.grad, module.weight.grad]


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("width", [256, 64, 13])
def test_matches_torch_rmsnorm_on_contiguous_and_strided_inputs(width, kernel, monkeypatch):
    """Values and both gradients equal nn.RMSNorm's, through the kernel library's norm (where it builds) and
    `_RMSNormFunction`; a strided input (MLA's latent is a split view) too."""
    monkeypatch.setattr(norm_module, "_KERNEL", kernel)
    calls = []
    monkeypatch.setattr(few_rows, "rms_norm", lambda *a, f=few_rows.rms_norm: calls.append(1) or f(*a))
    g = torch.Generator().manual_seed(0)
    ours, ref = RMSNorm(width, eps=1e-6), nn.RMSNorm(width, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(width, generator=g) + 0.5)
        ref.weight.copy_(ours.weight)
    wide = torch.randn(3, 17, width + 16, generator=g) * 3
    grad = torch.randn(3, 17, width, generator=g)
    for x in (wide[..., :width].contiguous(), wide[..., :width]):
        for a, b in zip(_outputs_and_grads(ours, x, grad), _outputs_and_grads(ref, x, grad), strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert len(calls) == (2 if kernel and few_rows.available() else 0)


def test_training_calls_take_the_function_and_inference_keeps_torch(monkeypatch):
    monkeypatch.setattr(norm_module, "_KERNEL", False)
    calls = []
    apply = norm_module._RMSNormFunction.apply
    monkeypatch.setattr(norm_module._RMSNormFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    norm = RMSNorm(8, eps=1e-6)
    x = torch.randn(2, 8)
    norm(x).sum().backward()  # the weight needs a gradient: fused
    assert len(calls) == 1 and norm.weight.grad is not None
    with torch.no_grad():
        norm(x)
    norm.double()(x.double())  # another dtype: torch's
    assert len(calls) == 1


@pytest.mark.skipif(not few_rows.cpu_supports(), reason="the kernel needs x86-64 with AVX2 and FMA")
def test_kernel_norm_equals_float64_and_does_not_depend_on_threads():
    """The kernel library's norm (`few_rows.rms_norm` and its backward) against float64 autograd over 1,000 rows
    (several weight-gradient blocks, a vector tail), the same numbers on 1 and 2 threads, only the gradients asked
    for, and its errors named."""
    assert few_rows.available(), few_rows._state.get("error")
    g = torch.Generator().manual_seed(1)
    x, w, grad = torch.randn(1000, 72 + 5, generator=g)[:, :72] * 3, torch.rand(72, generator=g) + 0.5, torch.randn(
        1000, 72, generator=g)
    runs = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            y, rstd = few_rows.rms_norm(x, w, 1e-6)
            runs.append((y, rstd, *few_rows.rms_norm_backward(grad, x, rstd, w)))
        finally:
            torch.set_num_threads(before)
    for one, two in zip(*runs, strict=True):
        assert torch.equal(one, two)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = torch.nn.functional.rms_norm(x64, (72,), w64, 1e-6)
    ref.backward(grad.double())
    y, _, dx, dw = runs[0]
    torch.testing.assert_close(y.double(), ref.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(dx.double(), x64.grad, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(dw.double(), w64.grad, atol=1e-4, rtol=1e-6)
    dx_only, no_dw = few_rows.rms_norm_backward(grad, x, runs[0][1], w, True, False)
    assert torch.equal(dx_only, dx) and no_dw.numel() == 0
    with pytest.raises(RuntimeError, match="weight must be a contiguous fp32"):
        few_rows.rms_norm(x, w[:-1], 1e-6)
