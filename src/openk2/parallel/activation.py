"""Activation memory ([K2] §2.4, `k2-recipe.md` §5): selective recomputation, FP8 activation storage, offload.

Three independent switches (`[parallel]` recompute / fp8_activations / offload_activations), applied from outside
the model on decoder-layer boundaries:

* **Selective recomputation** (`recompute = "selective"`): each decoder layer runs under PyTorch's selective
  activation checkpointing. The layer keeps the outputs of its matmuls, attention, expert-selection `topk` and
  collectives, and recomputes in backward what K2 recomputes: the norms, SwiGLU and the MLA up-projections
  (`q_b_proj`, `kv_b_proj`), plus the routed and shared experts' down-projections with
  `"selective+moe_down"`. Other non-matmul ops (RoPE, residual adds, concatenations, gathers) are recomputed too:
  they are cheap, and caching their outputs would cost memory that plain autograd never spends.
* **FP8 storage** (`fp8_activations`): the inputs of the routed experts' up-projections (`x_SD`; under EP the
  received tokens) and the SwiGLU inputs (gate and up projections of routed experts, shared experts and dense
  MLPs) are kept as float8 e4m3 in 1x128 tiles with one fp32 scale per tile, and dequantized for backward. The
  forward always uses the exact values; only gradients see the rounding. With recomputation on, FP8 applies to
  the cached SwiGLU inputs and, under EP, to the cached received tokens (without EP the expert inputs are
  recomputed, not stored); without recomputation, to the tensors autograd saves.
* **Offload** (`offload_activations`): the remaining saved activations (cached matmul outputs under
  recomputation, autograd's saved tensors otherwise) are copied to pinned host memory and brought back for
  backward. Parameters and small tensors stay on the device. On a CPU device it is a no-op.

Bookkeeping that must not happen twice is guarded during recomputation: MoE load counts are restored after the
recomputed forward, and max-logit recording runs outside the checkpoint and is skipped when recomputing.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import (
    CheckpointPolicy,
    _CachedTorchDispatchMode,
    _CachingTorchDispatchMode,
    _sac_storage_key,
    _VersionWrapper,
    checkpoint,
)

from openk2.model.moe import MoE

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
TILE = 128
# Saved activations smaller than this stay where they are (offloading them costs more than it saves).
_OFFLOAD_MIN_BYTES = 1 << 16

aten = torch.ops.aten
_MATMUL_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
if hasattr(aten, "_grouped_mm"):
    _MATMUL_OPS.add(aten._grouped_mm.default)
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # CPU fp32 products (openk2.model.matmul)
    _MATMUL_OPS.add(torch.ops.mkldnn._linear_pointwise.default)
_ALWAYS_SAVE_OPS = {aten.topk.default}  # expert selection must not change on recomputation
for _name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
    if hasattr(aten, _name):
        _ALWAYS_SAVE_OPS.add(getattr(aten, _name).default)
if hasattr(torch.ops, "_c10d_functional"):  # collectives are never re-run in backward
    for _name in ("all_to_all_single", "reduce_scatter_tensor", "all_gather_into_tensor", "all_reduce"):
        if hasattr(torch.ops._c10d_functional, _name):
            _ALWAYS_SAVE_OPS.add(getattr(torch.ops._c10d_functional, _name).default)


# ----------------------------------------------------------------------------- FP8 tiles
@dataclass
class Fp8Tensor:
    """A tensor stored as float8 e4m3 in 1x128 tiles along its last dim, with an fp32 scale per tile."""

    data: Tensor  # [..., n_tiles, 128] float8_e4m3fn
    scale: Tensor  # [..., n_tiles, 1] fp32
    shape: torch.Size
    dtype: torch.dtype

    @classmethod
    @torch.no_grad()
    def quantize(cls, x: Tensor) -> Fp8Tensor:
        _STATE.fp8_stored += 1
        shape, dtype = x.shape, x.dtype
        C = shape[-1] if x.ndim else 1
        x2 = x.reshape(-1, C).float()
        pad = (-C) % TILE
        if pad:
            x2 = F.pad(x2, (0, pad))
        tiles = x2.view(x2.shape[0], -1, TILE)
        scale = tiles.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        return cls((tiles / scale).to(FP8_DTYPE), scale, shape, dtype)

    @torch.no_grad()
    def dequantize(self) -> Tensor:
        tiles = self.data.float() * self.scale
        C = self.shape[-1] if len(self.shape) else 1
        return tiles.view(tiles.shape[0], -1)[:, :C].reshape(self.shape).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * 4


def fp8_roundtrip(x: Tensor) -> Tensor:
    return Fp8Tensor.quantize(x).dequantize()


# ------------------------------------------------------------------------ tags and state
class _State:
    """Tags of the code now running (a stack), the tensors marked for FP8 storage, recomputation flag."""

    def __init__(self) -> None:
        self.tags: list[str] = []
        self.recomputing = False
        # id(tensor) -> [weakref to it, its FP8 copy once packed]; the weakref guards against id reuse.
        self.marked: dict[int, list[Any]] = {}
        self.experts: list[nn.Module] = []  # RoutedExperts modules now running (innermost last)
        self.fp8_stored = 0  # tensors stored in FP8 so far (tests and benchmarks read it)
        self.experts_input: Tensor | None = None


_STATE = _State()


@contextlib.contextmanager
def tag(name: str) -> Iterator[None]:
    _STATE.tags.append(name)
    try:
        yield
    finally:
        _STATE.tags.pop()


def _mark_fp8(t: Tensor) -> list[Any]:
    """Mark a tensor for FP8 storage when autograd saves it (the path without recomputation)."""
    mark = _STATE.marked[id(t)] = [weakref.ref(t), None]
    return mark


def _tag_hooks(module: nn.Module, name: str) -> None:
    def push(m: nn.Module, args: Any) -> None:
        _STATE.tags.append(name)

    def pop(m: nn.Module, args: Any, out: Any) -> None:  # returns None: the output is left alone
        _STATE.tags.pop()

    module.register_forward_pre_hook(push)
    module.register_forward_hook(pop)


# --------------------------------------------------------------------------- module hooks
# Everything is attached with hooks on the model's own modules, so the model's math is never copied here:
# * RoutedExperts: its input (`x_SD`, the up-projection input) is marked, and while it runs the matmuls are
#   classified by operand: the one reading `down_proj` is the down-projection, the others produce the SwiGLU
#   inputs (gate and up, fused or not);
# * MLP gate_proj / up_proj (shared experts, dense layers): their outputs are the SwiGLU inputs;
# * q_b_proj / kv_b_proj: the MLA up-projections; shared experts' down_proj: a MoE down-projection.
def _experts_pre(module: nn.Module, args: Any) -> None:
    _STATE.experts.append(module)
    _STATE.experts_input = args[0]
    _mark_fp8(args[0])


def _experts_post(module: nn.Module, args: Any, out: Any) -> None:
    _STATE.experts.pop()
    _STATE.experts_input = None


def _mark_output(module: nn.Module, args: Any, out: Any) -> None:
    _mark_fp8(out)


def _reads(args: Any, param: Tensor) -> bool:
    ptr = param.untyped_storage().data_ptr()
    return any(isinstance(a, Tensor) and a.untyped_storage().data_ptr() == ptr for a in args)


def _in_experts_swiglu_input(op: Any, args: Any) -> bool:
    """True for a matmul inside RoutedExperts that does not read down_proj (gate/up projection)."""
    return bool(_STATE.experts) and op in _MATMUL_OPS and not _reads(args, _STATE.experts[-1].down_proj)


def _in_experts_down(op: Any, args: Any) -> bool:
    return bool(_STATE.experts) and op in _MATMUL_OPS and _reads(args, _STATE.experts[-1].down_proj)


_ELEMENTWISE_SWIGLU_NODES = ("SiluBackward", "MulBackward")


def _is_expert_swiglu_input(t: Tensor) -> bool:
    """Inside RoutedExperts (no recomputation), whether autograd is saving a gate/up projection output: a
    slot-rowed activation not produced by SwiGLU's own elementwise ops (silu(gate), silu(gate) * up, ...)."""
    x_SD = _STATE.experts_input
    if x_SD is None or t.ndim != 2 or t.shape[0] != x_SD.shape[0] or t.shape[-1] <= 1 or t.grad_fn is None:
        return False
    return not type(t.grad_fn).__name__.startswith(_ELEMENTWISE_SWIGLU_NODES)


