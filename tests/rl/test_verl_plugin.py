"""The verl plugin against real verl (`verl.trainer.ppo.core_algos`): registration, and the registered functions
compute what openk2's own do; verl's built-in grpo/rloo/vanilla agree with our estimators and PPO loss.

Skipped without verl. CI installs it without its GPU stack (docs/rl.md, "Testing the verl plugin"):
    pip install --no-deps verl==0.9.1 ray tensordict omegaconf antlr4-python3-runtime==4.9.3 msgpack pyvers \
        cloudpickle codetiming orjson
"""

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                 reason="verl is not installed (pip install 'openk2[verl]'; see docs/rl.md)")

from openk2.rl import verl_plugin  # noqa: E402
from openk2.rl.advantages import AdvantageConfig, get_advantage_estimator  # noqa: E402
from openk2.rl.losses import LossConfig, get_policy_loss  # noqa: E402

B, T = 6, 5
UIDS = np.array(["p0", "p1", "p0", "p1", "p0", "p2"], dtype=object)
GROUPS = torch.tensor([0, 1, 0, 1, 0, 2])


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask_BT = torch.ones(B, T)
    mask_BT[1, 2:] = 0
    mask_BT[3, 4:] = 0
    old_BT = -torch.rand(B, T, generator=gen) * 2
    logp_BT = (old_BT + 0.3 * torch.randn(B, T, generator=gen)).requires_grad_(True)
    rewards_B = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 1.0])
    token_rewards_BT = torch.zeros(B, T)
    last_B = mask_BT.sum(-1).long() - 1
    token_rewards_BT[torch.arange(B), last_B] = rewards_B  # verl puts the score on the last response token
    return logp_BT, old_BT, mask_BT, rewards_B, token_rewards_BT


def actor_config(**kw):
    from verl.workers.config import FSDPActorConfig

    return FSDPActorConfig(strategy="fsdp", rollout_n=3, ppo_micro_batch_size_per_gpu=2, **kw)


def test_registered_under_verl_names():
    assert core_algos.get_policy_loss_fn("kimi_k15") is verl_plugin.compute_policy_loss_kimi_k15
    assert core_algos.get_adv_estimator_fn("kimi_mean") is verl_plugin.compute_kimi_mean_advantage
    assert core_algos.get_adv_estimator_fn("partition_loo") is verl_plugin.compute_partition_loo_advantage


def test_advantages_match_ours_and_verls_own_grpo_and_rloo():
    _, _, mask_BT, rewards_B, token_rewards_BT = batch()
    adv_BT, returns_BT = core_algos.get_adv_estimator_fn("kimi_mean")(token_level_rewards=token_rewards_BT,
                                                                      response_mask=mask_BT, index=UIDS)
    ours_B = get_advantage_estimator("mean")(rewards_B, GROUPS, AdvantageConfig())
    torch.testing.assert_close(adv_BT, ours_B[:, None] * mask_BT)
    torch.testing.assert_close(returns_BT, adv_BT)
    verl_grpo, _ = core_algos.compute_grpo_outcome_advantage(token_rewards_BT, mask_BT, UIDS,
                                                             norm_adv_by_std_in_grpo=True)
    ours_grpo = get_advantage_estimator("grpo")(rewards_B, GROUPS, AdvantageConfig())[:, None] * mask_BT
    # Row 5 is a singleton group: verl's grpo leaves it at r (mean 0, std 1), ours gives 0 (nothing to compare).
    torch.testing.assert_close(verl_grpo[:5], ours_grpo[:5], atol=1e-5, rtol=1e-5)
    verl_rloo, _ = core_algos.compute_rloo_vectorized_outcome_advantage(token_rewards_BT, mask_BT, UIDS)
    torch.testing.assert_close(verl_rloo, get_advantage_estimator("rloo")(rewards_B, GROUPS, AdvantageConfig())[:, None]
                               * mask_BT)
    verl_plugin.configure(tau=0.5)
    try:
        ploo_BT, _ = core_algos.get_adv_estimator_fn("partition_loo")(token_level_rewards=token_rewards_BT,
                                                                      response_mask=mask_BT, index=UIDS)
    finally:
        verl_plugin._SETTINGS.clear()
    torch.testing.assert_close(ploo_BT, get_advantage_estimator("partition_loo")(
        rewards_B, GROUPS, AdvantageConfig(tau=0.5))[:, None] * mask_BT)


