"""Rewards for the RL stage (rl-design §6.2 `Reward`): verifiable (math, code, tool use), shaping (K2 budget
control, K1.5 length penalty), the self-critique rubric critic, and the failure isolation the loop scores
through. See docs/rl.md."""

from openk2.rl.rewards.base import (
    CompositeReward,
    GroupReward,
    SafeReward,
    as_score,
    call_reward,
    response_text,
    score_group,
)
from openk2.rl.rewards.critic import CORE_RUBRICS, PRESCRIPTIVE_RUBRICS, RubricCritic, bradley_terry, parse_verdict
from openk2.rl.rewards.shaping import BudgetPenalty, LengthPenalty, k15_length_rewards
from openk2.rl.rewards.verifiable import CodeReward, EnvReward, MathReward, VerifiableReward

__all__ = [
    "CORE_RUBRICS", "PRESCRIPTIVE_RUBRICS", "BudgetPenalty", "CodeReward", "CompositeReward", "EnvReward",
    "GroupReward", "LengthPenalty", "MathReward", "RubricCritic", "SafeReward", "VerifiableReward", "as_score",
    "bradley_terry", "call_reward", "k15_length_rewards", "parse_verdict", "response_text", "score_group",
]
