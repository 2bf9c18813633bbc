"""The shared decode step (`openk2.model.decode`) against the eager reference path: the step's math uncompiled,
traced by Dynamo without graph breaks (backend "eager": fast), once through Inductor, and the fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch

import openk2.model.decode as decode_module
from openk2.model import K2Model, build_model, get_preset, huge_pages, matmul
from openk2.model.decode import DecodeStep, decode_forward, window_size
from openk2.model.moe import stable_order, top_k_by_argmax
from openk2.serve.engine import Engine, SamplingParams

V = 256


def _model(**overrides) -> K2Model:
    model = build_model(get_preset("tiny", initializer_range=0.1, **overrides), seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.copy_(0.1 * torch.randn(m.gate.e_score_correction_bias.shape, generator=gen))
    return model


def _install(model: K2Model, step: DecodeStep) -> DecodeStep:
    """Make `step` the model's shared compiled step (what `decode_step(model, True)` returns)."""
    model.__dict__.setdefault("_decode_steps", {})[True] = step
    return step


@pytest.fixture(autouse=True)
def _clean_compile_state():
    decode_module.reset_compile_failure()
    yield
    decode_module.reset_compile_failure()


def test_onednn_linear_matches_aten_linear():
    if not matmul.ENABLED:
        pytest.skip("torch built without oneDNN")
    g = torch.Generator().manual_seed(0)
    for rows in (1, 8):
        x_BK, w_NK = torch.randn(rows, 512, generator=g), torch.randn(1024, 512, generator=g)
        torch.testing.assert_close(decode_module._linear(x_BK, w_NK), x_BK @ w_NK.T, atol=1e-4, rtol=1e-5)


def test_window_sizes():
    assert [window_size(n) for n in (0, 1, 64, 65, 128, 129, 1000)] == [64, 64, 64, 128, 128, 256, 1024]


# gathered experts / every expert; every matmul through oneDNN (where built in) instead of only the large ones;
# attention through the kernel library's op (where it builds) / as the reductions the step compiles otherwise
@pytest.mark.parametrize(("batch", "dense", "onednn", "kernel_attention"), [
    (1, False, False, True), (5, False, False, True), (5, False, False, False), (5, True, False, True),
    (5, True, True, True)])
def test_decode_forward_matches_reference_step(batch, dense, onednn, kernel_attention, monkeypatch):
    monkeypatch.setattr(decode_module, "_LATENT_ATTENTION", kernel_attention)
    if dense:
        monkeypatch.setattr(decode_module, "_DENSE_ROUTING_MIN_FRACTION", 0.0)
    if onednn:
        monkeypatch.setattr(decode_module, "_ONEDNN_MIN_ELEMENTS", 0)
    model = _model(n_routed_experts=8, num_experts_per_tok=2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (7, 3, 9, 1, 5)[:batch]]
    from openk2.model.generate import left_pad

    ids_BT, valid_BT = left_pad(prompts)
    T = ids_BT.shape[1]
    pos_BT = (valid_BT.long().cumsum(1) - 1).clamp(min=0)
    tok_B = torch.randint(0, V, (batch,), generator=g)
    with torch.inference_mode():
        cache = model.new_cache(batch, 64)
        model(ids_BT, position_ids_BT=pos_BT, cache=cache, valid_BT=valid_BT)
        model._cos_sin(pos_BT, torch.float32)
        logits_BV, new_NBL = decode_forward(model, model._rope[0], cache.latent_NBSL, cache.key_valid_BS, tok_B,
                                            pos_BT[:, -1] + 1)
        ref_BV = model(tok_B[:, None], position_ids_BT=pos_BT[:, -1:] + 1, cache=cache,
                       valid_BT=torch.ones(batch, 1, dtype=torch.bool)).logits[:, -1]
    torch.testing.assert_close(logits_BV, ref_BV, atol=1e-5, rtol=1e-5)
    # The reference stored the same latents at position T.
    torch.testing.assert_close(new_NBL, cache.latent_NBSL[:, :, T], atol=1e-6, rtol=1e-6)


