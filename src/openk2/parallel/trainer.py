"""The pretraining loop on a parallel layout: `torchrun --nproc-per-node N -m openk2 pretrain ...`.

`DistributedTrainer` is the single-process `Trainer` (same config, schedule, metrics, checkpoint cadence) with the
distributed pieces swapped in; `run_pretrain` picks it when launched by torchrun, when the `[parallel]` section
asks for anything beyond one plain process (activation switches included), or when the run directory's latest
checkpoint is a distributed one. Otherwise the single-process trainer runs exactly as before.

Order of work: the layout is resolved and checked against the model before anything else (a bad layout fails
in seconds); the process group is joined; rank 0 alone builds the tokenizer and token shards, the others wait
and then read them; each rank loads the data shard of its data-parallel index (pipeline ranks of one index
read the same batches); every rank builds the same model and `parallelize` keeps its part. Only rank 0 logs and
writes the run files; checkpoints are collective DCP writes (`openk2.parallel.dist_checkpoint`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from openk2.model import build_model, get_preset
from openk2.model.dtype import DtypePolicy
from openk2.parallel import dist_checkpoint
from openk2.parallel.layout import LayoutError, ParallelLayout
from openk2.parallel.optim import DistributedMuonClip
from openk2.parallel.parallelize import ParallelDims, init_distributed, launched_by_torchrun, parallelize
from openk2.parallel.step import all_reduce_sum, eval_loss, train_step
from openk2.train.checkpoint import latest_checkpoint, rng_state, set_rng_state
from openk2.train.config import TrainConfig, TrainConfigError
from openk2.train.data_setup import prepare_data
from openk2.train.metrics import MetricsLogger
from openk2.train.trainer import Trainer, seed_everything, validation_metrics


def wants_distributed(cfg: TrainConfig) -> bool:
    """Whether `openk2 pretrain` must run the distributed trainer for this config and run directory."""
    if launched_by_torchrun():
        return True
    layout = ParallelLayout.from_section(cfg.parallel)
    if layout != ParallelLayout(dp_shard=layout.dp_shard) or layout.dp_shard not in (-1, 1):
        return True
    latest = latest_checkpoint(Path(cfg.run.dir))
    return latest is not None and dist_checkpoint.is_dcp_checkpoint(latest)


class _NullMetrics:
    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def resolve_layout(cfg: TrainConfig, world_size: int) -> ParallelLayout:
    """The run's layout for `world_size` ranks, checked against the model; raises TrainConfigError."""
    try:
        layout = ParallelLayout.from_section(cfg.parallel).resolve(world_size)
        # The vocabulary follows the tokenizer, which does not exist yet; nothing checked here depends on it.
        overrides = {k: v for k, v in cfg.model.overrides.items() if k != "vocab_size"}
        layout.validate_model(get_preset(cfg.model.preset, **overrides), cfg.train.batch_size)
    except LayoutError as e:
        raise TrainConfigError(str(e)) from e
    return layout


