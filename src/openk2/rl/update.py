"""The trainer side of an RL step: per-token log-probs of sampled responses, the policy loss from the registry,
an optional PTX loss, and one (or `minibatches`) optimizer step(s), colocated with the rollout engine.

    updater = PolicyUpdater(model, cfg.train, ptx=PTXData.from_files(files, fmt, ...))
    metrics = updater.update(trajectories, advantages_B, temperature=0.9)

π_old (rl-design §6.3): `old_logprobs = "recompute"` scores the batch with the trainer before the first update
(at T = 1, the policy itself; with one optimizer step per batch that equals the detached current log-probs, so
no extra forward runs), `"behaviour"` uses the engine's per-token behaviour log-probs (anchor_to_behaviour).
Samples whose advantage is zero carry no gradient at θ = θ_old and are left out of the forward passes when that
is exact (recompute, one minibatch); the loss is rescaled so the step equals the full batch's.
A non-finite loss or gradient skips the optimizer step (counted in `skipped_updates`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from openk2.rl.losses import LossConfig, get_policy_loss
from openk2.rl.types import Trajectory


def pad_batch(trajs: list[Trajectory]) -> dict[str, torch.Tensor]:
    """Per response position r of each trajectory (right-padded to the longest response, [B, R]): its loss mask,
    behaviour log-prob and policy version."""
    B = len(trajs)
    R = max(max(len(t.response_ids) for t in trajs), 1)
    mask_BR = torch.zeros((B, R), dtype=torch.float32)
    behav_BR = torch.zeros((B, R), dtype=torch.float32)
    version_BR = torch.full((B, R), -1, dtype=torch.long)
    for b, t in enumerate(trajs):
        n = len(t.response_ids)
        if n:
            mask_BR[b, :n] = torch.tensor(t.loss_mask, dtype=torch.float32)
            behav_BR[b, :n] = torch.tensor(t.behav_logprobs, dtype=torch.float32)
            version_BR[b, :n] = torch.tensor(t.versions)
    return {"mask_BR": mask_BR, "behav_BR": behav_BR, "version_BR": version_BR}


def response_logprobs(model: torch.nn.Module, trajs: list[Trajectory], temperature: float = 1.0) -> torch.Tensor:
    """log π(response token | prefix) [B, R] at `temperature` (`openk2.rl.logprobs.token_logprobs`)."""
    from openk2.rl.logprobs import token_logprobs

    return token_logprobs(model, [t.prompt_ids + t.response_ids for t in trajs], [len(t.prompt_ids) for t in trajs],
                          temperature=temperature)


@dataclass
class PTXData:
    """The PTX loss's data (InstructGPT's ptx, K2 §3.2.3): packed chat rows, loss on assistant tokens (and on every
    token of a plain-text `{"text": ...}` record); conversations longer than a row are split at their user turns."""

    loader: Any  # openk2.train.sft_data.SFTLoader

    @classmethod
    def from_files(cls, files: list[str], chat_format: Any, batch_size: int, seq_len: int = 256,
                   seed: int = 0) -> PTXData:
        from openk2.train.sft_data import SFTLoader, read_chat_jsonl, tokenize_conversations

        convs, _ = read_chat_jsonl(files, on_error="skip")
        rows, _ = tokenize_conversations(convs, chat_format, max_len=seq_len + 1, on_error="skip", too_long="split")
        pad = getattr(chat_format.tokenizer, "pad_id", None) or 0
        return cls(SFTLoader(rows, batch_size, seq_len, pad, seed))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loader.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


class PolicyUpdater:
    def __init__(self, model: torch.nn.Module, cfg: Any, ptx: PTXData | None = None) -> None:
        """`cfg`: the RL config's TrainSection."""
        self.model, self.cfg, self.ptx = model, cfg, ptx
        self.loss_fn = get_policy_loss(cfg.loss)
        self.loss_cfg = LossConfig(tau=cfg.tau, length_normalize=cfg.length_normalize, clip_low=cfg.clip_low,
                                   clip_high=cfg.clip_high)
        self.optimizer = self._build_optimizer()
        self.skipped_updates = 0

    def _build_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        if c.optimizer == "adamw":
            return torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.95))
        from openk2.optim import MuonClip

        return MuonClip(self.model, lr=c.lr, weight_decay=c.weight_decay)

    def update(self, trajs: list[Trajectory], advantages_B: torch.Tensor, temperature: float = 1.0,
               current_version: int = 0) -> dict[str, Any]:
        c = self.cfg
        B = len(trajs)
        keep = list(range(B))
        exact_skip = c.old_logprobs == "recompute" and c.minibatches == 1
        if exact_skip:
            keep = [i for i in range(B) if abs(float(advantages_B[i])) > 1e-8]
        metrics: dict[str, Any] = {"update/samples": B, "update/samples_with_gradient": len(keep)}
        if not keep and not (self.ptx and c.ptx_coef > 0):
            metrics["update/skipped_no_signal"] = 1
            return metrics
        self.model.train()
        minibatches = [keep[i::c.minibatches] for i in range(c.minibatches)] if keep else [[]]
        # π_old recomputed before the first optimizer step; with one step it equals the live log-probs (detached)
        old_recomputed: dict[int, torch.Tensor] = {}
        if c.old_logprobs == "recompute" and c.minibatches > 1 and keep:
            with torch.no_grad():
                for start in range(0, len(keep), c.micro_batch):
                    idx = keep[start:start + c.micro_batch]
                    lp = response_logprobs(self.model, [trajs[i] for i in idx])
                    old_recomputed.update({i: lp[j] for j, i in enumerate(idx)})
        sums: dict[str, float] = {"loss": 0.0, "kl_sampler": 0.0, "kl_sampler_k3": 0.0, "tokens": 0.0,
                                  "delta_abs": 0.0, "ptx_loss": 0.0}
        for mb in minibatches:
            self.optimizer.zero_grad(set_to_none=True)
            scale_total = len(mb) / (B if exact_skip else max(len(keep), 1))
            finite = True
            for start in range(0, len(mb), c.micro_batch):
                idx = mb[start:start + c.micro_batch]
                mb_trajs = [trajs[i] for i in idx]
                batch = pad_batch(mb_trajs)
                logp_BR = response_logprobs(self.model, mb_trajs)
                mask_BR = batch["mask_BR"].to(logp_BR.device)
                if c.mask_old_segments:
                    mask_BR = mask_BR * (batch["version_BR"].to(logp_BR.device) >= current_version).float()
                if c.old_logprobs == "behaviour":
                    old_BR = batch["behav_BR"].to(logp_BR.device)
                elif old_recomputed:
                    old_BR = torch.zeros_like(logp_BR)
                    for j, i in enumerate(idx):
                        n = min(old_recomputed[i].shape[0], old_BR.shape[1])
                        old_BR[j, :n] = old_recomputed[i][:n]
                else:
                    old_BR = logp_BR.detach()
                adv_B = advantages_B[idx].to(logp_BR.device)
                loss, m = self.loss_fn(logp_BR, old_BR, adv_B, mask_BR, self.loss_cfg)
                loss = loss * (len(idx) / max(len(mb), 1)) * scale_total
                if not torch.isfinite(loss):
                    finite = False
                    break
                loss.backward()
                sums["loss"] += float(loss.detach())
                sums["delta_abs"] += m.get("delta_abs_mean", 0.0) * len(idx)
                if start == 0:  # KL(π_sample ‖ π_trainer at the sampling T) per policy token (k1, k3), on a slice
                    pol = batch["mask_BR"].to(logp_BR.device)
                    if temperature == 1.0:
                        logp_t_BR = logp_BR.detach()
                    else:
                        with torch.no_grad():
                            logp_t_BR = response_logprobs(self.model, mb_trajs, temperature)
                    diff = (batch["behav_BR"].to(logp_BR.device) - logp_t_BR) * pol
                    sums["kl_sampler"] += float(diff.sum())
                    sums["kl_sampler_k3"] += float(((torch.exp(-diff) - 1 + diff) * pol).sum())
                    sums["tokens"] += float(pol.sum())
            if finite and self.ptx is not None and c.ptx_coef > 0:
                inputs, targets = self.ptx.next_batch()
                device = next(self.model.parameters()).device
                ptx_loss = self.model(inputs.to(device), labels=targets.to(device)).loss
                if torch.isfinite(ptx_loss):
                    (c.ptx_coef * ptx_loss / len(minibatches)).backward()
                    sums["ptx_loss"] += float(ptx_loss.detach()) / len(minibatches)
                else:
                    finite = False
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)) if finite \
                else float("nan")
            if not finite or not math.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_updates += 1
                metrics["update/nan_skipped"] = metrics.get("update/nan_skipped", 0) + 1
                continue
            self.optimizer.step()
            metrics["update/grad_norm"] = grad_norm
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        n_tok = max(sums["tokens"], 1.0)
        metrics.update({"update/loss": sums["loss"], "kl_to_sampler": sums["kl_sampler"] / n_tok,
                        "kl_to_sampler_k3": sums["kl_sampler_k3"] / n_tok,
                        "update/delta_abs_mean": sums["delta_abs"] / max(len(keep), 1),
                        "skipped_updates": self.skipped_updates})
        if self.ptx is not None and c.ptx_coef > 0:
            metrics["ptx_loss"] = sums["ptx_loss"]
        return metrics


__all__ = ["PTXData", "PolicyUpdater", "pad_batch", "response_logprobs"]
