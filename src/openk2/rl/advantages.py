"""Advantage estimators, a registry: `estimator(rewards_B, group_ids_B, cfg) -> advantages_B` (sequence level;
a group is the K samples of one prompt). All are vectorized over the batch; `tests/rl/test_advantages.py` checks
each against a per-group loop.

    mean           A_i = r_i − mean_group(r)                                   K1.5/K2 (the τ → ∞ partition estimate)
    rloo           A_i = r_i − mean_{j≠i}(r_j)                                 RLOO (Ahmadian et al. 2024)
    grpo           A_i = (r_i − mean_group(r)) / (std_group(r) + eps)         GRPO; norm_by_std=False is Dr. GRPO
    partition_loo  A_i = r_i − τ·log mean_{j≠i} exp(r_j/τ)                     OpenKimi "ploo": the leave-one-out
                                                                               estimate of τ·log Z in K1.5's identity

Singleton groups get advantage 0 from every estimator (nothing to compare with).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class AdvantageConfig:
    eps: float = 1e-6
    norm_by_std: bool = True    # grpo: divide by the group's (unbiased) std; False gives Dr. GRPO's advantage
    tau: float = 0.05           # partition_loo: the temperature of the log-mean-exp (use the loss's τ)

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


AdvFn = Callable[[torch.Tensor, torch.Tensor, AdvantageConfig], torch.Tensor]
ADVANTAGE_ESTIMATORS: dict[str, AdvFn] = {}


def register_adv_est(name: str) -> Callable[[AdvFn], AdvFn]:
    def wrap(fn: AdvFn) -> AdvFn:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return wrap


def get_advantage_estimator(name: str) -> AdvFn:
    if name not in ADVANTAGE_ESTIMATORS:
        raise KeyError(f"unknown advantage estimator {name!r}; registered: {', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
    return ADVANTAGE_ESTIMATORS[name]


def group_index(group_ids_B: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(dense group index per sample, number of groups)."""
    _, inverse_B = torch.unique(group_ids_B, return_inverse=True)
    return inverse_B, (int(inverse_B.max()) + 1 if inverse_B.numel() else 0)


def _group_sum(values_B: torch.Tensor, inverse_B: torch.Tensor, n_groups: int) -> torch.Tensor:
    return torch.zeros(n_groups, dtype=values_B.dtype).index_add_(0, inverse_B, values_B)


def _group_mean(values_B: torch.Tensor, group_ids_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean of its group and the group sizes, vectorized."""
    inverse_B, n_groups = group_index(group_ids_B)
    sums_G = _group_sum(values_B, inverse_B, n_groups)
    counts_G = _group_sum(torch.ones_like(values_B), inverse_B, n_groups)
    return (sums_G / counts_G)[inverse_B], counts_G[inverse_B]


@register_adv_est("mean")
def mean_baseline(rewards_B: torch.Tensor, group_ids_B: torch.Tensor, cfg: AdvantageConfig) -> torch.Tensor:
    mean_B, _ = _group_mean(rewards_B.float(), group_ids_B)
    return rewards_B.float() - mean_B


@register_adv_est("rloo")
def rloo(rewards_B: torch.Tensor, group_ids_B: torch.Tensor, cfg: AdvantageConfig) -> torch.Tensor:
    r_B = rewards_B.float()
    mean_B, count_B = _group_mean(r_B, group_ids_B)
    # r_i − (Σr − r_i)/(K−1) = K/(K−1)·(r_i − mean)
    return torch.where(count_B > 1, (r_B - mean_B) * count_B / (count_B - 1).clamp(min=1), torch.zeros_like(r_B))


@register_adv_est("grpo")
def grpo(rewards_B: torch.Tensor, group_ids_B: torch.Tensor, cfg: AdvantageConfig) -> torch.Tensor:
    r_B = rewards_B.float()
    mean_B, count_B = _group_mean(r_B, group_ids_B)
    centred_B = torch.where(count_B > 1, r_B - mean_B, torch.zeros_like(r_B))
    if not cfg.norm_by_std:
        return centred_B
    sq_mean_B, _ = _group_mean(centred_B.pow(2), group_ids_B)
    std_B = (sq_mean_B * count_B / (count_B - 1).clamp(min=1)).sqrt()  # unbiased, as torch.std (verl's grpo)
    return centred_B / (std_B + cfg.eps)


@register_adv_est("partition_loo")
def partition_loo(rewards_B: torch.Tensor, group_ids_B: torch.Tensor, cfg: AdvantageConfig) -> torch.Tensor:
    """Groups are padded into a (G, K) table; each sample's leave-one-out log-mean-exp masks its own column, so
    it is exact (no subtraction of exp terms, which cancels catastrophically when r_i dominates its group)."""
    r_B = rewards_B.float()
    inverse_B, n_groups = group_index(group_ids_B)
    if n_groups == 0:
        return r_B.clone()
    counts_G = torch.bincount(inverse_B, minlength=n_groups)
    order_B = torch.argsort(inverse_B, stable=True)
    starts_G = torch.cumsum(counts_G, 0) - counts_G
    slot_B = torch.empty_like(inverse_B)
    slot_B[order_B] = torch.arange(len(r_B)) - starts_G[inverse_B[order_B]]
    k_max = int(counts_G.max())
    scaled_GK = torch.full((n_groups, k_max), float("-inf"))
    scaled_GK[inverse_B, slot_B] = r_B / cfg.tau
    others_BK = scaled_GK[inverse_B].clone()
    others_BK[torch.arange(len(r_B)), slot_B] = float("-inf")
    n_others_B = (counts_G[inverse_B] - 1).float()
    baseline_B = cfg.tau * (torch.logsumexp(others_BK, dim=-1) - n_others_B.clamp(min=1).log())
    return torch.where(n_others_B > 0, r_B - baseline_B, torch.zeros_like(r_B))


__all__ = ["ADVANTAGE_ESTIMATORS", "AdvantageConfig", "get_advantage_estimator", "group_index", "grpo",
           "mean_baseline", "partition_loo", "register_adv_est", "rloo"]
