"""Policy losses: the rl-design §1.3 identities for kimi_k15, the PPO-family losses against direct formulas,
aggregation modes, partial-rollout masks and the registry."""

import pytest
import torch

from openk2.rl.advantages import AdvantageConfig, get_advantage_estimator
from openk2.rl.losses import (
    POLICY_LOSSES,
    LossConfig,
    aggregate,
    get_policy_loss,
    partial_rollout_mask,
    register_policy_loss,
)

B, T, V = 6, 5, 7


def tiny_policy(seed: int = 0):
    """Logits of a 'model' as a leaf tensor, sampled tokens, a ragged response mask and group ids."""
    gen = torch.Generator().manual_seed(seed)
    logits_BTV = torch.randn(B, T, V, generator=gen, requires_grad=True)
    tokens_BT = torch.randint(0, V, (B, T), generator=gen)
    mask_BT = torch.ones(B, T)
    mask_BT[1, 3:] = 0
    mask_BT[4, 1:] = 0
    groups_B = torch.tensor([0, 0, 0, 1, 1, 1])
    return logits_BTV, tokens_BT, mask_BT, groups_B


def token_logp(logits_BTV, tokens_BT):
    return torch.log_softmax(logits_BTV, -1).gather(-1, tokens_BT[..., None]).squeeze(-1)


def test_kimi_k15_gradient_at_theta_old_is_reinforce_with_mean_baseline():
    logits_BTV, tokens_BT, mask_BT, groups_B = tiny_policy()
    rewards_B = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])
    adv_B = get_advantage_estimator("mean")(rewards_B, groups_B, AdvantageConfig())
    logp_BT = token_logp(logits_BTV, tokens_BT)
    loss, metrics = get_policy_loss("kimi_k15")(logp_BT, logp_BT.detach(), adv_B, mask_BT, LossConfig(tau=0.3))
    (grad,) = torch.autograd.grad(loss, logits_BTV, retain_graph=True)
    reinforce = -(adv_B * (logp_BT * mask_BT).sum(-1)).mean()
    (want,) = torch.autograd.grad(reinforce, logits_BTV)
    torch.testing.assert_close(grad, want)
    assert grad.abs().sum() > 0 and metrics["delta_abs_mean"] == 0.0


def test_kimi_k15_gradient_is_paper_form_off_policy():
    """Away from θ_old the descent direction is A·∇logπ − (τ/2)∇Δ² (K1.5 §2.3.2), averaged over samples."""
    logits_BTV, tokens_BT, mask_BT, groups_B = tiny_policy(1)
    adv_B = torch.tensor([0.5, -0.25, -0.25, 0.3, -0.6, 0.3])
    old_BT = token_logp(logits_BTV.detach() + 0.3 * torch.randn(B, T, V), tokens_BT)
    tau = 0.2
    logp_BT = token_logp(logits_BTV, tokens_BT)
    loss, _ = get_policy_loss("kimi_k15")(logp_BT, old_BT, adv_B, mask_BT, LossConfig(tau=tau))
    (grad,) = torch.autograd.grad(loss, logits_BTV, retain_graph=True)
    delta_B = ((logp_BT - old_BT) * mask_BT).sum(-1)
    paper = (adv_B * delta_B - tau / 2 * delta_B.pow(2)).mean()  # ascent objective, up to a constant
    (want,) = torch.autograd.grad(-paper, logits_BTV)
    torch.testing.assert_close(grad, want)


def test_zero_gradient_when_all_rewards_in_each_group_are_equal():
    logits_BTV, tokens_BT, mask_BT, groups_B = tiny_policy()
    rewards_B = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    for estimator in ("mean", "rloo", "grpo", "partition_loo"):
        adv_B = get_advantage_estimator(estimator)(rewards_B, groups_B, AdvantageConfig())
        for name in ("kimi_k15", "grpo", "dapo", "dr_grpo", "gspo", "cispo"):
            logp_BT = token_logp(logits_BTV, tokens_BT)
            loss, _ = get_policy_loss(name)(logp_BT, logp_BT.detach(), adv_B, mask_BT, LossConfig())
            (grad,) = torch.autograd.grad(loss, logits_BTV)
            assert grad.abs().max() < 1e-6, (estimator, name)


@pytest.mark.parametrize("length_normalize", [False, True])
def test_minimiser_satisfies_tau_delta_equals_advantage(length_normalize):
    """Optimise the per-token log-ratios directly: each sample's Δ converges to A/τ."""
    _, _, mask_BT, _ = tiny_policy()
    adv_B = torch.tensor([0.4, -0.1, -0.3, 0.25, 0.0, -0.25])
    tau = 0.5
    log_ratio_BT = torch.zeros(B, T, requires_grad=True)
    opt = torch.optim.LBFGS([log_ratio_BT], max_iter=200, line_search_fn="strong_wolfe")
    cfg = LossConfig(tau=tau, length_normalize=length_normalize)

    def closure():
        opt.zero_grad()
        loss, _ = get_policy_loss("kimi_k15")(log_ratio_BT, torch.zeros(B, T), adv_B, mask_BT, cfg)
        loss.backward()
        return loss

    opt.step(closure)
    delta_B = (log_ratio_BT.detach() * mask_BT).sum(-1)
    torch.testing.assert_close(tau * delta_B, adv_B, atol=1e-5, rtol=0)
    _, metrics = get_policy_loss("kimi_k15")(log_ratio_BT.detach(), torch.zeros(B, T), adv_B, mask_BT, cfg)
    assert metrics["residual_abs_mean"] < 1e-5