# ---------------------------------------------------------------------- saved-tensor hooks
class _Offloaded:
    def __init__(self, t: Tensor) -> None:
        self.device = t.device
        self.cpu = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=True)
        self.cpu.copy_(t, non_blocking=True)

    def get(self) -> Tensor:
        return self.cpu.to(self.device, non_blocking=True)


def _is_param_like(t: Tensor) -> bool:
    base = t._base if t._base is not None else t
    return isinstance(base, nn.Parameter) or (base.requires_grad and base.grad_fn is None)


def _should_offload(t: Tensor, offload: bool) -> bool:
    return (offload and t.device.type == "cuda" and not _is_param_like(t)
            and t.numel() * t.element_size() >= _OFFLOAD_MIN_BYTES)


class _SavedTensorPolicy:
    """pack/unpack for autograd's saved tensors (the path without recomputation)."""

    def __init__(self, fp8: bool, offload: bool) -> None:
        self.fp8, self.offload = fp8, offload

    def pack(self, t: Tensor) -> Any:
        if self.fp8 and t.is_floating_point() and t.numel():
            mark = _STATE.marked.get(id(t))
            if mark is None and _STATE.experts and _is_expert_swiglu_input(t):
                mark = _mark_fp8(t)
            if mark is not None and mark[0]() is t:
                if mark[1] is None:  # the same tensor saved by several ops is quantized once
                    mark[1] = Fp8Tensor.quantize(t)
                return mark[1]
        if _should_offload(t, self.offload):
            return _Offloaded(t)
        return t

    @staticmethod
    def unpack(packed: Any) -> Tensor:
        if isinstance(packed, Fp8Tensor):
            return packed.dequantize()
        if isinstance(packed, _Offloaded):
            return packed.get()
        return packed


