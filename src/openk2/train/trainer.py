"""The training loop, one for every layout: MuonClip, WSD schedule, gradient accumulation, clipping, validation,
atomic checkpoints and exact resume.

    trainer = Trainer(load_config("recipes/nano.toml"))   # one process
    trainer.train()
    # torchrun --nproc-per-node 8 -m openk2 pretrain --config ... --set parallel.ep=8   # the same loop on 8 ranks

A single process is the trivial layout: `parallelize` leaves its model whole, and the step, the validation and
the checkpoints are the same code a torchrun job runs. Every rank reads the same global batches
(`train.batch_size` sequences per step, `openk2.train.batch_plan`) and keeps its rows, so the loss curve does not
depend on the layout, and checkpoints (DCP, `openk2.parallel.dist_checkpoint`) name tensors by what they are, so a
run resumes on any other layout and continues the same sample order. Running the same config on an existing run
directory resumes from its latest checkpoint; with deterministic settings the resumed run logs exactly the losses
of an uninterrupted one.

Order of work: the layout and the batch split are checked before anything else (a bad layout fails in seconds);
the process group is joined; rank 0 alone builds the tokenizer and token shards, the others wait and then read
them; every rank builds the same model and `parallelize` keeps its part. Only rank 0 logs and writes run files.
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
import torch.distributed as dist

from openk2.model import K2Model, ModelConfig, build_model, get_preset
from openk2.model.dtype import DtypePolicy
from openk2.parallel import dist_checkpoint
from openk2.parallel.layout import LayoutError, ParallelLayout
from openk2.parallel.parallelize import ParallelDims, init_distributed, parallelize
from openk2.parallel.step import eval_loss, train_step
from openk2.train.batch_plan import BatchPlan
from openk2.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, set_rng_state
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
        # Deterministic mode also fills every torch.empty with NaN by default, a write pass over each new buffer
        # (~5% of a nano CPU step, docs/benchmarks.md). openk2 reads no uninitialized memory, so the results are
        # bit-identical without it (the 10-step run's losses are checked), and the fill only costs time.
        torch.utils.deterministic.fill_uninitialized_memory = False


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_layout(cfg: TrainConfig, world_size: int) -> ParallelLayout:
    """The run's layout for `world_size` ranks, checked against the model and the batch; raises TrainConfigError."""
    try:
        layout = ParallelLayout.from_section(cfg.parallel).resolve(world_size)
        # The vocabulary follows the tokenizer, which does not exist yet; nothing checked here depends on it.
        overrides = {k: v for k, v in cfg.model.overrides.items() if k != "vocab_size"}
        layout.validate_model(get_preset(cfg.model.preset, **overrides))
    except LayoutError as e:
        raise TrainConfigError(str(e)) from e
    BatchPlan.build(cfg.train.batch_size, cfg.train.micro_batch_size, layout.dp,
                    pipeline_microbatches=layout.n_microbatches if layout.pp > 1 else 1)
    return layout