def test_bandit_fitted_policy_approaches_closed_form():
    """One state, four arms. Sample a big group from π_old, take partition_loo advantages (the leave-one-out
    estimate of τ·log Z) and fit softmax logits with the kimi_k15 loss: π_θ → π_old·exp(r/τ)/Z."""
    gen = torch.Generator().manual_seed(0)
    old_logits = torch.tensor([0.5, 0.0, -0.5, 0.2])
    reward_of_arm = torch.tensor([0.0, 1.0, 0.3, 0.6])
    tau = 0.5
    pi_old = old_logits.softmax(-1)
    arms = torch.multinomial(pi_old, 4000, replacement=True, generator=gen)
    adv_B = get_advantage_estimator("partition_loo")(reward_of_arm[arms], torch.zeros_like(arms),
                                                     AdvantageConfig(tau=tau))
    logits = old_logits.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([logits], max_iter=300, line_search_fn="strong_wolfe")
    mask_BT = torch.ones(len(arms), 1)
    old_BT = pi_old.log()[arms][:, None]

    def closure():
        opt.zero_grad()
        loss, _ = get_policy_loss("kimi_k15")(logits.log_softmax(-1)[arms][:, None], old_BT, adv_B, mask_BT,
                                              LossConfig(tau=tau))
        loss.backward()
        return loss

    opt.step(closure)
    closed_form = pi_old * (reward_of_arm / tau).exp()
    closed_form /= closed_form.sum()
    fitted = logits.detach().softmax(-1)
    assert (fitted - closed_form).abs().sum() / 2 < 0.02, (fitted, closed_form)  # total variation
    assert (pi_old - closed_form).abs().sum() / 2 > 0.15  # the test would notice no update at all


def test_ppo_family_against_direct_formulas():
    gen = torch.Generator().manual_seed(3)
    logp_BT = torch.randn(B, T, generator=gen) * 0.3 - 1
    old_BT = logp_BT + torch.randn(B, T, generator=gen) * 0.4
    _, _, mask_BT, _ = tiny_policy()
    adv_B = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    ratio_BT = (logp_BT - old_BT).exp()
    adv_BT = adv_B[:, None].expand(B, T)
    cfg = LossConfig(clip_low=0.2, clip_high=0.2, dual_clip_c=3.0)

    def ppo(eps_low, eps_high):
        per_token = torch.maximum(-adv_BT * ratio_BT, -adv_BT * ratio_BT.clamp(1 - eps_low, 1 + eps_high))
        return torch.where(adv_BT < 0, torch.minimum(per_token, -adv_BT * 3.0), per_token)

    loss, m = get_policy_loss("grpo")(logp_BT, old_BT, adv_B, mask_BT, cfg)
    want = ((ppo(0.2, 0.2) * mask_BT).sum(-1) / mask_BT.sum(-1)).mean()
    torch.testing.assert_close(loss, want)
    assert 0 < m["pg_clipfrac"] < 1 and {"ppo_kl", "pg_clipfrac_lower", "ratio_max"} <= m.keys()
    loss, m_dapo = get_policy_loss("dapo")(logp_BT, old_BT, adv_B, mask_BT, cfg)
    torch.testing.assert_close(loss, (ppo(0.2, 0.28) * mask_BT).sum() / mask_BT.sum())
    assert m_dapo["pg_clipfrac_high"] <= m["pg_clipfrac_high"]  # clip-higher clips fewer positive-advantage tokens
    loss, _ = get_policy_loss("dr_grpo")(logp_BT, old_BT, adv_B, mask_BT, LossConfig(max_len=16))
    torch.testing.assert_close(loss, (ppo(0.2, 0.2) * mask_BT).sum() / (B * 16))

    loss, m = get_policy_loss("gspo")(logp_BT, old_BT, adv_B, mask_BT, cfg)
    s_B = (((logp_BT - old_BT) * mask_BT).sum(-1) / mask_BT.sum(-1)).exp()
    per_seq = torch.maximum(-adv_B * s_B, -adv_B * s_B.clamp(1 - 3e-4, 1 + 4e-4))
    torch.testing.assert_close(loss, per_seq.mean())
    assert m["seq_clipfrac"] == 1.0  # random log-ratios are far outside GSPO's 4e-4 range

    loss, m = get_policy_loss("cispo")(logp_BT, old_BT, adv_B, mask_BT, cfg)
    weight_BT = ratio_BT.clamp(max=1 + 4.0)
    torch.testing.assert_close(loss, (-weight_BT * adv_BT * logp_BT * mask_BT).sum() / mask_BT.sum())