# --------------------------------------------------------------- selective checkpointing
@dataclass(frozen=True)
class _Settings:
    recompute_moe_down: bool
    fp8: bool
    offload: bool


def _policy(settings: _Settings, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op in _ALWAYS_SAVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    if op in _MATMUL_OPS:
        tags = _STATE.tags
        if not torch.is_grad_enabled():  # bookkeeping (max-logit scores): never cache
            return CheckpointPolicy.PREFER_RECOMPUTE
        if "mla_up" in tags:
            return CheckpointPolicy.PREFER_RECOMPUTE
        if settings.recompute_moe_down and ("moe_down" in tags or _in_experts_down(op, args)):
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class _Fp8Entry:
    """A SAC cache entry kept in FP8 (the cached-mode replay calls `get_val`)."""

    def __init__(self, t: Tensor) -> None:
        self.q = Fp8Tensor.quantize(t)

    def get_val(self, allow_cache_entry_mutation: bool) -> Tensor:
        return self.q.dequantize()


class _OffloadEntry:
    def __init__(self, t: Tensor) -> None:
        self.o = _Offloaded(t)

    def get_val(self, allow_cache_entry_mutation: bool) -> Tensor:
        return self.o.get()


class _CachingMode(_CachingTorchDispatchMode):
    """SAC's forward mode; FP8 / offload conversion of the cached outputs when the layer's forward ends (by
    then every collective the layer issued has completed)."""

    def __init__(self, settings: _Settings, storage: Any) -> None:
        super().__init__(functools.partial(_policy, settings), storage)
        self.settings = settings
        self.pending: list[tuple[Any, int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = super().__torch_dispatch__(func, types, args, kwargs)
        key = _sac_storage_key(func, args)
        idx = self.func_counter[key] - 1
        entry = self.storage[key].get(idx)
        if isinstance(entry, _VersionWrapper) and isinstance(entry.val, Tensor) and entry.val.is_floating_point():
            if self.settings.fp8 and ("fp8" in _STATE.tags or _in_experts_swiglu_input(func, args)):
                self.pending.append((key, idx, "fp8"))
            elif _should_offload(entry.val, self.settings.offload):
                self.pending.append((key, idx, "offload"))
        return out

    def __exit__(self, *exc: Any) -> Any:
        result = super().__exit__(*exc)
        with _disable_current_modes():
            for key, idx, kind in self.pending:
                val = self.storage[key][idx].val
                self.storage[key][idx] = _Fp8Entry(val) if kind == "fp8" else _OffloadEntry(val)
        self.pending.clear()
        return result


class _CachedMode(_CachedTorchDispatchMode):
    """SAC's recompute mode; flags recomputation for the bookkeeping guards."""

    def __enter__(self) -> Any:
        _STATE.recomputing = True
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        _STATE.recomputing = False
        return super().__exit__(*exc)


def _contexts(settings: _Settings) -> tuple[Any, Any]:
    from collections import defaultdict

    storage: Any = defaultdict(dict)
    return _CachingMode(settings, storage), _CachedMode(None, storage)


def _sac_forward(layer: nn.Module, orig_forward: Any, settings: _Settings, *args: Any, **kwargs: Any) -> Tensor:
    try:
        if not (layer.training and torch.is_grad_enabled()):
            return orig_forward(*args, **kwargs)
        return checkpoint(orig_forward, *args, use_reentrant=False, preserve_rng_state=False,
                          context_fn=functools.partial(_contexts, settings), **kwargs)
    finally:
        _STATE.marked.clear()  # only the path without recomputation reads marks


def _hooked_forward(layer: nn.Module, orig_forward: Any, hooks: _SavedTensorPolicy, *args: Any,
                    **kwargs: Any) -> Tensor:
    try:
        if not (layer.training and torch.is_grad_enabled()):
            return orig_forward(*args, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            return orig_forward(*args, **kwargs)
    finally:
        _STATE.marked.clear()  # marks are per layer forward; packed tensors live on in the graph


# ------------------------------------------------------------------------ bookkeeping
def _guard_max_logits(attn: nn.Module) -> None:
    """Max-logit recording (no-grad bookkeeping for QK-Clip) runs outside the checkpoint's dispatch modes and is
    skipped when the layer is recomputed: its ops must not enter the SAC op sequence (the first forward of a
    step and its recomputation would differ), and the forward's record is already complete."""
    record = getattr(attn, "_record_max_logits", None)
    if record is None:
        return

    def guarded(*args: Any, **kwargs: Any) -> None:
        if _STATE.recomputing:
            return
        with _disable_current_modes():
            record(*args, **kwargs)

    attn._record_max_logits = guarded


def _moe_pre(moe: MoE, args: Any) -> None:
    if _STATE.recomputing:
        with _disable_current_modes():
            moe._stashed_counts = moe.tokens_per_expert.clone()


def _moe_post(moe: MoE, args: Any, out: Any) -> None:
    if _STATE.recomputing and getattr(moe, "_stashed_counts", None) is not None:
        with _disable_current_modes():
            moe.tokens_per_expert.copy_(moe._stashed_counts)
        moe._stashed_counts = None


# ------------------------------------------------------------------------------- entry
def apply_activation_memory(model: nn.Module, layout: Any) -> None:
    """Install the layout's activation-memory switches on every decoder layer of `model` (a K2Model or a
    pipeline rank model), in place. Call before FSDP (`parallelize` does)."""
    recompute = layout.recompute != "none"
    settings = _Settings(recompute_moe_down=layout.recompute == "selective+moe_down", fp8=layout.fp8_activations,
                         offload=layout.offload_activations)
    if not (recompute or settings.fp8 or settings.offload):
        return
    layers = model.model.layers
    for layer in (layers.values() if isinstance(layers, nn.ModuleDict) else layers):
        attn = layer.self_attn
        if recompute:
            _guard_max_logits(attn)
        for name in ("q_b_proj", "kv_b_proj"):
            if hasattr(attn, name):
                _tag_hooks(getattr(attn, name), "mla_up")
        mlp = layer.mlp
        mlps = [mlp]
        if isinstance(mlp, MoE):
            mlp.experts.register_forward_pre_hook(_experts_pre)
            mlp.experts.register_forward_hook(_experts_post)
            mlps = [mlp.shared_experts] if mlp.shared_experts is not None else []
            for shared in mlps:
                _tag_hooks(shared.down_proj, "moe_down")
            mlp.register_forward_pre_hook(_moe_pre)
            mlp.register_forward_hook(_moe_post)
        for m in mlps:
            for proj in (m.gate_proj, m.up_proj):
                _tag_hooks(proj, "fp8")
                proj.register_forward_hook(_mark_output)
        orig = layer.forward
        if recompute:
            layer.forward = functools.partial(_sac_forward, layer, orig, settings)
        else:
            layer.forward = functools.partial(_hooked_forward, layer, orig, _SavedTensorPolicy(settings.fp8,
                                                                                             settings.offload))


def peak_bytes(fn: Any) -> int:
    """Peak of torch's live CPU tensor bytes while `fn()` runs, above the bytes live when it starts.

    A profiler with `profile_memory=True` records allocations and frees; their running sum in time order (each
    op's own net bytes at its start, frees outside ops when they happen) gives the peak. CPU tensors only: on
    CUDA use `torch.cuda.max_memory_allocated`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for e in prof.events():
        d = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if d:
            deltas.append((e.time_range.start, d))
    deltas.sort(key=lambda t: t[0])
    cur = peak = 0
    for _, d in deltas:
        cur += d
        peak = max(peak, cur)
    return peak


__all__ = ["FP8_DTYPE", "Fp8Tensor", "apply_activation_memory", "fp8_roundtrip", "peak_bytes", "tag"]