class DistributedTrainer(Trainer):
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        t = cfg.train
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.layout = resolve_layout(cfg, world)
        self.policy = DtypePolicy.resolve(t.device, t.dtype)
        if world > 1:
            self.rank, _, device = init_distributed(self.policy.device.type)
            self.policy = DtypePolicy(device, self.policy.compute_dtype)
        else:
            self.rank = 0
        self.dims = ParallelDims.build(self.layout, self.policy.device)
        self.is_main = self.rank == 0
        self.run_dir = Path(cfg.run.dir)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(t.seed, t.deterministic)
        dp, dp_rank = self.layout.dp, self.dims.dp_rank
        if self.is_main:  # tokenizer and shards are built once, by rank 0
            self.data = prepare_data(cfg, rank=dp_rank, world_size=dp)
        self._barrier()
        if not self.is_main:
            self.data = prepare_data(cfg, rank=dp_rank, world_size=dp)
        self.model_config = self._model_config()
        resume_from = latest_checkpoint(self.run_dir)
        if resume_from is not None and not dist_checkpoint.is_dcp_checkpoint(resume_from):
            raise TrainConfigError(
                f"{resume_from} is a single-process checkpoint (state.pt); a parallel run resumes from distributed "
                "(DCP) checkpoints only. Start a new run.dir with init.from_checkpoint to reuse its weights."
            )
        if self.is_main:
            self._check_run_config(resume_from)
        model = build_model(self.model_config, device=self.policy.device, seed=t.seed)
        init_from = Path(cfg.init.from_checkpoint) if resume_from is None and cfg.init.from_checkpoint else None
        if init_from is not None and not self._init_is_dcp(init_from):
            self.model = model
            self._init_from(init_from)  # a single-process checkpoint: the full model, before sharding
        param_dtype = self.policy.compute_dtype if self.policy.device.type == "cuda" else None
        self.pm = parallelize(model, self.dims, param_dtype=param_dtype)
        self.model = self.pm.model
        if init_from is not None and self._init_is_dcp(init_from):
            dist_checkpoint.load(self._dcp_dir(init_from), self.model)
        self.optimizer = self._build_optimizer()
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.step = 0
        self.tokens = 0
        if resume_from is not None:
            self._resume(resume_from)
        self.metrics = (MetricsLogger(self.run_dir, tensorboard=cfg.run.tensorboard, resume_step=self.step)
                        if self.is_main else _NullMetrics())
        if self.is_main:
            if not (self.run_dir / "tokenizer" / "tokenizer.json").is_file():
                self.data.tokenizer.save(self.run_dir / "tokenizer")
            print(f"openk2 parallel layout: {self.layout.describe()}")

    # ----------------------------------------------------------------- setup
    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    @staticmethod
    def _dcp_dir(path: Path) -> Path:
        return latest_checkpoint(path) if (path / "checkpoints").is_dir() else path

    def _init_is_dcp(self, path: Path) -> bool:
        d = self._dcp_dir(path)
        return d is not None and dist_checkpoint.is_dcp_checkpoint(d)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        if t.optimizer == "adamw":
            return torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                     betas=(0.9, 0.95))
        return DistributedMuonClip(self.model, lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum,
                                   qk_clip_tau=t.qk_clip_tau if t.qk_clip_tau > 0 else None,
                                   dp_group=self.dims.dp_group)

    def _resume(self, ckpt_dir: Path) -> None:
        extra = dist_checkpoint.load(ckpt_dir, self.model, self.optimizer)
        self.step, self.tokens = int(extra["step"]), int(extra["tokens"])
        loaders = extra.get("loaders", [])
        if len(loaders) == self.layout.dp:
            self.data.loader.load_state_dict(loaders[self.dims.dp_rank])
        elif self.is_main:
            # The loader's document order depends on the number of data shards; it cannot be resharded.
            print(f"resuming with {self.layout.dp} data-parallel ranks instead of {len(loaders)}: each rank's "
                  "document stream restarts (weights, optimizer and step are restored)")
        if "rng" in extra:
            set_rng_state(extra["rng"])
        if self.is_main:
            print(f"resumed from {ckpt_dir} at step {self.step} (saved as: {extra.get('layout', '?')})")

    def save(self) -> Path:
        states = dist_checkpoint._gather_objects((self.dims.pp_rank, self.data.loader.state_dict()))
        loaders = [s for pp_rank, s in states if pp_rank == 0]  # dp ranks in rank order (pp is outermost)
        extra = {
            "step": self.step, "tokens": self.tokens, "loaders": loaders, "rng": rng_state(),
            "model_config": self.model_config.to_hf_dict(), "config": self.cfg.to_dict(),
            "layout": self.layout.describe(),
        }
        return dist_checkpoint.save(self.run_dir / "checkpoints", self.step, self.model, self.optimizer, extra,
                                    keep_last=self.cfg.train.keep_last)

    # --------------------------------------------------------------- training
    def train_step(self) -> dict[str, Any]:
        t = self.cfg.train
        micro = [next(self.data.loader) for _ in range(t.grad_accum)]
        mult = self.lr_multiplier(self.step)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * mult
        out = train_step(self.pm, self.optimizer, micro, grad_clip=t.grad_clip)
        self.step += 1
        self.tokens += sum(x.numel() for x, _ in micro) * self.layout.dp
        record = {"step": self.step, "loss": out["loss"], "lr": self._base_lrs[0] * mult, "tokens": self.tokens,
                  "grad_norm": out["grad_norm"] if t.grad_clip > 0 else float("nan")}
        record.update(self._optimizer_stats())
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and bits per byte over every data shard's held-out batches, overall and per source."""
        sums: dict[str, tuple[float, int, int]] = {}
        token_bytes = self.data.token_bytes
        for source in self.data.val_sources:
            batches = list(self.data.val_batches(source))
            # Every rank must run the same number of forwards (FSDP, EP and PP communicate inside them).
            batches = batches[: self._min_over_ranks(len(batches))]
            loss_sum, n_tokens = eval_loss(self.pm, batches)
            n_bytes = sum(int(token_bytes[y[y != -100]].sum()) for _, y in batches)
            (n_bytes,) = all_reduce_sum([n_bytes], self.dims.dp_group)
            sums[source] = (loss_sum, int(n_tokens), int(n_bytes))
        return validation_metrics(sums)

    def _min_over_ranks(self, n: int) -> int:
        if not dist.is_initialized():
            return n
        t = torch.tensor([n], dtype=torch.int64, device=_reduce_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def train(self) -> dict[str, Any]:
        try:
            return super().train()  # the single-process loop; this class swaps its step, evaluation and saving
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _reduce_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_distributed_pretrain(cfg: TrainConfig) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    return DistributedTrainer(cfg).train()


__all__ = ["DistributedTrainer", "resolve_layout", "run_distributed_pretrain", "wants_distributed"]
