"""`openk2.model.norm.RMSNorm` against `nn.RMSNorm`: values and gradients, and which calls take the fused function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from openk2.model import norm as norm_module
from openk2.model.norm import RMSNorm


def _outputs_and_grads(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad)
    return [y.detach(), x.grad, module.weight.grad]


@pytest.mark.parametrize("width", [256, 64])
def test_matches_torch_rmsnorm_on_contiguous_and_strided_inputs(width):
    """Values and both gradients equal nn.RMSNorm's; a strided input (MLA's latent is a split view) too."""
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


def test_training_calls_take_the_function_and_inference_keeps_torch(monkeypatch):
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