def test_traced_step_generates_the_eager_tokens_without_graph_breaks():
    """Dynamo's "eager" backend traces the step with fullgraph=True (a graph break raises) without Inductor."""
    model = _model()
    step = _install(model, DecodeStep(model, compile=True, backend="eager"))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    ref = model.generate(prompts, 12, compile=False)
    assert torch.equal(model.generate(prompts, 12, compile=True), ref)
    assert list(step.compile_seconds) == [(2, 64)] and step.eager_fallbacks == 0
    # Sampling goes through the same step: equal generator seeds give equal tokens.
    a = model.generate(prompts, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompts, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3),
                       compile=False)
    assert torch.equal(a, b)


def test_engine_decodes_through_the_shared_step():
    model = _model()
    step = _install(model, DecodeStep(model, compile=True, backend="eager"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 9, 3)]
    ref = [model.generate([p], 8, compile=False)[0, len(p):].tolist() for p in prompts]
    with Engine(model, max_batch=4, max_len=48, compile=True) as engine:
        outs = [engine.submit(p, SamplingParams(max_tokens=8)).result()[0] for p in prompts[:1]]
        gens = [engine.submit(p, SamplingParams(max_tokens=8)) for p in prompts[1:]]
        outs += [gen.result()[0] for gen in gens]
    assert outs == ref
    # Batches padded to powers of two (1, 2 and then 2 rows of 4 slots), one window (48 < 64: capped).
    assert set(step.compile_seconds) <= {(1, 48), (2, 48)} and step.eager_fallbacks == 0


def test_compile_failure_falls_back_to_eager_with_one_warning():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    model = _model()
    _install(model, DecodeStep(model, compile=True, backend=broken_backend))
    ref = model.generate([[1, 2, 3]], 6, compile=False)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        out = model.generate([[1, 2, 3]], 6, compile=True)
    assert torch.equal(out, ref)
    other = _model()
    _install(other, DecodeStep(other, compile=True, backend=broken_backend))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the platform is known not to compile
        assert torch.equal(other.generate([[1, 2, 3]], 6, compile=True), ref)


def test_graph_budget_falls_back_instead_of_recompiling():
    model = _model()
    step = _install(model, DecodeStep(model, compile=True, max_graphs=1, backend="eager"))
    model.generate([[1, 2, 3]], 4, compile=True)
    ref = model.generate([[1, 2, 3], [4, 5]], 4, compile=False)
    with pytest.warns(RuntimeWarning, match="1 graphs compiled already"):
        out = model.generate([[1, 2, 3], [4, 5]], 4, compile=True)  # batch 2: a new shape
    assert torch.equal(out, ref)
    assert len(step.compile_seconds) == 1 and step.eager_fallbacks == 3


def test_compile_switch():
    assert decode_module.compile_enabled(True) and not decode_module.compile_enabled(False)
    with pytest.raises(ValueError):
        decode_module.compile_enabled("yes")


@pytest.mark.slow
@pytest.mark.parametrize("onednn", [False, True])
def test_inductor_step_equals_eager(onednn, monkeypatch):
    """Real Inductor compiles (C++ kernels on CPU), on a 1-layer MoE model to keep compile time down; with
    every multi-row matmul through our oneDNN op (an extern kernel of the graph, on the live weights) or none."""
    monkeypatch.setattr(decode_module, "_ONEDNN_MIN_ELEMENTS", 0 if onednn else float("inf"))
    model = _model(num_hidden_layers=2, first_k_dense_replace=1)
    step = _install(model, DecodeStep(model, compile=True))
    prompts = [[1, 2, 3, 4], [5, 6]]
    ref = model.generate(prompts, 10, compile=False)
    out = model.generate(prompts, 10, compile=True)
    if not step.compiled:
        pytest.skip("torch.compile is not available on this machine")
    assert torch.equal(out, ref)
    # One row: every product an Inductor reduction (`_REDUCTION_PRODUCTS`) instead of a library call.
    assert torch.equal(model.generate(prompts[:1], 10, compile=True), model.generate(prompts[:1], 10, compile=False))
    assert list(step.compile_seconds) == [(2, 64), (1, 64)]
    # Logits of one step within fp32 tolerance of the uncompiled step.
    cache = model.new_cache(2, 64)
    with torch.inference_mode():
        model(torch.tensor([[1, 2], [3, 4]]), cache=cache)
        args = (cache.latent_NBSL, cache.key_valid_BS, torch.tensor([7, 8]), torch.tensor([2, 2]))
        compiled_BV, compiled_NBL = step(*args)
        eager_BV, eager_NBL = decode_forward(model, model._rope[0], *args)
    torch.testing.assert_close(compiled_BV, eager_BV, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_NBL, eager_NBL, atol=1e-5, rtol=1e-5)


