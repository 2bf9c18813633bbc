"""Activation-memory switches: recomputation and offload change nothing, FP8 storage only gradients (within
tolerance), and they lower the peak memory of a training step."""

from __future__ import annotations

import functools

import pytest
import torch

from openk2.model import build_model
from openk2.parallel import activation
from openk2.parallel.activation import Fp8Tensor, apply_activation_memory, peak_bytes
from openk2.parallel.layout import ParallelLayout
from tests.parallel._harness import assert_close_state, batches, reference_run, tiny_config

TAU = 0.02  # QK-Clip acts every step: max-logit recording must survive recomputation
FP8_LOSS_RTOL = 2e-3


def _switched(**switches):
    layout = ParallelLayout(**switches).resolve(1)
    return lambda m: apply_activation_memory(m, layout)


@functools.cache
def _data():
    cfg = tiny_config()
    return cfg, batches(cfg, 2, 4, 32)


@functools.cache
def _run(**switches):
    cfg, steps = _data()
    return reference_run(cfg, steps, qk_clip_tau=TAU, model_fn=_switched(**switches) if switches else None)


@pytest.mark.parametrize("switches", [dict(recompute="selective"), dict(recompute="selective+moe_down"),
                                      dict(offload_activations=True),
                                      dict(recompute="selective", offload_activations=True)])
def test_recompute_and_offload_change_nothing(switches):
    losses, state = _run(**switches)
    ref_losses, ref_state = _run()
    assert losses == ref_losses
    assert_close_state(state, ref_state, rtol=0.0)  # bitwise: the same ops on the same values


@pytest.mark.parametrize("switches", [dict(fp8_activations=True), dict(recompute="selective", fp8_activations=True)])
def test_fp8_storage_changes_losses_only_within_tolerance(switches):
    before = activation._STATE.fp8_stored
    losses, _ = _run(**switches)
    assert activation._STATE.fp8_stored > before  # SwiGLU / expert inputs really went through FP8
    ref_losses, _ = _run()
    assert losses[0] == ref_losses[0]  # the forward always uses exact values
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=FP8_LOSS_RTOL, atol=0)


def test_fp8_tiles_roundtrip():
    x = torch.randn(5, 300) * torch.logspace(-3, 3, 300)  # wide dynamic range across tiles
    x[2, :128] = 0.0  # an all-zero tile
    q = Fp8Tensor.quantize(x)
    assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == (5, 3, 128) and q.scale.shape == (5, 3, 1)
    y = q.dequantize()
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[2, :128], x[2, :128])
    # e4m3 keeps 3 mantissa bits: error <= 2^-4 of the value, plus the subnormal floor of its tile's scale.
    tile_max = torch.nn.functional.pad(x.abs(), (0, 84)).view(5, 3, 128).amax(-1).repeat_interleave(128, 1)[:, :300]
    assert ((y - x).abs() <= x.abs() * 2**-4 + tile_max * 2**-9 / 448 * 8).all()
    wide = torch.randn(4, 512)
    assert Fp8Tensor.quantize(wide).nbytes == 4 * 512 + 4 * 4 * 4  # 1 byte per value + an fp32 scale per tile


def test_switches_lower_the_peak_memory_of_a_step():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg, seed=0).train()
    x = torch.randint(0, cfg.vocab_size, (4, 129))

    def step() -> None:
        model(x[:, :-1], labels=x[:, 1:], return_logits=False).loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up (lazy buffers)
    base = peak_bytes(step)
    apply_activation_memory(model, ParallelLayout(recompute="selective+moe_down", fp8_activations=True).resolve(1))
    switched = peak_bytes(step)
    assert switched < 0.8 * base, (switched, base)
