"""openk2's K1.5/K2 loss and advantage estimators as a verl plugin (the cluster path, rl-design §8).

Importing this module (with verl installed: `pip install openk2[verl]`) registers

    policy loss   kimi_k15         actor_rollout_ref.actor.policy_loss.loss_mode=kimi_k15
    advantages    kimi_mean        algorithm.adv_estimator=kimi_mean        (K1.5/K2: r − mean_group(r))
                  partition_loo    algorithm.adv_estimator=partition_loo    (OpenKimi "ploo")

computed by the same functions as `openk2.rl.losses` / `openk2.rl.advantages` (`tests/rl/test_verl_plugin.py`
checks the numbers against real verl). verl imports it by itself: openk2 declares a `verl.plugins` entry point,
which `import verl` loads in the driver and in every Ray worker; alternatively set
`VERL_USE_EXTERNAL_MODULES=openk2.rl.verl_plugin`.

Settings: verl's config dataclasses reject unknown keys, so τ and the length normalisation come from
`configure(tau=..., length_normalize=...)` or the environment (`OPENK2_KIMI_TAU`, `OPENK2_KIMI_LENGTH_NORMALIZE`,
read at call time, so set them in the Ray runtime env), or from `policy_loss.kimi_tau` /
`policy_loss.kimi_length_normalize` where a config carries them (e.g. a fork that adds the fields).

Adapting the signatures: verl passes token-level advantages (the outcome advantage broadcast over the response);
the loss takes each sequence's masked mean as A_i. verl aggregates over the *global* batch across data-parallel
ranks (`config.global_batch_info`); the sequence-level loss is handed to verl's own `agg_loss` in
`seq-mean-token-sum` mode (one token per sequence carries its term), so DP/micro-batch scaling is verl's.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from openk2.rl.advantages import AdvantageConfig, mean_baseline, partition_loo
from openk2.rl.losses import LossConfig, kimi_k15_metrics, kimi_k15_terms

try:
    from verl.trainer.ppo import core_algos
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("openk2.rl.verl_plugin needs verl: pip install 'openk2[verl]' (or verl itself)") from exc

_SETTINGS: dict[str, Any] = {}


def configure(tau: float | None = None, length_normalize: bool | None = None) -> None:
    """Set the plugin's τ / length normalisation for this process (workers: use the environment variables)."""
    if tau is not None:
        _SETTINGS["tau"] = float(tau)
    if length_normalize is not None:
        _SETTINGS["length_normalize"] = bool(length_normalize)


def _setting(config: Any, name: str, env: str, default: Any, parse: Any) -> Any:
    policy_loss = getattr(config, "policy_loss", None)
    value = policy_loss.get(f"kimi_{name}") if policy_loss is not None and hasattr(policy_loss, "get") else None
    if value is not None:
        return parse(value)
    if name in _SETTINGS:
        return _SETTINGS[name]
    if os.environ.get(env):
        return parse(os.environ[env])
    return default


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def loss_config(config: Any = None) -> LossConfig:
    return LossConfig(tau=_setting(config, "tau", "OPENK2_KIMI_TAU", LossConfig.tau, float),
                      length_normalize=_setting(config, "length_normalize", "OPENK2_KIMI_LENGTH_NORMALIZE",
                                                LossConfig.length_normalize, _as_bool))


def sequence_advantages(advantages_BT: torch.Tensor, response_mask_BT: torch.Tensor) -> torch.Tensor:
    mask_BT = response_mask_BT.float()
    return (advantages_BT.float() * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)


@core_algos.register_policy_loss("kimi_k15")
def compute_policy_loss_kimi_k15(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                 response_mask: torch.Tensor, loss_agg_mode: str = "seq-mean-token-sum",
                                 config: Any = None, rollout_is_weights: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl signature around `openk2.rl.losses.kimi_k15`. `loss_agg_mode` is ignored (the loss is defined per
    sequence); `rollout_is_weights` (verl's rollout correction) scale each sequence's term by their masked mean."""
    cfg = loss_config(config)
    mask_BT = response_mask.float()
    adv_B = sequence_advantages(advantages, response_mask)
    sq_B, delta_B, residual_B = kimi_k15_terms(log_prob, old_log_prob, adv_B, mask_BT, cfg)
    metrics = kimi_k15_metrics(log_prob, old_log_prob, adv_B, mask_BT, delta_B, residual_B)
    if rollout_is_weights is not None:
        sq_B = sq_B * sequence_advantages(rollout_is_weights, response_mask).detach()
    first_token_BT = mask_BT * (mask_BT.cumsum(-1) == 1)
    batch_info = dict(getattr(config, "global_batch_info", None) or {})
    loss = core_algos.agg_loss(loss_mat=sq_B[:, None] * first_token_BT, loss_mask=first_token_BT,
                               loss_agg_mode="seq-mean-token-sum", **batch_info)
    return loss, {f"actor/{k}": v for k, v in metrics.items()} | {"actor/pg_clipfrac": 0.0,
                                                                   "actor/pg_clipfrac_lower": 0.0}


def _group_ids(index: Any, batch: int) -> torch.Tensor:
    if index is None:
        raise ValueError("kimi advantage estimators need the prompt uid of each sample (verl's `index`)")
    _, inverse = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    if len(inverse) != batch:
        raise ValueError(f"{len(inverse)} uids for {batch} samples")
    return torch.from_numpy(inverse.reshape(-1))


def _outcome(estimator: Any, token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any,
             cfg: AdvantageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    scores_B = token_level_rewards.sum(-1)
    with torch.no_grad():
        adv_B = estimator(scores_B, _group_ids(index, len(scores_B)), cfg).to(token_level_rewards.dtype)
    adv_BT = adv_B[:, None] * response_mask
    return adv_BT, adv_BT


@core_algos.register_adv_est("kimi_mean")
def compute_kimi_mean_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                index: Any = None, config: Any = None, **kwargs: Any
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    return _outcome(mean_baseline, token_level_rewards, response_mask, index, AdvantageConfig())


@core_algos.register_adv_est("partition_loo")
def compute_partition_loo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                    index: Any = None, config: Any = None, **kwargs: Any
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    tau = _setting(config, "tau", "OPENK2_KIMI_TAU", LossConfig.tau, float)
    return _outcome(partition_loo, token_level_rewards, response_mask, index, AdvantageConfig(tau=tau))


__all__ = ["compute_kimi_mean_advantage", "compute_partition_loo_advantage", "compute_policy_loss_kimi_k15",
           "configure", "loss_config", "sequence_advantages"]
