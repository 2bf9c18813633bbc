"""Policy losses, a registry in verl's shape: `loss_fn(logp_BT, old_logp_BT, advantages_B, mask_BT, cfg)`
returns `(loss, metrics)`. `kimi_k15` (default) is rl-design §6.3 exactly:

    Δ_i = Σ_t mask·(log π_θ − log π_old)   (fp32, sequence level)
    L   = mean_i (A_i − τ·Δ_i)² / (2τ)     (optionally / |y_i|)

At θ = θ_old its gradient is −A·∇log π_θ (REINFORCE with the group-mean baseline); its minimiser has τΔ = A.

The others are the PPO-family ablations, each with the aggregation its paper uses (`cfg.agg_mode` overrides):

    grpo     PPO-clip on the token ratio, dual-clip for A < 0        seq-mean-token-mean (GRPO paper, length-biased)
    dapo     PPO-clip with clip-higher (ε_low 0.2, ε_high 0.28)      token-mean (Σ tokens / total tokens in batch)
    dr_grpo  PPO-clip, constant normaliser, no std division          seq-mean-token-sum-norm (÷ B·max_len)
    gspo     sequence ratio (π_θ/π_old)^(1/|y|), tiny clip range     seq-mean-token-mean
    cispo    REINFORCE weighted by sg(clip(ratio, ·, 1+ε_high))      token-mean

Advantages arrive per sequence (`advantages_B`) and are broadcast over the sequence's tokens. Metrics carry the
names verl logs (`pg_clipfrac`, `pg_clipfrac_lower`, `ppo_kl`) plus our own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
PARTIAL_ROLLOUT_MODES = ("mask_old_segments", "anchor_to_behaviour")


@dataclass
class LossConfig:
    tau: float = 0.05                 # K1.5/K2 τ: the strength of the squared log-ratio anchor to π_old
    length_normalize: bool = False    # divide each sample's squared term by its policy-token count (OpenKimi)
    clip_low: float = 0.2             # PPO-style clip range (grpo, dapo, dr_grpo)
    clip_high: float = 0.2            # dapo's clip-higher uses a larger value (dapo_clip_high)
    max_len: int = 0                  # dr_grpo's constant normaliser (0: the batch's longest response)
    agg_mode: str = ""                # "" = each loss's own aggregation (module docstring); else one of AGG_MODES
    dual_clip_c: float = 3.0          # dual-clip bound for negative advantages (grpo, dapo, dr_grpo); 0 disables
    dapo_clip_high: float = 0.28      # DAPO's ε_high (arXiv 2503.14476)
    gspo_clip_low: float = 3e-4       # GSPO's sequence-ratio clip range (arXiv 2507.18071 §5.1)
    gspo_clip_high: float = 4e-4
    cispo_clip_high: float = 4.0      # CISPO's IS-weight cap ε_high (MiniMax-M1 arXiv 2506.13585; ScaleRL uses 4)
    cispo_clip_low: float = 0.0       # 0: no lower bound on the IS weight (MiniMax-M1 sets none)

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.agg_mode and self.agg_mode not in AGG_MODES:
            raise ValueError(f"unknown agg_mode {self.agg_mode!r}; valid: {', '.join(AGG_MODES)}")


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


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, max_len: int = 0) -> torch.Tensor:
    """verl's `agg_loss` modes on one (global) batch. Fully masked rows do not count as sequences."""
    if mode == "token-mean":
        return masked_mean(loss_BT, mask_BT)
    tokens_B = mask_BT.sum(-1)
    n_seqs = (tokens_B > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return ((loss_BT * mask_BT).sum(-1) / tokens_B.clamp(min=1)).sum() / n_seqs
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_mean = (loss_BT * mask_BT).sum(-1).sum() / n_seqs
        return seq_mean / (max_len or loss_BT.shape[-1]) if mode.endswith("-norm") else seq_mean
    raise ValueError(f"unknown agg_mode {mode!r}; valid: {', '.join(AGG_MODES)}")


def kimi_k15_terms(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor,
                   mask_BT: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence (A − τΔ)²/(2τ) (÷|y| when length-normalised), Δ, and A − τΔ: what `kimi_k15` averages (and
    what the verl plugin hands to verl's global-batch aggregation)."""
    mask_BT = mask_BT.float()
    delta_B = ((logp_BT.float() - old_logp_BT.float()) * mask_BT).sum(-1)
    residual_B = advantages_B.float() - cfg.tau * delta_B
    sq_B = residual_B.pow(2) / (2 * cfg.tau)
    if cfg.length_normalize:
        sq_B = sq_B / mask_BT.sum(-1).clamp(min=1)
    return sq_B, delta_B, residual_B


@register_policy_loss("kimi_k15")
def kimi_k15(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor, mask_BT: torch.Tensor,
             cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    sq_B, delta_B, residual_B = kimi_k15_terms(logp_BT, old_logp_BT, advantages_B, mask_BT, cfg)
    loss = sq_B.mean()
    return loss, kimi_k15_metrics(logp_BT, old_logp_BT, advantages_B, mask_BT, delta_B, residual_B)


def kimi_k15_metrics(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor,
                     mask_BT: torch.Tensor, delta_B: torch.Tensor, residual_B: torch.Tensor) -> dict[str, float]:
    mask_BT = mask_BT.float()
    n_tokens_B = mask_BT.sum(-1).clamp(min=1)
    with torch.no_grad():
        return {"delta_abs_mean": delta_B.abs().mean().item(),
                "kl_proxy": (-delta_B / n_tokens_B).mean().item(),
                "ppo_kl": masked_mean(old_logp_BT.float() - logp_BT.float(), mask_BT).item(),
                "residual_abs_mean": residual_B.abs().mean().item(),  # |A − τΔ|: 0 at the minimiser
                "adv_abs_mean": advantages_B.float().abs().mean().item()}


def _ppo_clip(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor, mask_BT: torch.Tensor,
              clip_low: float, clip_high: float, dual_clip_c: float, agg_mode: str, max_len: int
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip with an optional dual clip (Ye et al. 2019) for A < 0, as verl's `vanilla` loss."""
    mask_BT = mask_BT.float()
    adv_BT = advantages_B.float()[:, None].expand_as(mask_BT)
    log_ratio_BT = (logp_BT.float() - old_logp_BT.float()).clamp(-20.0, 20.0)
    ratio_BT = log_ratio_BT.exp()
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * ratio_BT.clamp(1 - clip_low, 1 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    clipfrac_lower = torch.zeros(())
    if dual_clip_c > 0:
        dual_BT = -adv_BT * dual_clip_c
        negative_BT = adv_BT < 0
        clipfrac_lower = masked_mean(((loss_BT > dual_BT) & negative_BT).float(), mask_BT)
        loss_BT = torch.where(negative_BT, torch.minimum(loss_BT, dual_BT), loss_BT)
    loss = aggregate(loss_BT, mask_BT, agg_mode, max_len)
    with torch.no_grad():
        return loss, {"pg_clipfrac": masked_mean((clipped_BT > unclipped_BT).float(), mask_BT).item(),
                      "pg_clipfrac_high": masked_mean(((ratio_BT > 1 + clip_high) & (adv_BT > 0)).float(),
                                                      mask_BT).item(),
                      "pg_clipfrac_low": masked_mean(((ratio_BT < 1 - clip_low) & (adv_BT < 0)).float(),
                                                     mask_BT).item(),
                      "pg_clipfrac_lower": clipfrac_lower.item(),
                      "ppo_kl": masked_mean(-log_ratio_BT, mask_BT).item(),
                      "ratio_mean": masked_mean(ratio_BT, mask_BT).item(),
                      "ratio_max": ratio_BT.masked_fill(mask_BT == 0, 0).max().item() if mask_BT.numel() else 0.0}


@register_policy_loss("grpo")
def grpo(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor, mask_BT: torch.Tensor,
         cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    return _ppo_clip(logp_BT, old_logp_BT, advantages_B, mask_BT, cfg.clip_low, cfg.clip_high, cfg.dual_clip_c,
                     cfg.agg_mode or "seq-mean-token-mean", cfg.max_len)


@register_policy_loss("dapo")
def dapo(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor, mask_BT: torch.Tensor,
         cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    return _ppo_clip(logp_BT, old_logp_BT, advantages_B, mask_BT, cfg.clip_low, cfg.dapo_clip_high,
                     cfg.dual_clip_c, cfg.agg_mode or "token-mean", cfg.max_len)


@register_policy_loss("dr_grpo")
def dr_grpo(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor, mask_BT: torch.Tensor,
            cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Dr. GRPO (arXiv 2503.20783): token sums over a constant length (no per-response length bias); pair it with
    an estimator that does not divide by the group std (`mean` or `grpo` with `norm_by_std=False`)."""
    return _ppo_clip(logp_BT, old_logp_BT, advantages_B, mask_BT, cfg.clip_low, cfg.clip_high, cfg.dual_clip_c,
                     cfg.agg_mode or "seq-mean-token-sum-norm", cfg.max_len)


@register_policy_loss("gspo")
def gspo(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor, mask_BT: torch.Tensor,
         cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO: s_i = exp(mean_t log-ratio), used per token as sg[s_i]·π_θ/sg[π_θ] so the gradient is the
    sequence's (length-normalised) log-likelihood gradient scaled by s_i, clipped at the sequence level."""
    mask_BT = mask_BT.float()
    adv_BT = advantages_B.float()[:, None].expand_as(mask_BT)
    log_ratio_BT = logp_BT.float() - old_logp_BT.float()
    seq_log_ratio_B = (log_ratio_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)
    token_log_s_BT = (logp_BT.float() - logp_BT.float().detach() + seq_log_ratio_B.detach()[:, None]).clamp(max=10)
    s_BT = token_log_s_BT.exp()
    unclipped_BT = -adv_BT * s_BT
    clipped_BT = -adv_BT * s_BT.clamp(1 - cfg.gspo_clip_low, 1 + cfg.gspo_clip_high)
    loss = aggregate(torch.maximum(unclipped_BT, clipped_BT), mask_BT, cfg.agg_mode or "seq-mean-token-mean",
                     cfg.max_len)
    with torch.no_grad():
        seq_ratio_B = seq_log_ratio_B.exp()
        seq_clipped_B = (seq_ratio_B < 1 - cfg.gspo_clip_low) | (seq_ratio_B > 1 + cfg.gspo_clip_high)
        return loss, {"pg_clipfrac": masked_mean((clipped_BT > unclipped_BT).float(), mask_BT).item(),
                      "seq_clipfrac": seq_clipped_B.float().mean().item() if seq_clipped_B.numel() else 0.0,
                      "pg_clipfrac_lower": 0.0,
                      "ppo_kl": masked_mean(-log_ratio_BT, mask_BT).item(),
                      "seq_ratio_mean": seq_ratio_B.mean().item() if seq_ratio_B.numel() else 0.0}


@register_policy_loss("cispo")
def cispo(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor, mask_BT: torch.Tensor,
          cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO: −sg(clip(r, 1−ε_low, 1+ε_high))·A·log π_θ per token; every token keeps a gradient (unlike PPO, whose
    clipped tokens get none), only its weight is capped."""
    mask_BT = mask_BT.float()
    adv_BT = advantages_B.float()[:, None].expand_as(mask_BT)
    log_ratio_BT = (logp_BT.float() - old_logp_BT.float()).clamp(-20.0, 20.0)
    ratio_BT = log_ratio_BT.exp()
    low = 1 - cfg.cispo_clip_low if cfg.cispo_clip_low > 0 else 0.0
    weight_BT = ratio_BT.clamp(low, 1 + cfg.cispo_clip_high).detach()
    loss = aggregate(-weight_BT * adv_BT * logp_BT.float(), mask_BT, cfg.agg_mode or "token-mean", cfg.max_len)
    with torch.no_grad():
        return loss, {"pg_clipfrac": masked_mean((ratio_BT != weight_BT).float(), mask_BT).item(),
                      "pg_clipfrac_lower": 0.0,
                      "ppo_kl": masked_mean(-log_ratio_BT, mask_BT).item(),
                      "is_weight_mean": masked_mean(weight_BT, mask_BT).item()}


def partial_rollout_mask(mask_BT: torch.Tensor, versions_BT: torch.Tensor, mode: str = "mask_old_segments",
                         current_version: int | None = None, max_staleness: int | None = None) -> torch.Tensor:
    """Which tokens of partial (multi-segment) rollouts enter the loss (rl-design §6.4).

    `mask_old_segments` (K1.5/slime): only the newest segment of each trajectory (tokens whose version equals that
    row's newest policy version) trains; earlier segments are context. `anchor_to_behaviour` (AReaL-style): every
    policy token trains, with Δ taken against its own per-token behaviour log-prob (the `old_logp` the engine
    recorded), except tokens more than `max_staleness` versions behind `current_version`. Env tokens
    (version −1 / mask 0) never train."""
    if mode not in PARTIAL_ROLLOUT_MODES:
        raise ValueError(f"unknown partial-rollout mode {mode!r}; valid: {', '.join(PARTIAL_ROLLOUT_MODES)}")
    mask_BT = mask_BT.bool() & (versions_BT >= 0)
    if mode == "mask_old_segments":
        newest_B = versions_BT.masked_fill(~mask_BT, -1).max(-1).values
        keep_BT = versions_BT == newest_B[:, None]
    else:
        keep_BT = torch.ones_like(mask_BT)
        if max_staleness is not None:
            if current_version is None:
                raise ValueError("anchor_to_behaviour with max_staleness needs current_version")
            keep_BT = current_version - versions_BT <= max_staleness
    return (mask_BT & keep_BT).to(torch.float32)


__all__ = ["AGG_MODES", "LossConfig", "PARTIAL_ROLLOUT_MODES", "POLICY_LOSSES", "aggregate", "cispo", "dapo",
           "dr_grpo", "get_policy_loss", "grpo", "gspo", "kimi_k15", "kimi_k15_metrics", "kimi_k15_terms",
           "masked_mean", "partial_rollout_mask", "register_policy_loss"]