def test_greedy_step_stops_at_eos_like_the_eager_path():
    """The greedy graph checks for all-finished rows every few tokens only; the result is cut where the eager
    path (which checks every token) stops, with finished rows padded the same way."""
    model = _model()
    _install(model, DecodeStep(model, compile=True, backend="eager"))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    free = model.generate(prompts, 20, compile=False)[:, -20:]
    in_every_row = set.intersection(*(set(row.tolist()) for row in free))
    stopping = min(in_every_row, key=lambda t: max(row.tolist().index(t) for row in free))
    lengths = set()
    for eos in (stopping, int(free[2, 0])):  # every row finishes (at different steps); one row finishes
        for pad in (None, 0):
            ref = model.generate(prompts, 20, eos_token_id=eos, pad_token_id=pad, compile=False)
            assert torch.equal(model.generate(prompts, 20, eos_token_id=eos, pad_token_id=pad, compile=True), ref)
            lengths.add(ref.shape[1])
    assert min(lengths) < 6 + 20 == max(lengths)  # the all-finished case stopped early


def test_models_of_different_shapes_do_not_share_graphs():
    """The step keeps Dynamo's guards on its inputs only: each DecodeStep must compile its own region, or a
    second model with other weight shapes but the same cache shape would run the first one's graph."""
    a = _model()
    b = _model(num_attention_heads=2, num_key_value_heads=2)
    for m in (a, b):
        _install(m, DecodeStep(m, compile=True, backend="eager"))
    for m in (a, b, a):
        assert torch.equal(m.generate([[1, 2, 3]], 5, compile=True), m.generate([[1, 2, 3]], 5, compile=False))
    # In-place weight updates (RL) are seen by a compiled graph: the parameters are read at each call.
    with torch.no_grad():
        a.lm_head.weight.mul_(-1.0)
    assert torch.equal(a.generate([[1, 2, 3]], 5, compile=True), a.generate([[1, 2, 3]], 5, compile=False))


