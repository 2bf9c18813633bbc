"""Pipeline parallelism with `torch.distributed.pipelining`: 1F1B and interleaved 1F1B (virtual stages).

The decoder is cut into `pp x pp_virtual_stages` stages of consecutive layers (even split, or
`parallel.pp_layers`); stage s runs on pp rank s % pp ("loop" order, as torchtitan), the first stage also
embeds, the last also applies the final norm, the LM head and the loss. Each rank keeps only its stages' modules:

* `PipelineRankModel` holds them under K2Model's parameter names and API (`param_groups`, `attention_layers`,
  `moe_layers`, `update_expert_biases`), so the optimizer, QK-Clip and checkpoints work unchanged;
* one `PipelineStageModule` per stage (sharing those modules) is what `PipelineStage` runs and FSDP roots.

The last stage computes the summed cross-entropy of its micro-batch itself (chunked, no [B, T, V] logits), from
targets handed to it in micro-batch order; the schedule's loss function divides by the global token count, and
`scale_grads=False` keeps the sum, so gradients equal the single-process ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from openk2.model.moe import MoE
from openk2.model.rope import rope_cos_sin, rope_inv_freq
from openk2.model.transformer import K2Model, linear_cross_entropy


class PipelineRankModel(nn.Module):
    """The layers of one pp rank with K2Model's names (`model.layers.<i>`, `model.embed_tokens`, `lm_head`)."""

    param_groups = K2Model.param_groups
    update_expert_biases = K2Model.update_expert_biases
    recording_max_logits = K2Model.recording_max_logits

    def __init__(self, model: K2Model, layer_ids: list[int], has_embed: bool, has_head: bool) -> None:
        super().__init__()
        self.config = model.config
        self.model = nn.Module()
        if has_embed:
            self.model.embed_tokens = model.model.embed_tokens
        self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layer_ids})
        if has_head:
            self.model.norm = model.model.norm
            self.lm_head = model.lm_head

    def attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.model.layers.values()]

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers.values() if isinstance(layer.mlp, MoE)]


