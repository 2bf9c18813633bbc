"""The slot cache and the continuous-batching engine against the model's own cached generation."""

from __future__ import annotations

import time

import pytest
import torch

from openk2.model import build_model, get_preset
from openk2.serve.engine import Engine, FinishEvent, PromptLogprobsEvent, SamplingParams, TokenEvent
from openk2.serve.slot_cache import SlotKVCache

V = 320


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny", vocab_size=V), seed=0).eval()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_slot_cache_padding_anywhere_gives_the_unpadded_logits(model):
    cfg = model.config
    prompt = _prompts([7])[0]
    with torch.inference_mode():
        ref = model(torch.tensor([prompt])).logits[0]
        cache = SlotKVCache(cfg.num_hidden_layers, 2, 32, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                            torch.device("cpu"), torch.float32)
        # Row 1 gets the prompt with padding in the middle and at both ends; row 0 a shorter prompt.
        ids = torch.zeros(2, 12, dtype=torch.long)
        valid = torch.zeros(2, 12, dtype=torch.bool)
        where = [1, 2, 5, 6, 7, 9, 10]
        ids[1, where] = torch.tensor(prompt)
        valid[1, where] = True
        ids[0, -3:] = torch.tensor(prompt[:3])
        valid[0, -3:] = True
        view = cache.rows(0, 2)
        out = model(ids, position_ids_BT=view.positions(valid), cache=view, valid_BT=valid).logits
    assert cache.lengths == [3, 7]
    torch.testing.assert_close(out[1, where], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, -3:], ref[:3], atol=1e-5, rtol=1e-5)


def test_slot_cache_move_and_overflow(model):
    cfg = model.config
    cache = SlotKVCache(cfg.num_hidden_layers, 3, 8, 4, torch.device("cpu"), torch.float32)
    cache.latent_NBSL[:, 2, :5] = 1.0
    cache.lengths[2] = 5
    cache.move(2, 0)
    assert cache.lengths == [5, 0, 0] and bool((cache.latent_NBSL[:, 0, :5] == 1).all())
    view = cache.rows(0, 1)
    with pytest.raises(ValueError, match="overflow"):
        view.begin_chunk(torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        cache.rows(2, 4)


def test_continuous_batching_greedy_equals_generate(model):
    prompts = _prompts([5, 9, 3, 12, 7, 1, 30, 2, 4, 16])
    ref = [model.generate([p], 12)[0, len(p):].tolist() for p in prompts]
    with Engine(model, max_batch=4, max_len=64) as engine:
        gens = [engine.submit(p, SamplingParams(max_tokens=12)) for p in prompts[:3]]
        _wait(lambda: engine.stats.decode_steps >= 3)  # join while others are mid-generation
        gens += [engine.submit(p, SamplingParams(max_tokens=12)) for p in prompts[3:]]
        outs = [g.result() for g in gens]
        stats = engine.stats
    assert [ids for ids, _ in outs] == ref
    assert all(f.reason == "length" and f.n_generated == 12 for _, f in outs)
    # Batched: far fewer decode steps than tokens, and never more rows than max_batch.
    assert stats.decode_steps < stats.decode_tokens / 2
    assert stats.batch_size_sum / stats.decode_steps <= 4


def test_stop_tokens_finish_early(model):
    prompt = _prompts([6])[0]
    free = model.generate([prompt], 10)[0, 6:].tolist()
    stop = free[4]
    with Engine(model, max_batch=2, max_len=64) as engine:
        ids, fin = engine.submit(prompt, SamplingParams(max_tokens=10, stop_token_ids=frozenset({stop}))).result()
    first = free.index(stop)
    assert ids == free[:first]
    assert (fin.reason, fin.stop_token_id, fin.n_generated) == ("stop", stop, first + 1)


def test_logprobs_are_the_models_log_softmax(model):
    prompt = _prompts([8])[0]
    with Engine(model, max_batch=2, max_len=64) as engine:
        events = list(engine.submit(prompt, SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=2)))
    assert isinstance(events[0], PromptLogprobsEvent) and isinstance(events[-1], FinishEvent)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    full = prompt + [e.token_id for e in tokens]
    with torch.no_grad():
        lsm = model(torch.tensor([full])).logits[0].log_softmax(-1)
    entries = events[0].entries
    assert entries[0] is None and len(entries) == len(prompt)
    for t in range(1, len(prompt)):
        assert entries[t].token_id == prompt[t]
        assert entries[t].logprob == pytest.approx(float(lsm[t - 1, prompt[t]]), abs=1e-4)
        assert [i for i, _ in entries[t].top] == lsm[t - 1].topk(2).indices.tolist()
    for k, e in enumerate(tokens):
        pos = len(prompt) - 1 + k
        assert e.logprob.logprob == pytest.approx(float(lsm[pos, e.token_id]), abs=1e-4)
        assert e.token_id == e.logprob.top[0][0]  # greedy picks the most likely token
        assert len(e.logprob.top) == 3


