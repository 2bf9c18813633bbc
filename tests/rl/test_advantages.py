"""Advantage estimators: vectorized vs a per-group loop (as verl's CPU tests do), registry, edge cases."""

import math

import pytest
import torch

from openk2.rl.advantages import ADVANTAGE_ESTIMATORS, AdvantageConfig, get_advantage_estimator, register_adv_est


def loop_reference(name: str, rewards: list[float], groups: list[int], cfg: AdvantageConfig) -> list[float]:
    out = []
    for i, (r, g) in enumerate(zip(rewards, groups, strict=True)):
        group = [rewards[j] for j in range(len(rewards)) if groups[j] == g]
        others = [rewards[j] for j in range(len(rewards)) if groups[j] == g and j != i]
        k = len(group)
        mean = sum(group) / k
        if name == "mean":
            out.append(r - mean)
        elif k == 1:
            out.append(0.0)
        elif name == "rloo":
            out.append(r - sum(others) / len(others))
        elif name == "grpo":
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))
            out.append((r - mean) / (std + cfg.eps) if cfg.norm_by_std else r - mean)
        elif name == "partition_loo":
            top = max(o / cfg.tau for o in others)
            lme = top + math.log(sum(math.exp(o / cfg.tau - top) for o in others) / len(others))
            out.append(r - cfg.tau * lme)
    return out


@pytest.mark.parametrize("name", ["mean", "rloo", "grpo", "partition_loo"])
@pytest.mark.parametrize("cfg", [AdvantageConfig(), AdvantageConfig(norm_by_std=False, tau=0.7)])
def test_vectorized_matches_loop(name, cfg):
    gen = torch.Generator().manual_seed(1)
    sizes = [1, 2, 5, 8, 3]
    groups = [g * 7 + 3 for g, k in enumerate(sizes) for _ in range(k)]  # sparse, non-contiguous ids
    perm = torch.randperm(len(groups), generator=gen).tolist()  # samples of a group interleaved in the batch
    groups = [groups[p] for p in perm]
    rewards = (torch.rand(len(groups), generator=gen) * 2 - 0.5).round(decimals=1).tolist()
    got = get_advantage_estimator(name)(torch.tensor(rewards), torch.tensor(groups), cfg)
    want = loop_reference(name, rewards, groups, cfg)
    assert got.shape == (len(rewards),) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mean", "rloo", "grpo", "partition_loo"])
def test_equal_rewards_give_zero_advantage(name):
    adv = get_advantage_estimator(name)(torch.full((8,), 0.7), torch.tensor([0] * 4 + [1] * 4), AdvantageConfig())
    torch.testing.assert_close(adv, torch.zeros(8), atol=1e-6, rtol=0)


def test_partition_loo_is_exact_when_one_sample_dominates_and_tends_to_rloo_for_large_tau():
    rewards, groups = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long)
    adv = get_advantage_estimator("partition_loo")(rewards, groups, AdvantageConfig(tau=0.001))
    assert torch.isfinite(adv).all()
    # r_0 = 1 beats three zeros: its LOO baseline is 0; each zero's baseline is τ·log((e^{1/τ} + 2)/3) ≈ 1 − τ·log 3
    torch.testing.assert_close(adv[0], torch.tensor(1.0))
    torch.testing.assert_close(adv[1:], torch.full((3,), -(1 - 0.001 * math.log(3))), atol=1e-5, rtol=0)
    big_tau = get_advantage_estimator("partition_loo")(rewards, groups, AdvantageConfig(tau=1e3))
    torch.testing.assert_close(big_tau, get_advantage_estimator("rloo")(rewards, groups, AdvantageConfig()),
                               atol=1e-3, rtol=0)


def test_registry_round_trip_and_unknown_name_lists_the_valid_ones():
    @register_adv_est("test_only_zero")
    def zero(rewards_B, group_ids_B, cfg):
        return torch.zeros_like(rewards_B)

    try:
        assert get_advantage_estimator("test_only_zero") is zero
        with pytest.raises(KeyError, match="grpo, mean, partition_loo, rloo"):
            get_advantage_estimator("gae")
    finally:
        del ADVANTAGE_ESTIMATORS["test_only_zero"]
    with pytest.raises(ValueError, match="tau must be > 0"):
        AdvantageConfig(tau=0)