class PipelineStageModule(nn.Module):
    """One pipeline stage: (embedding) -> its decoder layers -> (final norm, LM head, summed loss)."""

    def __init__(self, rank_model: PipelineRankModel, layer_ids: list[int], first: bool, last: bool) -> None:
        super().__init__()
        self.config = rank_model.config
        self.embed_tokens = rank_model.model.embed_tokens if first else None
        self.layers = nn.ModuleList(rank_model.model.layers[str(i)] for i in layer_ids)
        self.norm = rank_model.model.norm if last else None
        self.lm_head = rank_model.lm_head if last else None
        self.targets: list[torch.Tensor] = []  # last stage: this step's micro-batch targets, in order
        self.loss_sums: list[torch.Tensor] = []  # last stage: summed loss of each micro-batch (detached)
        self._rope: tuple[torch.Tensor, float] | None = None

    def _cos_sin(self, T: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != device:
            self._rope = rope_inv_freq(self.config, device)
        inv_freq, factor = self._rope
        return rope_cos_sin(inv_freq, torch.arange(T, device=device).unsqueeze(0), factor, dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x_BTD = self.embed_tokens(h) if self.embed_tokens is not None else h
        cos_BTR, sin_BTR = self._cos_sin(x_BTD.shape[1], x_BTD.device, x_BTD.dtype)
        for layer in self.layers:
            x_BTD = layer(x_BTD, cos_BTR, sin_BTR)
        if self.lm_head is None:
            return x_BTD
        x_BTD = self.norm(x_BTD)
        y_BT = self.targets.pop(0)
        loss = linear_cross_entropy(x_BTD.reshape(-1, x_BTD.shape[-1]), self.lm_head.weight, y_BT.reshape(-1))
        self.loss_sums.append(loss.detach().float())
        return loss


class Pipeline:
    """This rank's stages, their `PipelineStage`s and the schedule."""

    def __init__(self, dims: Any, rank_model: PipelineRankModel, stage_ids: list[int],
                 stage_modules: list[PipelineStageModule]) -> None:
        self.dims = dims
        self.rank_model = rank_model
        self.stage_ids = stage_ids
        self.stage_modules = stage_modules
        self._schedules: dict[tuple[int, int], Any] = {}
        self._n_tokens = 1.0
        # Dtype of the activations passed between stages (FSDP's param dtype on CUDA, fp32 on CPU).
        self.activation_dtype = torch.float32

    @classmethod
    def split(cls, model: K2Model, dims: Any) -> Pipeline:
        layout = dims.layout
        stage_layers = layout.stage_layers(model.config.num_hidden_layers)
        stage_ids = layout.stages_of_rank(dims.pp_rank)
        n = layout.n_stages
        layer_ids = sorted(i for s in stage_ids for i in stage_layers[s])
        rank_model = PipelineRankModel(model, layer_ids, has_embed=0 in stage_ids, has_head=n - 1 in stage_ids)
        modules = [PipelineStageModule(rank_model, stage_layers[s], s == 0, s == n - 1) for s in stage_ids]
        return cls(dims, rank_model, stage_ids, modules)

    @property
    def has_first(self) -> bool:
        return self.stage_modules[0].embed_tokens is not None

    @property
    def last_module(self) -> PipelineStageModule | None:
        return self.stage_modules[-1] if self.stage_modules[-1].lm_head is not None else None

    def build_schedule(self) -> None:
        """Schedules are built per micro-batch shape on first use (`_schedule_for`)."""
        self._schedules: dict[tuple[int, int], Any] = {}

    def _schedule_for(self, B: int, T: int) -> Any:
        """The schedule for batches of B sequences of T tokens. Stage shapes are given up front (static mode):
        runtime shape inference would run extra forwards on placeholder inputs, which would pollute the expert
        load counts and the max logits QK-Clip reads."""
        key = (B, T)
        if key in self._schedules:
            return self._schedules[key]
        layout, dims = self.dims.layout, self.dims
        mb = B // layout.n_microbatches
        D = self.rank_model.config.hidden_size
        act_dtype = self.activation_dtype
        meta = torch.device("meta")
        stages = []
        for s, m in zip(self.stage_ids, self.stage_modules, strict=True):
            # requires_grad marks what carries gradients between stages (hidden states, the loss).
            inp = (torch.empty(mb, T, dtype=torch.long, device=meta) if s == 0
                   else torch.empty(mb, T, D, dtype=act_dtype, device=meta, requires_grad=True))
            out = (torch.empty((), dtype=torch.float32, device=meta, requires_grad=True) if s == layout.n_stages - 1
                   else torch.empty(mb, T, D, dtype=act_dtype, device=meta, requires_grad=True))
            stages.append(PipelineStage(m, s, layout.n_stages, dims.device, input_args=(inp,), output_args=(out,),
                                        group=dims.pp_group))

        def loss_fn(loss_sum: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
            return loss_sum / self._n_tokens

        if layout.pp_schedule == "1f1b":
            schedule = Schedule1F1B(stages[0], layout.n_microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            schedule = ScheduleInterleaved1F1B(stages, layout.n_microbatches, loss_fn=loss_fn, scale_grads=False)
        self._schedules[key] = schedule
        return schedule

    def _run(self, x_BT: torch.Tensor, y_BT: torch.Tensor, train: bool) -> torch.Tensor:
        last = self.last_module
        if last is not None:
            last.targets = list(y_BT.tensor_split(self.dims.layout.n_microbatches))
            last.loss_sums = []
        args = (x_BT,) if self.has_first else ()
        target = y_BT if last is not None else None
        losses: list[torch.Tensor] | None = [] if last is not None else None
        schedule = self._schedule_for(*x_BT.shape)
        if train:
            schedule.step(*args, target=target, losses=losses, return_outputs=False)
        else:
            # No merged outputs: the last stage returns per-micro-batch scalar losses, which the schedule
            # cannot concatenate (and the summed losses are collected in `loss_sums` anyway).
            schedule.eval(*args, target=target, losses=losses, return_outputs=False)
        if last is None:
            return torch.zeros((), dtype=torch.float32)
        out = torch.stack(last.loss_sums).sum().cpu()
        last.loss_sums = []
        return out

    def forward_backward(self, x_BT: torch.Tensor, y_BT: torch.Tensor, n_tokens: float) -> torch.Tensor:
        self._n_tokens = float(n_tokens)
        return self._run(x_BT, y_BT, train=True)

    @torch.no_grad()
    def loss_sum(self, x_BT: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
        return self._run(x_BT, y_BT, train=False)


__all__ = ["Pipeline", "PipelineRankModel", "PipelineStageModule"]