def test_seeded_sampling_is_reproducible_and_ignores_batch_companions(model):
    prompt = _prompts([5])[0]
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=123)
    with Engine(model, max_batch=4, max_len=64) as engine:
        alone = engine.submit(prompt, params).result()[0]
        others = [engine.submit(p, SamplingParams(max_tokens=10, temperature=1.0)) for p in _prompts([3, 8], 1)]
        together = engine.submit(prompt, params).result()[0]
        for g in others:
            g.result()
        different = engine.submit(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=124)).result()[0]
    assert alone == together
    assert alone != different


def test_logit_bias_bans_and_vocab_limit(model):
    prompt = _prompts([5])[0]
    greedy = model.generate([prompt], 1)[0, -1].item()
    with Engine(model, max_batch=2, max_len=64, vocab_limit=100) as engine:
        banned = engine.submit(prompt, SamplingParams(max_tokens=1, banned_token_ids=(greedy,))).result()[0]
        forced = engine.submit(prompt, SamplingParams(max_tokens=3, logit_bias=((42, 100.0),))).result()[0]
        sampled = engine.submit(prompt, SamplingParams(max_tokens=30, temperature=2.0, seed=0)).result()[0]
    assert banned[0] != greedy
    assert forced == [42, 42, 42]
    assert max(sampled) < 100


def test_cancel_frees_the_row_and_engine_keeps_serving(model):
    prompt = _prompts([4])[0]
    with Engine(model, max_batch=1, max_len=256) as engine:
        gen = engine.submit(prompt, SamplingParams(max_tokens=250))
        waiting = engine.submit(prompt, SamplingParams(max_tokens=3))  # needs the only row
        first = next(iter(gen))
        assert isinstance(first, TokenEvent)
        gen.cancel()
        ids, fin = waiting.result()
        assert len(ids) == 3 and fin.reason == "length"
        rest = list(gen)
        assert isinstance(rest[-1], FinishEvent) and rest[-1].reason == "cancelled"
        assert rest[-1].n_generated < 250
        _wait(lambda: engine.n_active == 0)
        assert engine.stats.cancelled == 1


