"""`token_logprobs`: the trainer's per-token log-probs, batched with padding, against a naive loop."""

from __future__ import annotations

import pytest
import torch

from openk2.model import build_model, get_preset
from openk2.rl.logprobs import response_mask, token_logprobs

V = 320


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny", vocab_size=V), seed=0).eval()


def _seqs(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [(4, 7), (9, 2), (1, 11), (6, 0)]  # (prompt, response)
    return ([torch.randint(0, V, (p + r,), generator=g).tolist() for p, r in lengths], [p for p, _ in lengths])


def _naive(model, seq, n_prompt, temperature):
    logits_TV = model(torch.tensor([seq])).logits[0].float() / temperature
    lsm_TV = torch.log_softmax(logits_TV, dim=-1)
    return torch.stack([lsm_TV[t - 1, seq[t]] for t in range(n_prompt, len(seq))]) if len(seq) > n_prompt \
        else torch.zeros(0)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_batched_equals_a_naive_per_sequence_loop(model, temperature):
    seqs, prompt_lens = _seqs()
    with torch.no_grad():
        logp_BR = token_logprobs(model, seqs, prompt_lens, temperature=temperature, chunk_rows=5)
        mask_BR = response_mask(prompt_lens, [len(s) for s in seqs])
        for b, (seq, n) in enumerate(zip(seqs, prompt_lens, strict=True)):
            ref = _naive(model, seq, n, temperature)
            torch.testing.assert_close(logp_BR[b, : len(ref)], ref, atol=2e-5, rtol=0)
            assert mask_BR[b].sum() == len(ref)
    assert logp_BR.dtype == torch.float32 and logp_BR.shape == (4, 11)
    assert (logp_BR[~mask_BR] == 0).all()


def test_gradients_flow_and_match_the_naive_loop(model):
    seqs, prompt_lens = _seqs(seed=1)
    model.zero_grad()
    token_logprobs(model, seqs, prompt_lens, chunk_rows=4).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sum(_naive(model, s, n, 1.0).sum() for s, n in zip(seqs, prompt_lens, strict=True)).backward()
    assert grads and grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-3)
    model.zero_grad()


def test_bad_input_is_named(model):
    with pytest.raises(ValueError, match="prompt lengths"):
        token_logprobs(model, [[1, 2]], [1, 1])
    with pytest.raises(ValueError, match="prompt length 0"):
        token_logprobs(model, [[1, 2]], [0])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, [[1, 2]], [1], temperature=0.0)
    with pytest.raises(ValueError, match=r"\[0, 320\)"):
        token_logprobs(model, [[1, 400]], [1])