@pytest.mark.parametrize("length_normalize", [False, True])
def test_kimi_k15_loss_and_gradient_match_ours(monkeypatch, length_normalize):
    logp_BT, old_BT, mask_BT, rewards_B, _ = batch(1)
    adv_B = get_advantage_estimator("mean")(rewards_B, GROUPS, AdvantageConfig())
    monkeypatch.setenv("OPENK2_KIMI_TAU", "0.2")
    monkeypatch.setenv("OPENK2_KIMI_LENGTH_NORMALIZE", str(length_normalize).lower())
    config = actor_config()
    loss_fn = core_algos.get_policy_loss_fn("kimi_k15")
    loss, metrics = loss_fn(old_log_prob=old_BT, log_prob=logp_BT, advantages=adv_B[:, None] * mask_BT,
                            response_mask=mask_BT, loss_agg_mode="token-mean", config=config)
    want, want_metrics = get_policy_loss("kimi_k15")(logp_BT, old_BT, adv_B, mask_BT,
                                                     LossConfig(tau=0.2, length_normalize=length_normalize))
    torch.testing.assert_close(loss, want)
    (grad,) = torch.autograd.grad(loss, logp_BT)
    (want_grad,) = torch.autograd.grad(want, logp_BT)
    torch.testing.assert_close(grad, want_grad)
    assert metrics["actor/delta_abs_mean"] == pytest.approx(want_metrics["delta_abs_mean"])
    # Data-parallel: verl normalises by the global batch (here 2 ranks, 12 sequences) and scales by dp_size.
    config.global_batch_info.update(dp_size=2, global_batch_size=12)  # verl fills it in place per step
    dp_loss, _ = loss_fn(old_BT, logp_BT, adv_B[:, None] * mask_BT, mask_BT, "token-mean", config)
    torch.testing.assert_close(dp_loss, want * B / 12 * 2)


def test_our_grpo_token_mean_matches_verls_vanilla_ppo():
    logp_BT, old_BT, mask_BT, rewards_B, _ = batch(2)
    adv_B = get_advantage_estimator("grpo")(rewards_B, GROUPS, AdvantageConfig())
    config = actor_config(clip_ratio=0.2)
    theirs, their_metrics = core_algos.get_policy_loss_fn("vanilla")(old_BT, logp_BT, adv_B[:, None] * mask_BT,
                                                                     mask_BT, "token-mean", config)
    ours, metrics = get_policy_loss("grpo")(logp_BT, old_BT, adv_B, mask_BT, LossConfig(agg_mode="token-mean"))
    torch.testing.assert_close(ours, theirs)
    assert metrics["pg_clipfrac"] == pytest.approx(their_metrics["actor/pg_clipfrac"])
    assert metrics["pg_clipfrac_lower"] == pytest.approx(their_metrics["actor/pg_clipfrac_lower"])
    assert metrics["ppo_kl"] == pytest.approx(their_metrics["actor/ppo_kl"], abs=1e-6)


def test_verl_loads_the_plugin_from_its_external_modules_variable():
    """What a Ray worker does: `import verl` with VERL_USE_EXTERNAL_MODULES (or openk2's `verl.plugins` entry
    point) set, nothing imported by hand."""
    import os
    import subprocess
    import sys

    code = ("import verl\nfrom verl.trainer.ppo import core_algos as c\n"
            "print(c.get_policy_loss_fn('kimi_k15').__module__, 'partition_loo' in c.ADV_ESTIMATOR_REGISTRY)")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "openk2.rl.verl_plugin",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert out.stdout.split() == ["openk2.rl.verl_plugin", "True"], out.stderr[-2000:]
