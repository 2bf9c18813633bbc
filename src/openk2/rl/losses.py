"""Policy losses, a registry in verl's shape: `loss_fn(logp_BT, old_logp_BT, advantages_B, mask_BT, cfg)`
returns `(loss, metrics)`. `kimi_k15` (default) is rl-design §6.3 exactly:

    Δ_i = Σ_t mask·(log π_θ − log π_old)   (fp32, sequence level)
    L   = mean_i (A_i − τ·Δ_i)² / (2τ)     (optionally / |y_i|)

At θ = θ_old its gradient is −A·∇log π_θ (REINFORCE with the group-mean baseline); its minimiser has τΔ = A.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LossConfig:
    tau: float = 0.05                 # K1.5/K2 τ: the strength of the squared log-ratio anchor to π_old
    length_normalize: bool = False    # divide each sample's squared term by its policy-token count (OpenKimi)
    clip_low: float = 0.2             # PPO-style clip range (grpo, dapo, dr_grpo)
    clip_high: float = 0.2            # dapo's clip-higher uses a larger value
    max_len: int = 0                  # dr_grpo's constant normaliser (0: the batch's longest response)


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LossConfig],
                  tuple[torch.Tensor, dict[str, float]]]
POLICY_LOSSES: dict[str, LossFn] = {}


def register_policy_loss(name: str) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        POLICY_LOSSES[name] = fn
        return fn
    return wrap


def get_policy_loss(name: str) -> LossFn:
    if name not in POLICY_LOSSES:
        raise KeyError(f"unknown policy loss {name!r}; registered: {', '.join(sorted(POLICY_LOSSES))}")
    return POLICY_LOSSES[name]


@register_policy_loss("kimi_k15")
def kimi_k15(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor, mask_BT: torch.Tensor,
             cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    mask_BT = mask_BT.float()
    delta_B = ((logp_BT.float() - old_logp_BT.float()) * mask_BT).sum(-1)
    sq_B = (advantages_B.float() - cfg.tau * delta_B).pow(2) / (2 * cfg.tau)
    if cfg.length_normalize:
        sq_B = sq_B / mask_BT.sum(-1).clamp(min=1)
    loss = sq_B.mean()
    n_tokens = mask_BT.sum(-1).clamp(min=1)
    return loss, {"delta_abs_mean": delta_B.abs().mean().item(),
                  "kl_proxy": (-delta_B / n_tokens).mean().item()}


__all__ = ["LossConfig", "POLICY_LOSSES", "get_policy_loss", "kimi_k15", "register_policy_loss"]
