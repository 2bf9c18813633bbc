"""MuonClip ([K2] Algorithm 1): Muon on matrices, AdamW on the rest, per-head QK-Clip after every step.

    opt = MuonClip(model, lr=2e-3)          # K2Model: groups from model.param_groups()
    for x, y in batches:
        model(x, labels=y).loss.backward()  # attention layers record per-head max logits themselves
        opt.step()                          # skip on non-finite grads | Muon + AdamW | QK-Clip | expert biases
        opt.zero_grad(set_to_none=True)
        log(opt.last_stats)                 # max logit per layer, heads clipped, skipped steps, load ratio

For your own models pass `params={"muon": [...], "adamw": [...]}` (parameters or (name, parameter) pairs) or
`classify=fn(name, param) -> "muon" | "adamw" | None` (e.g. `moonlight_classifier`); attention modules are found
through `model.attention_layers()` or the protocol in `openk2.optim.qk_clip`. Every trainable parameter must
land in exactly one group.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as _adamw_functional

from openk2.optim.muon import (
    ADJUST_LR_MODES,
    DEFAULT_MAX_BATCH_ELEMS,
    NS_COEFFICIENTS,
    _Bucket,
    muon_update_,
    plan_buckets,
)
from openk2.optim.qk_clip import find_attention_layers, num_heads, qk_clip_

ParamSpec = Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]]
Classifier = Callable[[str, nn.Parameter], "str | None"]

_EMBED_OR_HEAD = re.compile(r"(^|\.)(embed_tokens|embed|embeddings|wte|wpe|lm_head|output|head)(\.|$)")


def moonlight_classifier(name: str, param: nn.Parameter) -> str:
    """Moonlight's split (`examples/toy_train.py`): Muon for >= 2-D weights except embeddings and the LM head
    (matched by name), AdamW for everything else. Review it for your model: `ndim` alone cannot tell an
    embedding from a hidden matrix."""
    if param.ndim in (2, 3) and not _EMBED_OR_HEAD.search(name):
        return "muon"
    return "adamw"


class MuonClip(torch.optim.Optimizer):
    """Muon (batched Newton–Schulz) + AdamW + per-head QK-Clip, built from a model's named parameters.

    Args:
        model: a `K2Model` (groups from `param_groups()`, attention from `attention_layers()`) or any module.
        lr, weight_decay: shared by Muon and AdamW (Moonlight's RMS matching makes that work) unless
            `adamw_lr` / `adamw_weight_decay` override them. Decay is decoupled and uses the unadjusted lr.
        momentum, nesterov, ns_steps, ns_coefficients, ns_eps: Muon (torch.optim.Muon's meaning).
        ns_dtype: Newton–Schulz compute dtype; None = bf16 on CUDA, fp32 elsewhere.
        adjust_lr: "match_rms_adamw" (lr x 0.2 sqrt(max(A, B))) or "original" (lr x sqrt(max(1, A/B))).
        qk_clip_tau: clip threshold tau; `math.inf` records and reports max logits but never clips (vanilla
            Muon with monitoring); None disables QK-Clip and max-logit recording.
        adamw_betas, adamw_eps: AdamW hyperparameters; `adamw_foreach` / `adamw_fused` pick torch's kernel
            (default: fused where torch has it, i.e. CPU/CUDA floating point; numerically torch.optim.AdamW's).
        params / classify: the group assignment for models without `param_groups()`.
        update_expert_biases: after each applied step call `model.update_expert_biases()` when the model has
            MoE layers (aux-loss-free balancing lives in the model; the optimizer only triggers it).
        max_batch_elems: cap on the elements of one stacked NS batch (bounds the optimizer's peak memory).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr: str = "match_rms_adamw",
        qk_clip_tau: float | None = 100.0,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        *,
        adamw_lr: float | None = None,
        adamw_weight_decay: float | None = None,
        adamw_foreach: bool | None = None,
        adamw_fused: bool | None = None,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_eps: float = 1e-7,
        ns_dtype: torch.dtype | None = None,
        params: dict[str, ParamSpec] | None = None,
        classify: Classifier | None = None,
        update_expert_biases: bool = True,
        max_batch_elems: int = DEFAULT_MAX_BATCH_ELEMS,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if adjust_lr not in ADJUST_LR_MODES:
            raise ValueError(f"adjust_lr must be one of {ADJUST_LR_MODES}, got {adjust_lr!r}")
        if not 1 <= ns_steps < 100:
            raise ValueError(f"ns_steps must lie in [1, 100), got {ns_steps}")
        if qk_clip_tau is not None and not qk_clip_tau > 0:
            raise ValueError(f"qk_clip_tau must be > 0, math.inf (monitor only) or None (disabled), got {qk_clip_tau}")
        self.model = model
        groups = _assign_groups(model, params, classify)
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients), ns_eps=ns_eps, adjust_lr=adjust_lr, betas=tuple(adamw_betas),
            eps=adamw_eps, foreach=adamw_foreach, fused=_resolve_fused(groups["adamw"], adamw_foreach, adamw_fused),
        )
        param_groups: list[dict[str, Any]] = []
        if groups["muon"]:
            param_groups.append({"params": groups["muon"], "kind": "muon"})
        if groups["adamw"]:
            adamw_group: dict[str, Any] = {"params": groups["adamw"], "kind": "adamw"}
            if adamw_lr is not None:
                adamw_group["lr"] = adamw_lr
            if adamw_weight_decay is not None:
                adamw_group["weight_decay"] = adamw_weight_decay
            param_groups.append(adamw_group)
        self._ns_dtype = ns_dtype
        self._max_batch_elems = max_batch_elems
        self._plans: dict[tuple[int, ...], list[_Bucket]] = {}
        super().__init__(param_groups, defaults)

        self.qk_clip_tau = qk_clip_tau
        self.attention_layers: list[nn.Module] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        if qk_clip_tau is not None:
            self.attention_layers = find_attention_layers(model)
            if not self.attention_layers:
                raise ValueError(
                    f"qk_clip_tau={qk_clip_tau} but {type(model).__name__} has no attention module QK-Clip "
                    "recognizes (openk2 MLA, or the GQA protocol in openk2.optim.qk_clip: q_proj, k_proj, "
                    "num_heads, num_key_value_heads, head_dim, record_max_logits, max_logit_H). Adapt the "
                    "module, or pass qk_clip_tau=None to train without QK-Clip."
                )
            for attn in self.attention_layers:
                attn.max_logit_H = None
                self._hooks.append(attn.register_forward_pre_hook(_gate_recording))
        self.update_expert_biases = update_expert_biases and bool(
            hasattr(model, "moe_layers") and hasattr(model, "update_expert_biases") and list(model.moe_layers())
        )
        self.skipped_steps = 0
        self.steps = 0  # step() calls, skipped ones included
        self._last: dict[str, Any] | None = None
        self._pending: tuple[bool, list[Tensor | None], float, Tensor] | None = None
        self._grad_norm = torch.zeros(())

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        kind = param_group.get("kind")
        if kind not in ("muon", "adamw"):
            raise ValueError(f"a MuonClip param group needs kind='muon' or 'adamw', got {kind!r}")
        if kind == "muon":
            for p in param_group["params"]:
                t = p[1] if isinstance(p, tuple) else p
                if t.ndim not in (2, 3):
                    raise ValueError(f"Muon needs 2-D or 3-D (stacked) matrices, got shape {tuple(t.shape)}")
        super().add_param_group(param_group)

    def remove_hooks(self) -> None:
        """Stop gating max-logit recording (the attention modules keep their current flag)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.steps += 1
        if not self._grads_finite():
            self.skipped_steps += 1
            # Discard this step's records so the next step's clip and bias update see only its own forwards.
            for m in self.model.moe_layers() if self.update_expert_biases else ():
                m.tokens_per_expert.zero_()
            self._finish(skipped=True, recorded=[None] * len(self.attention_layers), load_ratio=float("nan"))
            return loss
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_group(group)
            else:
                self._adamw_group(group)
        recorded = self._qk_clip() if self.qk_clip_tau is not None else []
        load_ratio = self._update_expert_biases() if self.update_expert_biases else float("nan")
        self._finish(skipped=False, recorded=recorded, load_ratio=load_ratio)
        return loss

    # Overridden by the distributed optimizer, which reduces the recorded statistics over data-parallel ranks.
    def _qk_clip(self) -> list[Tensor | None]:
        return qk_clip_(self.attention_layers, self.qk_clip_tau)

    def _update_expert_biases(self) -> float:
        return self.model.update_expert_biases().get("max_load_ratio", float("nan"))

    def _grads_finite(self) -> bool:
        """One fused check before any write: per-tensor 2-norms (one foreach kernel) are NaN/inf iff some
        element is (or the norm overflows, |g| > ~1e19, which is no usable gradient either). Also yields the
        global gradient norm for the stats at no extra cost."""
        by_device: dict[torch.device, list[Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("MuonClip does not support sparse gradients")
                    by_device.setdefault(p.grad.device, []).append(p.grad)
        if not by_device:
            self._grad_norm = torch.zeros(())
            return True
        sq = [torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).square().sum().cpu()
              for grads in by_device.values()]
        self._grad_norm = torch.stack(sq).sum().sqrt()
        return bool(torch.isfinite(self._grad_norm))

    def _muon_group(self, group: dict[str, Any]) -> None:
        params, grads, bufs = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("MuonClip does not support complex parameters")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            bufs.append(state["momentum_buffer"])
        if not params:
            return
        key = tuple(id(p) for p in params)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_buckets([p.shape for p in params], self._max_batch_elems)
        ns_dtype = self._ns_dtype
        muon_update_(
            params, grads, bufs, plan, lr=_scalar(group["lr"]), weight_decay=group["weight_decay"],
            momentum=group["momentum"], nesterov=group["nesterov"], ns_steps=group["ns_steps"],
            ns_coefficients=group["ns_coefficients"], ns_eps=group["ns_eps"], ns_dtype=ns_dtype,
            adjust_lr=group["adjust_lr"],
        )

    @staticmethod
    def _local(t: Tensor) -> Tensor:
        """The tensor this process updates: `t` itself here; the distributed optimizer's rank-local shard."""
        return t

    def _adamw_group(self, group: dict[str, Any]) -> None:
        # Same state layout and functional kernel as torch.optim.AdamW, so the numbers are torch's.
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        fused = bool(group["fused"])
        for p in group["params"]:
            if p.grad is None:
                continue
            shard = self._local(p)
            state = self.state[p]
            if not state:
                state["step"] = (
                    torch.zeros((), dtype=torch.float32, device=shard.device) if fused
                    else torch.tensor(0.0, dtype=torch.float32)
                )
                state["exp_avg"] = torch.zeros_like(shard, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(shard, memory_format=torch.preserve_format)
            params.append(shard)
            grads.append(self._local(p.grad))
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        _adamw_functional(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"], fused=group["fused"],
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False,
        )

    def _finish(self, skipped: bool, recorded: list[Tensor | None], load_ratio: float) -> None:
        for attn in self.attention_layers:
            attn.max_logit_H = None
        # Stats stay tensors until read, so a step costs no extra host sync unless someone logs it.
        self._pending = (skipped, recorded, load_ratio, self._grad_norm)
        self._last = None

    # ------------------------------------------------------------------- stats
    @property
    def last_stats(self) -> dict[str, Any]:
        """Stats of the latest step (computed on first access): `skipped` (this step), `skipped_steps` (total),
        `max_logit` (over layers), `max_logit_per_layer` (NaN where nothing was recorded), `clipped_heads`,
        `heads`, `clipped_fraction`, `tau`, `max_load_ratio` (NaN without MoE bias updates), `grad_norm` (global
        L2 norm of the gradients the step saw, from the finiteness check)."""
        if self._last is None:
            self._last = self._compute_stats()
        return self._last

    def _compute_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"step": self.steps, "skipped_steps": self.skipped_steps, "tau": self.qk_clip_tau}
        if self._pending is None:
            return stats
        skipped, recorded, load_ratio, grad_norm = self._pending
        per_layer = [float("nan")] * len(recorded)
        present = [i for i, s in enumerate(recorded) if s is not None]
        clipped = heads = 0
        stats["grad_norm"] = float(grad_norm)
        if present:
            s_H = torch.cat([recorded[i].float().flatten() for i in present])
            sizes = [recorded[i].numel() for i in present]
            maxima = [s.max() for s in s_H.split(sizes)]
            summary = torch.stack([*maxima, (torch.isfinite(s_H) & (s_H > self.qk_clip_tau)).sum().float()])
            values = summary.tolist()  # the one host sync
            for i, v in zip(present, values[:-1], strict=True):
                per_layer[i] = v
            clipped = int(values[-1])
            heads = sum(sizes)
        finite = [v for v in per_layer if not math.isnan(v)]
        stats.update(
            skipped=skipped,
            max_logit=max(finite) if finite else float("nan"),
            max_logit_per_layer=per_layer,
            clipped_heads=clipped,
            heads=heads or sum(num_heads(a) for a in self.attention_layers),
            clipped_fraction=clipped / heads if heads else 0.0,
            max_load_ratio=load_ratio,
        )
        return stats

    # -------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["muonclip"] = {"steps": self.steps, "skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("muonclip", {})
        kinds = [g.get("kind") for g in state_dict["param_groups"]]
        if kinds != [g["kind"] for g in self.param_groups]:
            raise ValueError(f"state dict groups {kinds} do not match this optimizer's "
                             f"{[g['kind'] for g in self.param_groups]}")
        super().load_state_dict(state_dict)
        self.steps = int(extra.get("steps", 0))
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self._plans.clear()


def _gate_recording(module: nn.Module, args: tuple) -> None:
    """Record max logits only in forwards that feed a gradient step (training mode, autograd on): validation
    or generation between steps must not leak into the next step's clip."""
    module.record_max_logits = module.training and torch.is_grad_enabled()


def _resolve_fused(pairs: list[tuple[str, nn.Parameter]], foreach: bool | None, fused: bool | None) -> bool | None:
    """Default to torch's fused AdamW kernel where it exists (CPU/CUDA floating point): 4x faster than the
    for-loop default on the CPU benchmark."""
    if fused is not None or foreach is not None:  # the caller chose a kernel
        return fused
    ok = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for _, p in pairs)
    return True if ok and pairs else None


def _scalar(x: float | Tensor) -> float:
    return float(x) if isinstance(x, Tensor) else x


def _assign_groups(
    model: nn.Module, params: dict[str, ParamSpec] | None, classify: Classifier | None
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{"muon": [(name, p)], "adamw": [...]} covering every trainable parameter exactly once."""
    if params is not None and classify is not None:
        raise ValueError("pass either params= or classify=, not both")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "adamw": []}
    if params is not None:
        unknown = set(params) - set(groups)
        if unknown:
            raise ValueError(f"params= keys must be 'muon' and/or 'adamw', got {sorted(unknown)}")
        for kind, spec in params.items():
            for item in spec:
                p = item[1] if isinstance(item, tuple) else item
                if id(p) not in name_of:
                    raise ValueError(f"a {kind} parameter of shape {tuple(p.shape)} is not a parameter of the model")
                groups[kind].append((name_of[id(p)], p))
    elif classify is not None:
        for n, p in named:
            kind = classify(n, p)
            if kind is not None:
                if kind not in groups:
                    raise ValueError(f"classify({n!r}) returned {kind!r}; expected 'muon', 'adamw' or None")
                groups[kind].append((n, p))
    elif hasattr(model, "param_groups"):
        for kind, pairs in model.param_groups().items():
            if kind not in groups:
                raise ValueError(f"model.param_groups() returned an unknown group {kind!r}")
            groups[kind].extend((n, p) for n, p in pairs if p.requires_grad)
    else:
        raise ValueError(
            f"{type(model).__name__} has no param_groups(): pass params={{'muon': [...], 'adamw': [...]}} or "
            "classify=fn(name, param) -> 'muon' | 'adamw' (e.g. openk2.optim.moonlight_classifier)"
        )
    seen: dict[int, str] = {}
    twice = []
    for kind, pairs in groups.items():
        for n, p in pairs:
            if id(p) in seen:
                twice.append(f"{n} ({seen[id(p)]} and {kind})")
            seen[id(p)] = kind
    if twice:
        raise ValueError(f"parameters in more than one group: {twice}")
    missing = [n for n, p in named if id(p) not in seen]
    if missing:
        raise ValueError(f"parameters in no optimizer group: {missing}")
    bad = [f"{n} {tuple(p.shape)}" for n, p in groups["muon"] if p.ndim not in (2, 3)]
    if bad:
        raise ValueError(f"Muon needs 2-D matrices or 3-D expert stacks; move these to AdamW: {bad}")
    return groups
