"""The pretraining loop: MuonClip, WSD schedule, gradient accumulation, clipping, validation, atomic
checkpoints and exact resume.

    trainer = Trainer(load_config("recipes/nano.toml"))
    trainer.train()

Running the same config on an existing run directory resumes from its latest checkpoint; with
deterministic settings the resumed run logs exactly the losses of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openk2.model import K2Model, build_model, get_preset
from openk2.model.dtype import DtypePolicy
from openk2.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from openk2.train.config import TrainConfig, TrainConfigError, diff_configs
from openk2.train.data_setup import PreparedData, prepare_data
from openk2.train.metrics import MetricsLogger
from openk2.train.schedule import wsd_multiplier
from openk2.utils.io import atomic_write_text


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_optimizer(model: K2Model, cfg: TrainConfig) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95))
    from openk2.optim import MuonClip

    return MuonClip(model, lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum,
                    qk_clip_tau=t.qk_clip_tau if t.qk_clip_tau > 0 else None)


class Trainer:
    is_main = True  # prints and draws the progress bar (rank 0 of a distributed run)
    extra_eval: Callable[[K2Model], dict[str, float]] | None = None

    def __init__(self, cfg: TrainConfig, data: PreparedData | None = None,
                 extra_eval: Callable[[K2Model], dict[str, float]] | None = None) -> None:
        """`extra_eval(model)` runs after each validation and its metrics join that step's record (e.g. the
        speedrun's knowledge probes); it may leave the model in eval mode."""
        self.cfg = cfg
        self.extra_eval = extra_eval
        self.run_dir = Path(cfg.run.dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t = cfg.train
        self.policy = DtypePolicy.resolve(t.device, t.dtype)
        seed_everything(t.seed, t.deterministic)
        self.data = data or prepare_data(cfg)
        self.model_config = self._model_config()
        self.model = build_model(self.model_config, device=self.policy.device, seed=t.seed)
        self.step = 0
        self.tokens = 0
        resume_from = latest_checkpoint(self.run_dir)
        self._check_run_config(resume_from)
        if resume_from is None and cfg.init.from_checkpoint:
            self._init_from(Path(cfg.init.from_checkpoint))
        self.optimizer = build_optimizer(self.model, cfg)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        if resume_from is not None:
            self._resume(resume_from)
        self.metrics = MetricsLogger(self.run_dir, tensorboard=cfg.run.tensorboard, resume_step=self.step)
        if not (self.run_dir / "tokenizer" / "tokenizer.json").is_file():
            self.data.tokenizer.save(self.run_dir / "tokenizer")  # exports and serving read it from here

    # ----------------------------------------------------------------- setup
    def _model_config(self):
        m = self.cfg.model
        overrides = dict(m.overrides)
        tok_vocab = self.data.tokenizer.vocab_size
        overrides.setdefault("vocab_size", tok_vocab)
        if self.cfg.init.rope_scaling:
            overrides["rope_scaling"] = dict(self.cfg.init.rope_scaling)
        cfg = get_preset(m.preset, **overrides)
        if tok_vocab > cfg.vocab_size:
            raise TrainConfigError(
                f"the tokenizer has {tok_vocab} tokens but model.vocab_size is {cfg.vocab_size}: ids would "
                "index past the embedding. Remove model.overrides.vocab_size or set it >= the tokenizer's size."
            )
        return cfg

    def _check_run_config(self, resume_from: Path | None) -> None:
        stored = self.run_dir / "train_config.json"  # not config.json: that name marks a HF checkpoint
        current = self.cfg.to_dict()
        if resume_from is not None and stored.exists() and not self.cfg.run.force:
            changed = [d for d in diff_configs(json.loads(stored.read_text()), current)
                       # The parallel layout may change between runs: checkpoints are resharded on resume.
                       if not d.startswith(("run.force", "train.max_steps", "run.progress", "parallel."))]
            if changed:
                raise TrainConfigError(
                    f"{self.run_dir} was written by a different config; refusing to resume. Changed keys:\n  "
                    + "\n  ".join(changed) + "\nUse a new run.dir, or --set run.force=true to resume anyway."
                )
        atomic_write_text(stored, json.dumps(current, indent=2))

    def _init_from(self, path: Path) -> None:
        ckpt_dir = latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
        if ckpt_dir is None or not (ckpt_dir / "state.pt").is_file():
            raise TrainConfigError(f"init.from_checkpoint={path} holds no checkpoint (expected checkpoints/step_*)")
        state = load_checkpoint(ckpt_dir, map_location=self.policy.device)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise TrainConfigError(f"cannot start from {ckpt_dir}: model shapes differ ({e})") from e

    def _resume(self, ckpt_dir: Path) -> None:
        state = load_checkpoint(ckpt_dir, map_location=self.policy.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.data.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step, self.tokens = state["step"], state["tokens"]
        print(f"resumed from {ckpt_dir} at step {self.step}")

    def save(self) -> Path:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.data.loader.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "tokens": self.tokens,
            "model_config": self.model_config.to_hf_dict(),
            "config": self.cfg.to_dict(),
        }
        return save_checkpoint(self.run_dir, self.step, state, self.cfg.train.keep_last)

    # --------------------------------------------------------------- training
    def lr_multiplier(self, step: int) -> float:
        t = self.cfg.train
        return wsd_multiplier(step, t.max_steps, t.warmup_steps, t.decay_fraction, t.final_lr_fraction,
                              t.decay_shape)

    def train_step(self) -> dict[str, Any]:
        t, dev = self.cfg.train, self.policy.device
        self.model.train()
        micro = [next(self.data.loader) for _ in range(t.grad_accum)]
        n_tokens = sum(int((y != -100).sum()) for _, y in micro)
        total = 0.0
        for x_BT, y_BT in micro:
            x_BT, y_BT = x_BT.to(dev, non_blocking=True), y_BT.to(dev, non_blocking=True)
            with self.policy.autocast():
                loss_sum = self.model(x_BT, labels=y_BT, reduction="sum", return_logits=False).loss
            # Normalize by the step's valid-token count so accumulation equals one big batch.
            (loss_sum / n_tokens).backward()
            total += float(loss_sum.detach())
        grad_norm = float("nan")
        if t.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip))
        mult = self.lr_multiplier(self.step)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * mult
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += sum(x.numel() for x, _ in micro)
        record = {"step": self.step, "loss": total / n_tokens, "lr": self._base_lrs[0] * mult,
                  "tokens": self.tokens, "grad_norm": grad_norm}
        record.update(self._optimizer_stats())
        return record

    def _optimizer_stats(self) -> dict[str, Any]:
        stats = getattr(self.optimizer, "last_stats", None) or {}
        return {
            "max_logit": stats.get("max_logit", float("nan")),
            "clipped_heads": stats.get("clipped_heads", 0),
            "max_logit_per_layer": stats.get("max_logit_per_layer", []),
            "skipped_steps": stats.get("skipped_steps", 0),
            "max_load_ratio": stats.get("max_load_ratio", float("nan")),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats/token) and bits per byte on the held-out split: over all sources, and per
        source when there are several (e.g. the world's held-out documents vs its held-out styles)."""
        self.model.eval()
        token_bytes = self.data.token_bytes.to(self.policy.device)
        sums: dict[str, tuple[float, int, int]] = {}
        for source in self.data.val_sources:
            loss_sum, n_tokens, n_bytes = 0.0, 0, 0
            for x_BT, y_BT in self.data.val_batches(source):
                x_BT, y_BT = x_BT.to(self.policy.device), y_BT.to(self.policy.device)
                with self.policy.autocast():
                    loss_sum += float(self.model(x_BT, labels=y_BT, reduction="sum", return_logits=False).loss)
                valid = y_BT != -100
                n_tokens += int(valid.sum())
                n_bytes += int(token_bytes[y_BT[valid]].sum())
            sums[source] = (loss_sum, n_tokens, n_bytes)
        self.model.train()
        return validation_metrics(sums)

    def train(self) -> dict[str, Any]:
        t = self.cfg.train
        if self.step >= t.max_steps:
            if self.is_main:
                print(f"{self.run_dir}: already at step {self.step} >= max_steps {t.max_steps}; nothing to do")
            return {"step": self.step}
        from tqdm.auto import tqdm

        bar = tqdm(total=t.max_steps, initial=self.step, desc="pretrain", unit="step",
                   disable=not (self.cfg.run.progress and self.is_main), dynamic_ncols=True)
        last: dict[str, Any] = {}
        t0, tok0 = time.perf_counter(), self.tokens
        try:
            while self.step < t.max_steps:
                record = self.train_step()
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"non-finite loss at step {self.step}; last checkpoint is intact")
                elapsed = time.perf_counter() - t0
                record["tok_per_s"] = (self.tokens - tok0) / max(elapsed, 1e-9)
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                    record.update(self.evaluate())
                    if self.extra_eval is not None:
                        record.update(self.extra_eval(self.model))
                        self.model.train()
                if self.step % t.log_every == 0 or "val_loss" in record:
                    self.metrics.log(record)
                if t.checkpoint_every and (self.step % t.checkpoint_every == 0 or self.step == t.max_steps):
                    self.save()
                if os.environ.get("OPENK2_FAULT_KILL_AT_STEP") == str(self.step):  # crash-resume tests
                    os.kill(os.getpid(), signal.SIGKILL)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:.0f}",
                                max_logit=f"{record['max_logit']:.1f}")
                last = record
        finally:
            bar.close()
            self.metrics.close()
        return last


def validation_metrics(sums: dict[str, tuple[float, int, int]]) -> dict[str, float]:
    """`val_loss` / `val_bpb` over all sources from per-source (loss sum, tokens, bytes), plus `val_loss/<source>`
    for each source when there are several."""
    loss_sum, n_tokens, n_bytes = (sum(v[i] for v in sums.values()) for i in range(3))
    if n_tokens == 0:
        return {}
    out = {"val_loss": loss_sum / n_tokens, "val_bpb": loss_sum / (math.log(2) * max(n_bytes, 1))}
    if len(sums) > 1:
        out.update({f"val_loss/{name}": ls / nt for name, (ls, nt, _) in sums.items() if nt})
    return out


def run_pretrain(cfg: TrainConfig) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from openk2.parallel.trainer import run_distributed_pretrain, wants_distributed

    if wants_distributed(cfg):  # torchrun, a [parallel] layout or switch, or a distributed checkpoint to resume
        return run_distributed_pretrain(cfg)
    return Trainer(cfg).train()
