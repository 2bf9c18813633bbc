"""Muon math against the references: torch.optim.Muon, torch.optim.AdamW, a per-matrix loop."""

import pytest
import torch
from torch import nn

from openk2.optim import MuonClip, adjusted_lr_ratio, zeropower_via_newtonschulz
from openk2.optim.muon import plan_buckets


class Mats(nn.Module):
    """Bare parameters: Muon matrices of several shapes (wide, tall, square, two of one shape) and AdamW vectors."""

    def __init__(self, shapes):
        super().__init__()
        self.mats = nn.ParameterList(nn.Parameter(torch.randn(*s) * 0.1) for s in shapes)
        self.vecs = nn.ParameterList(nn.Parameter(torch.randn(n)) for n in (7, 13))


SHAPES_2D = [(24, 40), (40, 24), (32, 32), (24, 40), (8, 56)]


def _clone(module):
    clone = type(module).__new__(type(module))
    clone.__dict__ = {}
    nn.Module.__init__(clone)
    clone.mats = nn.ParameterList(nn.Parameter(p.detach().clone()) for p in module.mats)
    clone.vecs = nn.ParameterList(nn.Parameter(p.detach().clone()) for p in module.vecs)
    return clone


def _set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_2d_update_matches_torch_muon_in_bf16(adjust_lr, nesterov):
    ours_m = Mats(SHAPES_2D)
    ref_m = _clone(ours_m)
    kw = dict(lr=0.03, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    ours = MuonClip(ours_m, **kw, adjust_lr=adjust_lr, qk_clip_tau=None, ns_dtype=torch.bfloat16,
                    params={"muon": list(ours_m.mats), "adamw": list(ours_m.vecs)})
    ref = torch.optim.Muon(list(ref_m.mats), **kw, adjust_lr_fn=adjust_lr)
    init = [p.detach().clone() for p in ours_m.mats]
    for step in range(3):
        _set_grads(list(ours_m.mats), step)
        _set_grads(list(ref_m.mats), step)
        ours.step()
        ref.step()
    for a, b, a0 in zip(ours_m.mats, ref_m.mats, init, strict=True):
        assert not torch.equal(a, a0)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(ours.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"], rtol=0, atol=0)


def test_ns_batched_equals_single_and_is_near_orthogonal_in_fp32():
    G_EAB = torch.randn(6, 48, 80)
    batched = zeropower_via_newtonschulz(G_EAB, dtype=torch.float32)
    for e in range(6):
        torch.testing.assert_close(batched[e], zeropower_via_newtonschulz(G_EAB[e], dtype=torch.float32),
                                   rtol=1e-5, atol=1e-6)
    # Quintic NS5 maps singular values into roughly [0.7, 1.2] (not exactly 1: Keller Jordan's tuned coefficients).
    s = torch.linalg.svdvals(batched)
    assert s.min() > 0.5 and s.max() < 1.3
    tall = zeropower_via_newtonschulz(G_EAB.mT, dtype=torch.float32)
    torch.testing.assert_close(tall, batched.mT, rtol=1e-5, atol=1e-6)


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_EFD = nn.Parameter(torch.randn(5, 24, 40) * 0.1)
        self.w_EDF = nn.Parameter(torch.randn(5, 40, 24) * 0.1)


@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
def test_3d_expert_update_equals_per_matrix_loop(adjust_lr):
    model = Experts()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd, mu = 0.02, 0.1, 0.95
    opt = MuonClip(model, lr=lr, weight_decay=wd, momentum=mu, adjust_lr=adjust_lr, qk_clip_tau=None,
                   ns_dtype=torch.float32, params={"muon": list(model.parameters())})
    bufs = {n: torch.zeros_like(p) for n, p in init.items()}
    ref = {n: p.clone() for n, p in init.items()}
    for step in range(3):
        _set_grads(list(model.parameters()), step)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        for n in ref:  # the loop torch.optim.Muon would run, one expert matrix at a time
            for e in range(ref[n].shape[0]):
                bufs[n][e].lerp_(grads[n][e], 1 - mu)
                u = grads[n][e].lerp(bufs[n][e], mu)
                o = zeropower_via_newtonschulz(u, dtype=torch.float32)
                A, B = u.shape
                ref[n][e].mul_(1 - lr * wd).add_(o, alpha=-lr * adjusted_lr_ratio(A, B, adjust_lr))
    for n, p in model.named_parameters():
        assert not torch.equal(p, init[n])
        torch.testing.assert_close(p.detach(), ref[n], rtol=1e-5, atol=1e-6)


def test_one_ns_batch_per_oriented_shape():
    shapes = [torch.Size(s) for s in [(24, 40), (40, 24), (5, 24, 40), (32, 32), (5, 40, 24)]]
    buckets = plan_buckets(shapes)
    assert [b.indices for b in buckets] == [[0, 1, 2, 4], [3]]
    assert buckets[0].transposed == [False, True, False, True]
    assert sum(buckets[0].counts) == 12
    # A memory cap splits a bucket rather than building one huge stack.
    capped = plan_buckets(shapes, max_batch_elems=24 * 40 * 6)
    assert [b.indices for b in capped] == [[0, 1], [2], [3], [4]]


@pytest.mark.parametrize("impl", [{}, {"adamw_foreach": True}, {"adamw_foreach": False}, {"adamw_fused": False}])
def test_adamw_part_equals_torch_adamw(impl):
    ours_m = Mats(SHAPES_2D[:2])
    ref_m = _clone(ours_m)
    ours = MuonClip(ours_m, lr=3e-3, weight_decay=0.1, adamw_betas=(0.9, 0.95), adamw_eps=1e-8, qk_clip_tau=None,
                    params={"muon": list(ours_m.mats), "adamw": list(ours_m.vecs)}, **impl)
    ref = torch.optim.AdamW(list(ref_m.vecs), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                            foreach=impl.get("adamw_foreach"), fused=impl.get("adamw_fused", not impl))
    assert bool(ours.param_groups[1]["fused"]) == (not impl)  # fused by default
    for step in range(4):
        _set_grads(list(ours_m.vecs), step)
        _set_grads(list(ref_m.vecs), step)
        ours.step()
        ref.step()
    for a, b in zip(ours_m.vecs, ref_m.vecs, strict=True):
        assert torch.equal(a, b)


def test_adamw_overrides_lr_and_decay_per_group():
    m = Mats(SHAPES_2D[:1])
    opt = MuonClip(m, lr=0.02, qk_clip_tau=None, adamw_lr=1e-3, adamw_weight_decay=0.0,
                   params={"muon": list(m.mats), "adamw": list(m.vecs)})
    muon_g, adamw_g = opt.param_groups
    assert (muon_g["kind"], muon_g["lr"], muon_g["weight_decay"]) == ("muon", 0.02, 0.1)
    assert (adamw_g["kind"], adamw_g["lr"], adamw_g["weight_decay"]) == ("adamw", 1e-3, 0.0)