def test_cpp_wrapper_failure_retries_with_the_python_wrapper(monkeypatch):
    """A toolchain that builds Inductor's kernels but not its C++ wrapper: the step recompiles with the Python
    wrapper (here a stand-in for Inductor: only the retry logic around it is under test), no eager fallback."""
    model = _model()
    step = _install(model, DecodeStep(model, compile=True, cpp_wrapper=True))
    traced = DecodeStep(model, compile=True, backend="eager")
    real = traced._compiled_fn
    seen = []

    def fake_compiled_fn(kind):
        seen.append(step.cpp_wrapper)
        if step.cpp_wrapper:
            def fail(*args):
                raise RuntimeError("C++ wrapper compile error")
            return fail
        return real(kind)

    monkeypatch.setattr(step, "_compiled_fn", fake_compiled_fn)
    ref = model.generate([[1, 2, 3]], 6, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "torch.compile failed" warning
        assert torch.equal(model.generate([[1, 2, 3]], 6, compile=True), ref)
    assert seen[:2] == [True, False] and not step.cpp_wrapper and step.eager_fallbacks == 0


@pytest.mark.parametrize("groups", [dict(), dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)])
def test_in_graph_routing_chooses_the_routers_experts(groups):
    """The compiled CPU step's routing (`_route`: logits as a reduction, top-k as rounds of argmax) picks the
    router's experts with its gate weights, group-limited selection included; the slots' order by expert
    (`stable_order`) equals a stable argsort, repeated experts and all."""
    model = _model(**groups)
    x_BD = torch.randn(8, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for moe in model.moe_layers():
        ids_BK, weights_BK, _ = moe.gate(x_BD)
        compiled = torch.compile(decode_module._route, backend="eager", fullgraph=True)
        got_ids_BK, got_weights_BK = compiled(moe.gate, x_BD)
        ids_sorted_BK, order_BK = ids_BK.sort(dim=-1)
        got_sorted_BK, got_order_BK = got_ids_BK.sort(dim=-1)
        assert torch.equal(got_sorted_BK, ids_sorted_BK)
        torch.testing.assert_close(got_weights_BK.gather(1, got_order_BK), weights_BK.gather(1, order_BK))
    repeated_S = torch.randint(0, 4, (24,), generator=torch.Generator().manual_seed(4))
    for ids_S in (repeated_S, torch.zeros(5, dtype=torch.long), torch.tensor([3]), torch.arange(9).flip(0)):
        assert torch.equal(stable_order(ids_S), ids_S.argsort(stable=True))
    x_TE = torch.randn(6, 16, generator=torch.Generator().manual_seed(5))
    values_TK, indices_TK = top_k_by_argmax(x_TE, 4)
    assert torch.equal(values_TK, x_TE.topk(4).values) and torch.equal(indices_TK, x_TE.topk(4).indices)


@pytest.mark.slow
def test_direct_calls_skip_dynamo_and_see_the_live_weights(monkeypatch):
    """After a CPU graph's first call, later calls go to Inductor's graph directly (`direct_call`): with Dynamo's
    compiled function made to fail, generating still works, and it reads the weights as they are now, updated in
    place (RL) or replaced. The step's first call moved the large weights onto huge pages (`huge_pages`, made to
    take this model's small ones here)."""
    if huge_pages.thp_mode() != "unavailable":
        monkeypatch.setattr(huge_pages, "thp_mode", lambda: "madvise")
        monkeypatch.setattr(huge_pages, "MIN_BYTES", 16 * 1024)
    model = _model(num_hidden_layers=2, first_k_dense_replace=1)
    step = _install(model, DecodeStep(model, compile=True))
    prompts = [[1, 2, 3, 4], [5, 6]]
    out = model.generate(prompts, 8, compile=True)
    if not step.compiled:
        pytest.skip("torch.compile is not available on this machine")
    assert torch.equal(out, model.generate(prompts, 8, compile=False))
    if huge_pages.thp_mode() != "unavailable":
        assert model.lm_head.weight.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert [kind for kind, _ in step._direct] == ["greedy"]

    def no_dynamo(kind):
        raise AssertionError("called through Dynamo")

    monkeypatch.setattr(step, "_compiled_fn", no_dynamo)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    assert torch.equal(model.generate(prompts, 8, compile=True), model.generate(prompts, 8, compile=False))
    model.model.layers[1].self_attn.o_proj.weight = torch.nn.Parameter(
        torch.randn_like(model.model.layers[1].self_attn.o_proj.weight), requires_grad=False)
    assert torch.equal(model.generate(prompts, 8, compile=True), model.generate(prompts, 8, compile=False))
    # Arguments of another kind (here: outside inference mode) are Dynamo's to guard: no direct call for them.
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="called through Dynamo"):
        cache = model.new_cache(2, 64)
        assert step.greedy(cache.latent_NBSL, cache.key_valid_BS, torch.tensor([1, 2]), torch.tensor([0, 0]),
                           torch.tensor([False, False]), torch.tensor([0]), torch.tensor(-1), torch.tensor(0)) is None
