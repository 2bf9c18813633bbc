"""Advantage estimators, a registry: `estimator(rewards_B, group_ids_B, cfg) -> advantages_B` (sequence level).
`mean` is K1.5's group-mean baseline A_i = r_i − mean_group(r)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class AdvantageConfig:
    eps: float = 1e-6


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


def _group_mean(values_B: torch.Tensor, group_ids_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean of its group and the group sizes, vectorized."""
    _, inverse_B = torch.unique(group_ids_B, return_inverse=True)
    n_groups = int(inverse_B.max()) + 1 if inverse_B.numel() else 0
    sums_G = torch.zeros(n_groups, dtype=values_B.dtype).index_add_(0, inverse_B, values_B)
    counts_G = torch.zeros(n_groups, dtype=values_B.dtype).index_add_(0, inverse_B, torch.ones_like(values_B))
    return (sums_G / counts_G)[inverse_B], counts_G[inverse_B]


@register_adv_est("mean")
def mean_baseline(rewards_B: torch.Tensor, group_ids_B: torch.Tensor, cfg: AdvantageConfig) -> torch.Tensor:
    mean_B, _ = _group_mean(rewards_B.float(), group_ids_B)
    return rewards_B.float() - mean_B


__all__ = ["ADVANTAGE_ESTIMATORS", "AdvantageConfig", "get_advantage_estimator", "mean_baseline", "register_adv_est"]
