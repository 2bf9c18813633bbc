"""QK-Clip: after a clip, the same inputs give S_max^h = tau for clipped heads; everything else is untouched."""

import pytest
import torch
from torch import nn

from openk2.model import build_model, get_preset
from openk2.optim import GQAAttention, MuonClip, max_logits_per_head


def _capture_attention_inputs(model, attns, ids_BT):
    """One training forward that records max logits and keeps each attention layer's own inputs."""
    inputs = {}

    def keep(i, args):
        inputs[i] = tuple(t if t is None else t.detach() for t in args)

    hooks = [a.register_forward_pre_hook(lambda m, args, i=i: keep(i, args)) for i, a in enumerate(attns)]
    loss = model(ids_BT[:, :-1], labels=ids_BT[:, 1:]).loss
    for h in hooks:
        h.remove()
    return loss, inputs


def _recompute(attns, inputs):
    """Each layer's max logits on its captured inputs (so clipping layer 0 cannot shift layer 1's input)."""
    out = []
    for i, a in enumerate(attns):
        a.max_logit_H = None
        a(*inputs[i])
        out.append(a.max_logit_H.clone())
        a.max_logit_H = None
    return out


def _tau_between_heads(recorded):
    """A tau that some heads exceed and some do not."""
    s = torch.cat(recorded).sort().values
    return float((s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_mla_clip_brings_clipped_heads_to_tau_and_leaves_the_rest_bitwise(q_lora_rank):
    model = build_model(get_preset("tiny", q_lora_rank=q_lora_rank), seed=0)
    # Sharpen attention so logits are well above zero and differ across heads.
    with torch.no_grad():
        for a in model.attention_layers():
            a.q_up_proj.weight.mul_(torch.linspace(5, 40, a.n_heads).repeat_interleave(a.qk_dim)[:, None])
    attns = model.attention_layers()
    ids_BT = torch.randint(0, 256, (2, 33))
    # lr=0: the step leaves the weights alone, so the recomputed logits isolate the clip.
    opt = MuonClip(model, lr=0.0, qk_clip_tau=1e9, update_expert_biases=False)
    loss, inputs = _capture_attention_inputs(model, attns, ids_BT)
    before_S = [a.max_logit_H.clone() for a in attns]
    tau = _tau_between_heads(before_S)
    opt.qk_clip_tau = tau
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss.backward()
    opt.step()

    stats = opt.last_stats
    over = [s > tau for s in before_S]
    assert stats["clipped_heads"] == sum(int(o.sum()) for o in over) > 0
    assert stats["clipped_heads"] < stats["heads"]
    assert stats["max_logit_per_layer"] == pytest.approx([float(s.max()) for s in before_S])
    after_S = _recompute(attns, inputs)
    for s0, s1, o in zip(before_S, after_S, over, strict=True):
        torch.testing.assert_close(s1[o], torch.full_like(s1[o], tau), rtol=1e-4, atol=0)
        assert torch.equal(s1[~o], s0[~o])
    for i, a in enumerate(attns):
        pre = f"model.layers.{i}.self_attn."
        q_name = pre + ("q_b_proj" if q_lora_rank else "q_proj") + ".weight"
        H, N, R, V, C = a.n_heads, a.nope_dim, a.rope_dim, a.v_dim, a.kv_lora_rank
        gamma_H = torch.where(over[i], tau / before_S[i], torch.ones(H))
        q0, q1 = w0[q_name].view(H, N + R, -1), a.q_up_proj.weight.detach().view(H, N + R, -1)
        kv0, kv1 = w0[pre + "kv_b_proj.weight"].view(H, N + V, -1), a.kv_b_proj.weight.detach().view(H, N + V, -1)
        keep = ~over[i]
        assert torch.equal(q1[keep], q0[keep]) and torch.equal(kv1[keep], kv0[keep])
        torch.testing.assert_close(q1[:, :N], q0[:, :N] * gamma_H.sqrt()[:, None, None])
        torch.testing.assert_close(q1[:, N:], q0[:, N:] * gamma_H[:, None, None])
        torch.testing.assert_close(kv1[:, :N], kv0[:, :N] * gamma_H.sqrt()[:, None, None])
        assert torch.equal(kv1[:, N:], kv0[:, N:])  # v rows
        kva = pre + "kv_a_proj_with_mqa.weight"
        assert torch.equal(model.get_parameter(kva)[C:], w0[kva][C:])  # shared k_rope rows
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, w0[n])}
    assert changed and all(n.endswith(("q_b_proj.weight", "q_proj.weight", "kv_b_proj.weight")) for n in changed)
    assert all(a.max_logit_H is None for a in attns)  # reset for the next step


