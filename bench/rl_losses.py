"""The policy losses as optimisers on a toy verifiable task, at equal samples (no model, no engine: seconds).

    PYTHONPATH=src python bench/rl_losses.py [--steps 60] [--seeds 3] [--epochs 1 4]

Task: 32 prompts, each with a hidden 3-token answer over a 4-token vocabulary (1/64 chance by guessing); the policy
is tabular and autoregressive, logits[prompt, position, previous token, token], initialised with a small bias
toward the answer (`--bias`) so that some samples succeed from the start (RL needs some, rl-design §7). Reward 1 if
the whole answer matches, else 0. Each step samples K = 8 responses for 16 prompts, takes `mean` advantages
(`grpo` for the PPO-family losses, as their papers do) and runs `epochs` Adam steps on the batch (epochs > 1 makes
the data off-policy, where the losses differ). Reported: greedy pass@1 over all 32 prompts after the run, mean over
seeds. One fixed learning rate for all (Adam, 0.1): the point is that every loss learns, not a tuned ranking.
Adam on a tabular policy is close to sign descent, so with one epoch the losses (all REINFORCE-like at θ = θ_old)
take nearly the same steps; see docs/experiments.md.
"""

from __future__ import annotations

import argparse
import json

import torch

from openk2.rl.advantages import AdvantageConfig, get_advantage_estimator
from openk2.rl.losses import LossConfig, get_policy_loss

N_PROMPTS, LENGTH, VOCAB, K, PROMPTS_PER_STEP = 32, 3, 4, 8, 16


def logp_of(logits_PLVV: torch.Tensor, prompts_B: torch.Tensor, tokens_BL: torch.Tensor) -> torch.Tensor:
    prev_BL = torch.cat([torch.zeros_like(tokens_BL[:, :1]), tokens_BL[:, :-1]], 1)
    positions = torch.arange(LENGTH)
    step_logits_BLV = logits_PLVV[prompts_B[:, None], positions[None, :], prev_BL]
    return step_logits_BLV.log_softmax(-1).gather(-1, tokens_BL[..., None]).squeeze(-1)


def sample(logits_PLVV: torch.Tensor, prompts_B: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    tokens, prev = [], torch.zeros_like(prompts_B)
    for pos in range(LENGTH):
        probs = logits_PLVV[prompts_B, pos, prev].softmax(-1)
        prev = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        tokens.append(prev)
    return torch.stack(tokens, 1)


def greedy_pass(logits_PLVV: torch.Tensor, answers_PL: torch.Tensor) -> float:
    prompts = torch.arange(N_PROMPTS)
    tokens, prev = [], torch.zeros(N_PROMPTS, dtype=torch.long)
    for pos in range(LENGTH):
        prev = logits_PLVV[prompts, pos, prev].argmax(-1)
        tokens.append(prev)
    return (torch.stack(tokens, 1) == answers_PL).all(-1).float().mean().item()


def run(loss_name: str, seed: int, steps: int, epochs: int, bias: float) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    answers_PL = torch.randint(0, VOCAB, (N_PROMPTS, LENGTH), generator=gen)
    init = torch.randn(N_PROMPTS, LENGTH, VOCAB, VOCAB, generator=gen) * 0.5
    init.scatter_add_(-1, answers_PL[:, :, None, None].expand(-1, -1, VOCAB, 1), torch.full((N_PROMPTS, LENGTH,
                                                                                             VOCAB, 1), bias))
    logits = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.1)
    loss_fn, cfg = get_policy_loss(loss_name), LossConfig(tau=0.05)
    estimator = get_advantage_estimator("mean" if loss_name == "kimi_k15" else "grpo")
    before = greedy_pass(logits.detach(), answers_PL)
    sampled_pass = []
    for _ in range(steps):
        prompts_B = torch.randperm(N_PROMPTS, generator=gen)[:PROMPTS_PER_STEP].repeat_interleave(K)
        with torch.no_grad():
            tokens_BL = sample(logits, prompts_B, gen)
            old_BL = logp_of(logits, prompts_B, tokens_BL)
        rewards_B = (tokens_BL == answers_PL[prompts_B]).all(-1).float()
        sampled_pass.append(rewards_B.mean().item())
        adv_B = estimator(rewards_B, prompts_B, AdvantageConfig())
        for _ in range(epochs):
            loss, _ = loss_fn(logp_of(logits, prompts_B, tokens_BL), old_BL, adv_B, torch.ones_like(old_BL), cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {"before": before, "after": greedy_pass(logits.detach(), answers_PL),
            "sampled_first5": sum(sampled_pass[:5]) / 5, "sampled_last5": sum(sampled_pass[-5:]) / 5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--bias", type=float, default=0.4, help="initial logit bonus of the answer tokens")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for epochs in args.epochs:
        for name in ("kimi_k15", "grpo", "dapo", "dr_grpo", "gspo", "cispo"):
            runs = [run(name, seed, args.steps, epochs, args.bias) for seed in range(args.seeds)]
            mean = {k: round(sum(r[k] for r in runs) / len(runs), 3) for k in runs[0]}
            print(json.dumps({"loss": name, "epochs": epochs, "steps": args.steps, **mean}))


if __name__ == "__main__":
    main()
