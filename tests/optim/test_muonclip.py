"""MuonClip as an optimizer: groups, bad input, skipped steps, accumulation, state dict, training."""

import copy
import io

import pytest
import torch
from torch import nn

from openk2.model import build_model, get_preset
from openk2.optim import MuonClip, moonlight_classifier


def tiny(**kw):
    return build_model(get_preset("tiny", **kw), seed=0)


def batch(seed=0, B=2, T=33):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def fwd_bwd(model, ids_BT):
    loss = model(ids_BT[:, :-1], labels=ids_BT[:, 1:]).loss
    loss.backward()
    return float(loss.detach())


def test_groups_come_from_the_model_by_name():
    model = tiny()
    opt = MuonClip(model, lr=0.01)
    kinds = {g["kind"]: dict(zip(g["param_names"], g["params"], strict=True)) for g in opt.param_groups}
    assert set(kinds["muon"]) == {n for n, _ in model.param_groups()["muon"]}
    assert "model.layers.1.mlp.experts.gate_proj" in kinds["muon"] and "lm_head.weight" in kinds["adamw"]
    assert len(opt.attention_layers) == 3 and all(a.max_logit_H is None for a in opt.attention_layers)


def test_parameters_missing_from_every_group_are_named():
    model = tiny()
    groups = model.param_groups()
    muon = [p for n, p in groups["muon"]]
    adamw = [p for n, p in groups["adamw"] if n != "lm_head.weight"]
    with pytest.raises(ValueError, match=r"no optimizer group: \['lm_head.weight'\]"):
        MuonClip(model, lr=0.01, params={"muon": muon, "adamw": adamw})
    with pytest.raises(ValueError, match="more than one group"):
        MuonClip(model, lr=0.01, params={"muon": muon, "adamw": adamw + muon[:1] + [model.lm_head.weight]})
    with pytest.raises(ValueError, match=r"no optimizer group: \[.*norm"):
        MuonClip(model, lr=0.01, classify=lambda n, p: "muon" if p.ndim >= 2 and "embed" not in n and "lm_head"
                 not in n else ("adamw" if "embed" in n or "lm_head" in n else None))
    with pytest.raises(ValueError, match="Muon needs 2-D"):
        MuonClip(model, lr=0.01, classify=lambda n, p: "muon")


def test_model_without_recognized_attention_needs_tau_none():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="no attention module QK-Clip recognizes.*qk_clip_tau=None"):
        MuonClip(mlp, lr=0.01, classify=moonlight_classifier)
    opt = MuonClip(mlp, lr=0.01, classify=moonlight_classifier, qk_clip_tau=None)
    mlp(torch.randn(3, 8)).sum().backward()
    w0 = mlp[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(mlp[0].weight, w0)
    assert [g["kind"] for g in opt.param_groups] == ["muon", "adamw"]
    with pytest.raises(ValueError, match="param_groups"):
        MuonClip(mlp, lr=0.01, qk_clip_tau=None)


def test_non_finite_gradients_skip_the_step_and_are_reported():
    model = tiny()
    opt = MuonClip(model, lr=0.05)
    fwd_bwd(model, batch())
    opt.step()
    opt.zero_grad()
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    fwd_bwd(model, batch(1))
    model.model.layers[1].mlp.experts.up_proj.grad[0, 0, 0] = float("nan")
    model.model.norm.weight.grad[3] = float("inf")
    opt.step()
    assert opt.last_stats["skipped"] and opt.last_stats["skipped_steps"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # weights and router biases untouched
    after = opt.state_dict()
    for k, s in state["state"].items():
        for name, t in s.items():
            assert torch.equal(after["state"][k][name], t)
    assert all(a.max_logit_H is None for a in opt.attention_layers)
    opt.zero_grad()
    fwd_bwd(model, batch(2))
    opt.step()
    assert not opt.last_stats["skipped"] and opt.last_stats["skipped_steps"] == 1


def test_gradient_accumulation_clips_on_the_max_over_micro_batches():
    model = tiny()
    opt = MuonClip(model, lr=0.01, qk_clip_tau=1e9)
    per_batch = []
    for seed in (0, 1, 2):
        fwd_bwd(model, batch(seed, B=1))
        per_batch.append(torch.stack([a.max_logit_H.clone() for a in opt.attention_layers]))
        if seed < 2:  # what each micro-batch alone would record
            for a in opt.attention_layers:
                a.max_logit_H = None
    for a in opt.attention_layers:
        a.max_logit_H = None
    for seed in (0, 1, 2):
        fwd_bwd(model, batch(seed, B=1))
    opt.step()
    expected = torch.stack(per_batch).amax(dim=0).amax(dim=1)
    assert opt.last_stats["max_logit_per_layer"] == pytest.approx(expected.tolist())


def test_validation_forwards_between_steps_are_not_recorded():
    model = tiny()
    opt = MuonClip(model, lr=0.01)
    model.eval()
    with torch.no_grad():
        model(batch()[:, :-1])
    model.train()
    with torch.no_grad():
        model(batch()[:, :-1])
    assert all(a.max_logit_H is None for a in opt.attention_layers)
    fwd_bwd(model, batch())
    assert all(a.max_logit_H is not None for a in opt.attention_layers)


def test_expert_bias_update_is_triggered_and_switchable():
    for enabled in (True, False):
        model = tiny()
        opt = MuonClip(model, lr=0.01, update_expert_biases=enabled)
        fwd_bwd(model, batch())
        opt.step()
        bias = model.moe_layers()[0].gate.e_score_correction_bias
        assert bool(bias.abs().sum() > 0) == enabled
        assert (opt.last_stats["max_load_ratio"] >= 1) == enabled


def test_state_dict_round_trips_exactly():
    model = tiny()
    opt = MuonClip(model, lr=0.02, qk_clip_tau=0.05)  # a low tau so clipping is part of the trajectory
    for seed in range(3):
        fwd_bwd(model, batch(seed))
        opt.step()
        opt.zero_grad()
    assert opt.last_stats["clipped_heads"] > 0
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    model2 = tiny()
    model2.load_state_dict(saved["model"])
    opt2 = MuonClip(model2, lr=0.02, qk_clip_tau=0.05)
    opt2.load_state_dict(saved["opt"])
    assert opt2.steps == opt.steps == 3
    for seed in (10, 11):
        for m, o in ((model, opt), (model2, opt2)):
            fwd_bwd(m, batch(seed))
            o.step()
            o.zero_grad()
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    swapped = {**saved["opt"], "param_groups": saved["opt"]["param_groups"][::-1]}
    with pytest.raises(ValueError, match="groups"):
        opt2.load_state_dict(swapped)


def test_twenty_steps_lower_the_loss():
    model = tiny()
    opt = MuonClip(model, lr=0.02, qk_clip_tau=100.0)
    ids_BT = batch(0, B=4, T=65)
    losses = []
    for _ in range(20):
        losses.append(fwd_bwd(model, ids_BT))
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < 0.6 * losses[0], losses
    assert opt.last_stats["skipped_steps"] == 0


def test_closure_and_bad_hyperparameters():
    model = tiny()
    opt = MuonClip(model, lr=0.01)
    ids_BT = batch()

    def closure():
        opt.zero_grad()
        return model(ids_BT[:, :-1], labels=ids_BT[:, 1:]).loss.backward() or torch.tensor(1.0)

    assert float(opt.step(closure)) == 1.0
    for bad in (dict(adjust_lr="spectral"), dict(qk_clip_tau=0.0), dict(momentum=1.0), dict(lr=-1.0)):
        with pytest.raises(ValueError):
            MuonClip(model, **{"lr": 0.01, **bad})