def test_clip_acts_on_the_post_step_weights():
    """With a real lr: clipped = (unclipped step) x gamma rows; unclipped heads identical to the plain step."""
    cfg = get_preset("tiny")
    m_clip, m_plain = build_model(cfg, seed=0), build_model(cfg, seed=0)
    ids_BT = torch.randint(0, 256, (2, 33))
    o_clip = MuonClip(m_clip, lr=0.02, qk_clip_tau=1e9)
    o_plain = MuonClip(m_plain, lr=0.02, qk_clip_tau=None)
    for m in (m_clip, m_plain):
        m(ids_BT[:, :-1], labels=ids_BT[:, 1:]).loss.backward()
    S = [a.max_logit_H.clone() for a in m_clip.attention_layers()]
    o_clip.qk_clip_tau = tau = _tau_between_heads(S)
    o_clip.step()
    o_plain.step()
    for a_c, a_p, s_H in zip(m_clip.attention_layers(), m_plain.attention_layers(), S, strict=True):
        gamma_H = torch.where(s_H > tau, tau / s_H, torch.ones_like(s_H))
        H, N = a_c.n_heads, a_c.nope_dim
        qc = a_c.q_up_proj.weight.detach().view(H, a_c.qk_dim, -1)
        qp = a_p.q_up_proj.weight.detach().view(H, a_c.qk_dim, -1)
        torch.testing.assert_close(qc[:, N:], qp[:, N:] * gamma_H[:, None, None])
        torch.testing.assert_close(qc[:, :N], qp[:, :N] * gamma_H.sqrt()[:, None, None])
        assert torch.equal(qc[s_H <= tau], qp[s_H <= tau])
        assert torch.equal(a_c.o_proj.weight, a_p.o_proj.weight)


class TinyLlama(nn.Module):
    def __init__(self, num_kv_heads, bias=False):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.layers = nn.ModuleList(GQAAttention(32, 4, num_kv_heads, rope_theta=100.0, bias=bias) for _ in range(2))
        self.norm = nn.RMSNorm(32)
        self.lm_head = nn.Linear(32, 64, bias=False)

    def forward(self, ids_BT):
        x = self.embed(ids_BT)
        for layer in self.layers:
            x = x + layer(x)
        return self.lm_head(self.norm(x))


@pytest.mark.parametrize("num_kv_heads,bias", [(2, False), (4, True), (1, False)])
def test_gqa_clip_brings_clipped_heads_to_tau(num_kv_heads, bias):
    model = TinyLlama(num_kv_heads, bias)
    with torch.no_grad():
        for layer in model.layers:
            layer.q_proj.weight.mul_(torch.linspace(2, 8, 4).repeat_interleave(layer.head_dim)[:, None])
    attns = list(model.layers)
    ids_BT = torch.randint(0, 64, (2, 17))
    opt = MuonClip(model, lr=0.0, qk_clip_tau=1e9, classify=lambda n, p: "muon" if "proj" in n and p.ndim == 2
                   else "adamw")
    inputs = {}
    hooks = [a.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, a in enumerate(attns)]
    logits = model(ids_BT)
    for h in hooks:
        h.remove()
    before_S = [a.max_logit_H.clone() for a in attns]
    opt.qk_clip_tau = tau = _tau_between_heads(before_S)
    k0 = [a.k_proj.weight.detach().clone() for a in attns]
    logits.float().logsumexp(-1).mean().backward()
    opt.step()
    assert opt.last_stats["clipped_heads"] > 0
    after_S = _recompute(attns, {i: (x,) for i, x in inputs.items()})
    for a, s0, s1, k in zip(attns, before_S, after_S, k0, strict=True):
        o = s0 > tau
        torch.testing.assert_close(s1[o], torch.full_like(s1[o], tau), rtol=1e-4, atol=0)
        assert torch.equal(s1[~o], s0[~o])
        if num_kv_heads < 4:  # shared key heads are never touched
            assert torch.equal(a.k_proj.weight, k)


def test_max_logits_per_head_matches_explicit_scores_with_gqa():
    q_BHTD, k_BKTD = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8)
    k_full = k_BKTD.repeat_interleave(2, dim=1)
    scores = (q_BHTD @ k_full.mT * 0.3).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(max_logits_per_head(q_BHTD, k_BKTD, 0.3), scores.amax(dim=(0, 2, 3)))


def test_bf16_weights_are_scaled_with_one_rounding():
    from openk2.optim.qk_clip import scale_mla_

    model = build_model(get_preset("tiny"), seed=0).to(torch.bfloat16)
    attn = model.attention_layers()[0]
    w0 = attn.q_up_proj.weight.detach().clone()
    gamma_H = torch.tensor([1.0, 0.3, 1.0, 0.71])
    scale_mla_(attn, gamma_H)
    H, N = attn.n_heads, attn.nope_dim
    expected = w0.float().view(H, attn.qk_dim, -1).clone()
    expected[:, N:] *= gamma_H[:, None, None]
    expected[:, :N] *= gamma_H.sqrt()[:, None, None]
    assert torch.equal(attn.q_up_proj.weight.view(H, attn.qk_dim, -1), expected.to(torch.bfloat16))
