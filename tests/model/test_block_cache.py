"""`openk2.model.block_cache`: training steps reuse their large blocks, with values unchanged, and the cache stays out
of everything else (inference, code outside a step, a disabled switch)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from openk2.model import block_cache, build_model, get_preset

pytestmark = pytest.mark.skipif(not block_cache.available(), reason="no kernel library on this CPU")

# Big enough that activations (8 x 128 x 128 fp32 = 512 KiB) and the loss's chunks pass the cache's 64 KiB minimum.
BATCH, SEQ = 8, 128


def _model_and_batch():
    cfg = get_preset("tiny", hidden_size=128, vocab_size=512)
    model = build_model(cfg, seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return model, ids


def _train(
    steps: int, cached: bool, monkeypatch
) -> tuple[list[float], list[torch.Tensor], list[block_cache.Stats | None]]:
    monkeypatch.setitem(block_cache._state, "available", cached)
    model, ids = _model_and_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, stats = [], []
    for _ in range(steps):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        assert not block_cache.active(), "the cache must end with the backward"
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        stats.append(block_cache.stats())  # None without the cache
    return losses, [p.detach().clone() for p in model.parameters()], stats


def test_training_steps_reuse_blocks_with_identical_values(monkeypatch):
    """Losses and parameters bit for bit equal with and without the cache; from the third step on, every large block
    of the step is a freed one reused (no new memory)."""
    plain_losses, plain_params, _ = _train(4, False, monkeypatch)
    losses, params, stats = _train(4, True, monkeypatch)
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params, strict=True))
    assert stats[1].hits > stats[0].hits
    assert stats[3].misses == stats[2].misses, "a steady step takes no new memory"
    assert stats[3].hits - stats[2].hits > 20


def test_inference_and_code_outside_a_step_allocate_as_before(monkeypatch):
    monkeypatch.setitem(block_cache._state, "available", True)
    model, ids = _model_and_batch()
    before = block_cache.stats()
    with torch.no_grad():
        model(ids)  # no gradients: not a training forward
    torch.empty(1 << 20).fill_(1.0)
    after = block_cache.stats()
    assert (after.hits, after.misses) == (before.hits, before.misses)
    assert not block_cache.active()


def test_backward_is_served_until_it_reaches_the_embeddings(monkeypatch):
    monkeypatch.setitem(block_cache._state, "available", True)
    model, ids = _model_and_batch()
    seen = []

    def watch_gradient(_module, _inputs, out: torch.Tensor) -> None:  # a middle layer's gradient: mid-backward
        out.register_hook(lambda grad: seen.append(block_cache.active()))

    layer_out = model.model.layers[1].register_forward_hook(watch_gradient)
    loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    assert not block_cache.active(), "the forward ends its own scope"
    loss.backward()
    layer_out.remove()
    assert seen == [True]
    assert not block_cache.active()

    # A backward that stops short of the embeddings (only the LM head's gradient) ends at the next training forward.
    loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    torch.autograd.grad(loss, [model.lm_head.weight])
    assert block_cache.active()
    model(ids[:, :-1], labels=ids[:, 1:])
    assert not block_cache.active()


def test_blocks_unused_for_a_step_are_released_and_the_limit_holds(monkeypatch):
    monkeypatch.setitem(block_cache._state, "available", True)
    model, ids = _model_and_batch()

    def step(T: int) -> None:
        model(ids[:, :T], labels=ids[:, 1:T + 1]).loss.backward()

    try:
        block_cache.release()
        step(SEQ)
        step(SEQ)
        long_steps = block_cache.stats().cached_bytes
        for _ in range(3):  # shorter sequences: the long steps' blocks go unused
            step(SEQ // 4)
        assert block_cache.stats().cached_bytes < long_steps / 2

        torch.ops.openk2_kernels.block_cache_install(256 << 10)
        step(SEQ)
        assert block_cache.stats().cached_bytes <= 256 << 10
    finally:
        torch.ops.openk2_kernels.block_cache_install(block_cache.MAX_CACHED_BYTES)
    block_cache.release()
    assert block_cache.stats().cached_bytes == 0


def test_switched_off_by_the_environment():
    code = ("from openk2.model import block_cache, few_rows; "
            "print(few_rows.library_loaded(), block_cache.available(), block_cache.stats())")
    env = {**os.environ, "OPENK2_BLOCK_CACHE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "None"]


def test_rl_log_probs_backward_is_served_too(monkeypatch):
    """`rl.logprobs.token_logprobs` projects `hidden_states` itself: its backward opens the cache as the loss's does."""
    from openk2.rl.logprobs import token_logprobs

    monkeypatch.setitem(block_cache._state, "available", True)
    model, ids = _model_and_batch()
    seen = []

    def watch_gradient(_module, _inputs, out: torch.Tensor) -> None:
        out.register_hook(lambda grad: seen.append(block_cache.active()))

    hook = model.model.layers[1].register_forward_hook(watch_gradient)
    before = block_cache.stats()
    logp = token_logprobs(model, ids.tolist(), [SEQ // 2] * BATCH)
    logp.sum().backward()
    hook.remove()
    assert seen == [True] and not block_cache.active()
    assert block_cache.stats().hits + block_cache.stats().misses > before.hits + before.misses