def test_clipped_tokens_keep_a_gradient_under_cispo_but_not_under_ppo():
    old_BT = torch.full((1, 2), -2.0)
    logp_BT = torch.tensor([[-0.5, -2.0]], requires_grad=True)  # token 0: ratio e^1.5 ≈ 4.5, far above 1 + ε
    adv_B, mask_BT = torch.tensor([1.0]), torch.ones(1, 2)
    (g_ppo,) = torch.autograd.grad(get_policy_loss("grpo")(logp_BT, old_BT, adv_B, mask_BT, LossConfig())[0],
                                   logp_BT)
    (g_cispo,) = torch.autograd.grad(get_policy_loss("cispo")(logp_BT, old_BT, adv_B, mask_BT,
                                                              LossConfig(cispo_clip_high=2.0))[0], logp_BT)
    assert g_ppo[0, 0] == 0 and g_ppo[0, 1] != 0
    torch.testing.assert_close(g_cispo, torch.tensor([[-3.0 / 2, -1.0 / 2]]))  # weights clip(4.5)=3 and 1, /2 tokens


def test_gspo_gradient_is_length_normalised_sequence_gradient():
    """At θ = θ_old, GSPO's gradient is −A_i·(1/|y_i|)·Σ_t ∇logπ (seq-mean over the batch)."""
    logits_BTV, tokens_BT, mask_BT, _ = tiny_policy(2)
    adv_B = torch.linspace(-1, 1, B)
    logp_BT = token_logp(logits_BTV, tokens_BT)
    (grad,) = torch.autograd.grad(get_policy_loss("gspo")(logp_BT, logp_BT.detach(), adv_B, mask_BT,
                                                          LossConfig())[0], logits_BTV, retain_graph=True)
    want_loss = -(adv_B * (logp_BT * mask_BT).sum(-1) / mask_BT.sum(-1)).mean()
    (want,) = torch.autograd.grad(want_loss, logits_BTV)
    torch.testing.assert_close(grad, want)


def test_aggregation_modes_match_verl_definitions():
    loss_BT = torch.arange(B * T, dtype=torch.float32).reshape(B, T)
    _, _, mask_BT, _ = tiny_policy()
    mask_BT[5] = 0  # a fully masked row is not a sequence
    rows = [loss_BT[i][mask_BT[i] > 0] for i in range(B) if mask_BT[i].sum() > 0]
    torch.testing.assert_close(aggregate(loss_BT, mask_BT, "token-mean"), torch.cat(rows).mean())
    torch.testing.assert_close(aggregate(loss_BT, mask_BT, "seq-mean-token-mean"),
                               torch.stack([r.mean() for r in rows]).mean())
    torch.testing.assert_close(aggregate(loss_BT, mask_BT, "seq-mean-token-sum"),
                               torch.stack([r.sum() for r in rows]).mean())
    torch.testing.assert_close(aggregate(loss_BT, mask_BT, "seq-mean-token-sum-norm"),
                               torch.stack([r.sum() for r in rows]).mean() / T)
    with pytest.raises(ValueError, match="valid: token-mean"):
        aggregate(loss_BT, mask_BT, "sum")
    with pytest.raises(ValueError, match="valid: token-mean"):
        LossConfig(agg_mode="mean")


def test_partial_rollout_masks():
    mask_BT = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
    versions_BT = torch.tensor([[3, 3, -1, 4, 4], [2, 2, 2, 2, -1]])  # row 0: two segments; row 1: one
    torch.testing.assert_close(partial_rollout_mask(mask_BT, versions_BT, "mask_old_segments"),
                               torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.float32))
    torch.testing.assert_close(partial_rollout_mask(mask_BT, versions_BT, "anchor_to_behaviour"),
                               mask_BT.float())
    torch.testing.assert_close(partial_rollout_mask(mask_BT, versions_BT, "anchor_to_behaviour", current_version=4,
                                                    max_staleness=1),
                               torch.tensor([[1, 1, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32))
    with pytest.raises(ValueError, match="mask_old_segments, anchor_to_behaviour"):
        partial_rollout_mask(mask_BT, versions_BT, "newest")


def test_registry_round_trip_and_unknown_name_lists_the_valid_ones():
    assert {"kimi_k15", "grpo", "dapo", "dr_grpo", "gspo", "cispo"} <= POLICY_LOSSES.keys()

    @register_policy_loss("test_only_sum")
    def total(logp_BT, old_logp_BT, advantages_B, mask_BT, cfg):
        return logp_BT.sum(), {}

    try:
        assert get_policy_loss("test_only_sum") is total
        with pytest.raises(KeyError, match="cispo, dapo, dr_grpo, grpo, gspo, kimi_k15"):
            get_policy_loss("ppo")
    finally:
        del POLICY_LOSSES["test_only_sum"]