def test_a_failing_forward_fails_its_requests_only(model, monkeypatch):
    prompt = _prompts([4])[0]
    with Engine(model, max_batch=2, max_len=64) as engine:
        original = type(model).forward
        calls = {"n": 0}

        def flaky(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            return original(self, *a, **kw)

        monkeypatch.setattr(type(model), "forward", flaky)
        ids, fin = engine.submit(prompt, SamplingParams(max_tokens=3)).result()
        assert fin.reason == "error" and "boom" in fin.error and ids == []
        monkeypatch.setattr(type(model), "forward", original)
        ids, fin = engine.submit(prompt, SamplingParams(max_tokens=3)).result()
        assert fin.reason == "length" and len(ids) == 3
        assert engine.stats.errors == 1 and engine.n_active == 0


def test_submit_validates(model):
    with Engine(model, max_batch=2, max_len=16) as engine:
        with pytest.raises(ValueError, match="context"):
            engine.submit([1] * 10, SamplingParams(max_tokens=7))
        with pytest.raises(ValueError, match="empty"):
            engine.submit([], SamplingParams(max_tokens=1))
        with pytest.raises(ValueError, match="token ids"):
            engine.submit([V], SamplingParams(max_tokens=1))
        ids, fin = engine.submit([1] * 10, SamplingParams(max_tokens=0, prompt_logprobs=0)).result()
        assert ids == [] and fin.reason == "length"
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=1, top_p=0.0)
    with pytest.raises(RuntimeError, match="not running"):
        Engine(model, max_batch=1, max_len=16).submit([1], SamplingParams(max_tokens=1))


def test_extreme_sampling_settings_are_safe_and_isolated(model):
    # temperature 1e-300 and top_p 1e-46 once made the probabilities NaN and failed the whole batch.
    prompts = _prompts([5, 7, 6], 3)
    greedy_ref = [model.generate([p], 8)[0, len(p):].tolist() for p in prompts]
    with Engine(model, max_batch=4, max_len=64) as engine:
        gens = [engine.submit(prompts[0], SamplingParams(max_tokens=8, temperature=1e-300, seed=1)),
                engine.submit(prompts[1], SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-46, seed=1)),
                engine.submit(prompts[2], SamplingParams(max_tokens=8))]
        outs = [g.result() for g in gens]
        huge_seed = engine.submit(prompts[0], SamplingParams(max_tokens=2, temperature=1.0, seed=10**23)).result()
    assert all(f.reason == "length" for _, f in outs) and huge_seed[1].reason == "length"
    # Tiny temperature is greedy; a tiny top_p keeps only the most likely token, which is greedy too.
    assert [ids for ids, _ in outs] == greedy_ref


def test_a_failure_in_one_sequence_leaves_the_others_unchanged(model, monkeypatch):
    from openk2.serve import engine as engine_mod

    prompts = _prompts([5, 9, 3, 6], 4)
    sampled = SamplingParams(max_tokens=10, temperature=1.0, seed=5)
    with Engine(model, max_batch=4, max_len=64) as engine:
        alone = [engine.submit(p, sampled).result()[0] for p in prompts[:3]]
        real_sample, real_forward = engine_mod.sample_token, type(model).forward
        bad_token = prompts[3][-1]

        def flaky_sample(logits_V, temperature, top_p, generator):
            if temperature == 0.5:  # the hostile request's marker
                raise RuntimeError("poisoned sampling")
            return real_sample(logits_V, temperature, top_p, generator)

        def flaky_forward(self, ids_BT, *a, **kw):
            if (ids_BT == 7).any() and ids_BT.shape[1] == 1:  # decode of the row whose last token is 7
                raise RuntimeError("poisoned forward")
            return real_forward(self, ids_BT, *a, **kw)

        monkeypatch.setattr(engine_mod, "sample_token", flaky_sample)
        monkeypatch.setattr(type(model), "forward", flaky_forward)
        gens = [engine.submit(p, sampled) for p in prompts[:3]]
        hostile = engine.submit(prompts[3], SamplingParams(max_tokens=10, temperature=0.5))
        forced = engine.submit([bad_token, 7], SamplingParams(max_tokens=5, logit_bias=((7, 100.0),)))
        outs = [g.result() for g in gens]
        h_ids, h_fin = hostile.result()
        f_ids, f_fin = forced.result()
    assert [ids for ids, _ in outs] == alone and all(f.reason == "length" for _, f in outs)
    assert h_fin.reason == "error" and "poisoned sampling" in h_fin.error and h_ids == []
    assert f_fin.reason == "error" and "poisoned forward" in f_fin.error and f_ids == [7]