class _NullMetrics:  # ranks other than 0 log nothing
    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    extra_eval: Callable[[K2Model], dict[str, float]] | None = None

    def __init__(self, cfg: TrainConfig, data: PreparedData | None = None,
                 extra_eval: Callable[[K2Model], dict[str, float]] | None = None) -> None:
        """`extra_eval(model)` runs after each validation, on every rank with this rank's model, and its metrics
        join that step's record (e.g. the speedrun's knowledge probes); it may leave the model in eval mode."""
        self.cfg = cfg
        self.extra_eval = extra_eval
        t = cfg.train
        world = _world_size()
        self.layout = resolve_layout(cfg, world)
        self.policy = DtypePolicy.resolve(t.device, t.dtype)
        self._owns_process_group = False
        if world > 1:
            self._owns_process_group = not dist.is_initialized()
            _, _, device = init_distributed(self.policy.device.type)
            self.policy = DtypePolicy(device, self.policy.compute_dtype)
        self.dims = ParallelDims.build(self.layout, self.policy.device)
        self.is_main = self.dims.rank == 0
        self.plan = BatchPlan.build(t.batch_size, t.micro_batch_size, self.layout.dp, self.dims.dp_rank,
                                    self.layout.n_microbatches if self.layout.pp > 1 else 1)
        self.run_dir = Path(cfg.run.dir)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(t.seed, t.deterministic)
        if data is None:  # the tokenizer and shards are built once, by rank 0; the others then read them
            if self.is_main:
                data = prepare_data(cfg)
            self._barrier()
            if not self.is_main:
                data = prepare_data(cfg)
        self.data = data
        # A HF checkpoint to start from (fine-tuning a released or exported model): its config is the model's.
        hf_init = Path(cfg.init.from_checkpoint) if cfg.init.from_checkpoint else None
        self._hf_init = None
        if hf_init is not None and (hf_init / "config.json").is_file():
            from openk2.model.hf import load_hf

            self._hf_init = load_hf(hf_init)
        self.model_config = self._model_config()
        self.step = 0
        self.tokens = 0
        resume_from = latest_checkpoint(self.run_dir)
        if self.is_main:
            self._check_run_config(resume_from)
        model = build_model(self.model_config, device=self.policy.device, seed=t.seed)
        init_from = _checkpoint_dir(Path(cfg.init.from_checkpoint)) \
            if cfg.init.from_checkpoint and self._hf_init is None else None
        if resume_from is None and self._hf_init is not None:
            model.load_state_dict(self._hf_init.state_dict())
        self._hf_init = None
        if resume_from is None and init_from is not None and not _is_dcp(init_from):
            _load_legacy_weights(model, init_from, self.policy.device)  # the whole model, before sharding
        legacy_resume = resume_from is not None and not _is_dcp(resume_from)
        if legacy_resume:
            if world > 1:
                raise TrainConfigError(
                    f"{resume_from} is a single-process checkpoint of an older openk2 (state.pt); resume it on one "
                    "process, or start a new run.dir with init.from_checkpoint to reuse its weights")
            _load_legacy_weights(model, resume_from, self.policy.device)
        # FSDP casts parameters to the compute dtype on CUDA; one process runs under autocast instead.
        param_dtype = self.policy.compute_dtype if self.policy.device.type == "cuda" else None
        self.pm = parallelize(model, self.dims, param_dtype=param_dtype)
        self.model = self.pm.model
        if resume_from is None and init_from is not None and _is_dcp(init_from):
            dist_checkpoint.load(init_from, self.model)
        self.optimizer = self._build_optimizer()
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        if legacy_resume:
            self._resume_legacy(resume_from)
        elif resume_from is not None:
            self._resume(resume_from)
        self.metrics = (MetricsLogger(self.run_dir, tensorboard=cfg.run.tensorboard, resume_step=self.step)
                        if self.is_main else _NullMetrics())
        if self.is_main:
            if not (self.run_dir / "tokenizer" / "tokenizer.json").is_file():
                self.data.tokenizer.save(self.run_dir / "tokenizer")  # exports and serving read it from here
            if world > 1 or t.micro_batch_size:
                print(f"openk2 layout: {self.layout.describe()}; {self.plan.describe()}")

    # ----------------------------------------------------------------- setup
    def _model_config(self) -> ModelConfig:
        if self._hf_init is not None:
            if self.data.tokenizer.vocab_size > self._hf_init.config.vocab_size:
                raise TrainConfigError(f"the tokenizer has {self.data.tokenizer.vocab_size} tokens but the checkpoint "
                                       f"{self.cfg.init.from_checkpoint} only {self._hf_init.config.vocab_size} rows")
            return self._hf_init.config
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
            # A section added since the run was written (e.g. [sft]) reads as its defaults.
            old = {**TrainConfig().to_dict(), **json.loads(stored.read_text())}
            # The layout and the micro-batch size may change between runs: neither changes the losses.
            free = ("run.force", "train.max_steps", "run.progress", "parallel.", "train.micro_batch_size")
            changed = [d for d in diff_configs(old, current) if not d.startswith(free)]
            if changed:
                raise TrainConfigError(
                    f"{self.run_dir} was written by a different config; refusing to resume. Changed keys:\n  "
                    + "\n  ".join(changed) + "\nUse a new run.dir, or --set run.force=true to resume anyway."
                )
        atomic_write_text(stored, json.dumps(current, indent=2))

    def _build_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        if t.optimizer == "adamw":
            return torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95))
        kwargs = dict(lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum,
                      qk_clip_tau=t.qk_clip_tau if t.qk_clip_tau > 0 else None)
        if self.dims.world_mesh is None:
            from openk2.optim import MuonClip

            return MuonClip(self.model, **kwargs)
        from openk2.parallel.optim import DistributedMuonClip

        return DistributedMuonClip(self.model, dp_group=self.dims.dp_group, **kwargs)

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _resume(self, ckpt_dir: Path) -> None:
        extra = dist_checkpoint.load(ckpt_dir, self.model, self.optimizer)
        self.step, self.tokens = int(extra["step"]), int(extra["tokens"])
        if "loader" in extra:
            self.data.loader.load_state_dict(extra["loader"])
        elif len(extra.get("loaders", [])) == 1:  # written by an older openk2 on one data shard
            self.data.loader.load_state_dict(extra["loaders"][0])
        elif self.is_main:  # older openk2 runs kept one stream per data shard; they cannot be merged
            print(f"{ckpt_dir} holds per-rank data streams of an older openk2: the data stream restarts "
                  "(weights, optimizer and step are restored)")
        if "rng" in extra:
            set_rng_state(extra["rng"])
        if self.is_main:
            print(f"resumed from {ckpt_dir} at step {self.step} (saved as: {extra.get('layout', '?')})")

    def _resume_legacy(self, ckpt_dir: Path) -> None:
        state = load_checkpoint(ckpt_dir, map_location=self.policy.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.data.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step, self.tokens = state["step"], state["tokens"]
        print(f"resumed from {ckpt_dir} at step {self.step}")

    def save(self) -> Path:
        """Collective: every rank calls it. A DCP checkpoint any layout can resume (the loader state is the same
        on every rank: they all read one global stream)."""
        extra = {
            "step": self.step, "tokens": self.tokens, "loader": self.data.loader.state_dict(), "rng": rng_state(),
            "model_config": self.model_config.to_hf_dict(), "config": self.cfg.to_dict(),
            "layout": self.layout.describe(),
        }
        return dist_checkpoint.save(self.run_dir / "checkpoints", self.step, self.model, self.optimizer, extra,
                                    keep_last=self.cfg.train.keep_last)

    # --------------------------------------------------------------- training
    def lr_multiplier(self, step: int) -> float:
        t = self.cfg.train
        return wsd_multiplier(step, t.max_steps, t.warmup_steps, t.decay_fraction, t.final_lr_fraction,
                              t.decay_shape)

    def train_step(self) -> dict[str, Any]:
        t = self.cfg.train
        micro = self.plan.micro_batches(*self.data.loader.next_batch(self.plan.rows))
        mult = self.lr_multiplier(self.step)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * mult
        out = train_step(self.pm, self.optimizer, micro, grad_clip=t.grad_clip)
        self.step += 1
        self.tokens += t.batch_size * t.seq_len
        record = {"step": self.step, "loss": out["loss"], "lr": self._base_lrs[0] * mult, "tokens": self.tokens,
                  "grad_norm": out["grad_norm"] if t.grad_clip > 0 else float("nan")}
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
        """Validation loss (nats/token) and bits per byte on the held-out split: over all sources, and per source
        when there are several (e.g. the world's held-out documents vs its held-out styles). The same global
        batches on every layout, each rank evaluating its rows."""
        sums: dict[str, tuple[float, int, int]] = {}
        for source in self.data.val_sources:
            micro, n_bytes = [], 0
            for x_BT, y_BT in self.data.val_batches(source):
                micro += self.plan.micro_batches(x_BT, y_BT)
                n_bytes += int(self.data.token_bytes[y_BT[y_BT != -100]].sum())  # the global batch: no reduce
            loss_sum, n_tokens = eval_loss(self.pm, micro)
            sums[source] = (loss_sum, int(n_tokens), n_bytes)
        return validation_metrics(sums)

    def train(self) -> dict[str, Any]:
        try:
            return self._train()
        finally:
            if self._owns_process_group and dist.is_initialized():
                dist.destroy_process_group()

    def _train(self) -> dict[str, Any]:
        t = self.cfg.train
        if self.step >= t.max_steps:
            if self.is_main:
                print(f"{self.run_dir}: already at step {self.step} >= max_steps {t.max_steps}; nothing to do")
            return {"step": self.step}
        from tqdm.auto import tqdm

        bar = tqdm(total=t.max_steps, initial=self.step, desc="sft" if self.cfg.sft.train_files else "pretrain",
                   unit="step",
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


def _checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory, or the latest checkpoint of a run directory."""
    ckpt = latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
    if ckpt is None or not ((ckpt / "state.pt").is_file() or _is_dcp(ckpt)):
        raise TrainConfigError(f"init.from_checkpoint={path} holds no checkpoint (expected checkpoints/step_*)")
    return ckpt


def _is_dcp(ckpt_dir: Path) -> bool:
    return dist_checkpoint.is_dcp_checkpoint(ckpt_dir)


def _load_legacy_weights(model: K2Model, ckpt_dir: Path, device: torch.device) -> None:
    """The weights of a single-process checkpoint written by an older openk2 (`state.pt`)."""
    state = load_checkpoint(ckpt_dir, map_location=device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise TrainConfigError(f"cannot start from {ckpt_dir}: model shapes differ ({e})") from e


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
    return Trainer(cfg).train()


__all__ = ["Trainer", "resolve_layout", "run_pretrain", "seed_everything", "validation_metrics"]
