"""oneDNN products on CPU (`openk2.model.matmul`) against aten's: values, gradients, and who takes the path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from openk2.model import matmul
from openk2.model.moe import grouped_matmul

pytestmark = pytest.mark.skipif(not matmul.ENABLED, reason="torch built without oneDNN")


@pytest.fixture(autouse=True)
def _onednn_at_any_thread_count(monkeypatch):
    monkeypatch.setattr(matmul, "MAX_EXPERT_TRAINING_THREADS", 1 << 20)


def _grads(fn, *tensors: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("out_features", [1024, 256])  # the weight gradient transposes x, or (fewer outputs) the grad
@pytest.mark.parametrize("shape", [(3, 600, 512), (700, 512)])
def test_linear_and_its_gradients_match_aten(shape, out_features):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(out_features, 512, generator=g)
    ours = _grads(matmul.linear, x, w)
    ref = _grads(torch.nn.functional.linear, x, w)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-5)


def test_broadcast_operands_and_gradients_match_aten(monkeypatch):
    """`loss = y.sum()` hands the backward a gradient with zero strides, and an expanded input has them too: oneDNN
    must see them copied (its own reorder of a broadcast operand took 872 ms for a 2048 x 256 gradient)."""
    linear_pointwise = torch.ops.mkldnn._linear_pointwise
    strides = []

    def spy(a, w, *rest):
        strides.extend((a.stride(), w.stride()))
        return linear_pointwise(a, w, *rest)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(700, 512, generator=g), torch.randn(1024, 512, generator=g)
    results = []
    for fn in (matmul.linear, torch.nn.functional.linear):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        fn(xs, ws).sum().backward()
        results.append((fn(x[:1].expand(700, 512), w), xs.grad, ws.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-5)
    assert len(strides) == 8 and not any(0 in st for st in strides)  # forward, 2 backward products, expanded forward


def test_the_custom_op_has_a_correct_autograd_and_fake_kernel():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 96, generator=g), torch.randn(96, 80, generator=g)
    torch.library.opcheck(matmul.onednn_mm, (a.requires_grad_(), b.requires_grad_()))
    ours = _grads(matmul.onednn_mm, a, b)
    ref = _grads(torch.mm, a, b)
    for x, y in zip(ours, ref, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-5)


def test_per_expert_products_match_grouped_mm(monkeypatch):
    g = torch.Generator().manual_seed(2)
    counts_E = torch.tensor([300, 0, 41, 700])  # an expert without rows too
    x_SK, w_EKN = torch.randn(int(counts_E.sum()), 256, generator=g), torch.randn(4, 256, 384, generator=g)
    ours = _grads(lambda x, w: grouped_matmul(x, w, counts_E, "grouped_mm"), x_SK, w_EKN)
    monkeypatch.setattr(matmul, "ENABLED", False)
    ref = _grads(lambda x, w: grouped_matmul(x, w, counts_E, "grouped_mm"), x_SK, w_EKN)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-5)


def test_only_plain_fp32_cpu_tensors_take_onednn(monkeypatch):
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    assert matmul.takes_onednn(x, torch.nn.Parameter(w))
    monkeypatch.setattr(matmul, "MAX_EXPERT_TRAINING_THREADS", torch.get_num_threads() - 1)
    assert not matmul.takes_onednn(x, w, experts_training=True)  # more threads than the experts' products pay at
    assert matmul.takes_onednn(x, w)  # every other product takes it at any thread count
    monkeypatch.setattr(matmul, "MAX_EXPERT_TRAINING_THREADS", 1 << 20)
    assert not matmul.takes_onednn(x.bfloat16(), w.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not matmul.takes_onednn(x, w)


def test_linear_module_keeps_nn_linear_names_and_values():
    ours, ref = matmul.Linear(512, 1024, bias=True), torch.nn.Linear(512, 1024, bias=True)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(600, 512)
    torch.testing.assert_close(ours(x), ref(x), atol=2e-4, rtol=1e-5)


def test_environment_switch_turns_it_off():
    code = "import openk2.model.matmul as m; print(m.ENABLED)"
    out = subprocess.run([sys.executable, "-c", code], env={"OPENK2_ONEDNN": "0", "PYTHONPATH": "src"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_only_the_experts_training_products_keep_aten_past_the_thread_limit(monkeypatch):
    """Dense products (training or not) and forward-only expert products (prefill, evaluation) use oneDNN at any
    thread count; the routed experts' products of a training step above the limit keep aten's grouped ones. Seen
    through which op runs: oneDNN's `mkldnn::_linear_pointwise` or aten's."""
    monkeypatch.setattr(matmul, "MAX_EXPERT_TRAINING_THREADS", 0)
    x_TK, w_NK = torch.randn(64, 512), torch.randn(1024, 512, requires_grad=True)
    x_SK, w_EKN = torch.randn(64, 512), torch.randn(4, 512, 256, requires_grad=True)
    counts_E = torch.tensor([10, 20, 0, 34])

    def ops(fn) -> set[str]:
        with torch.profiler.profile() as prof:
            fn()
        return {e.name for e in prof.events()}

    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in ops(lambda: matmul.linear(x_TK, w_NK))
        assert "mkldnn::_linear_pointwise" in ops(lambda: grouped_matmul(x_SK, w_EKN, counts_E, "grouped_mm"))
        torch.testing.assert_close(matmul.linear(x_TK, w_NK), x_TK @ w_NK.t(), atol=2e-4, rtol=1e-5)
    assert "mkldnn::_linear_pointwise" in ops(lambda: matmul.linear(x_TK, w_NK).sum().backward())
    assert "mkldnn::_linear_pointwise" not in ops(
        lambda: grouped_matmul(x_SK, w_EKN, counts_E, "grouped_mm").sum().backward())
