"""The Kimi K2 / DeepSeek-V3 decoder, free of any parallelism code.

Module names mirror HF `DeepseekV3ForCausalLM`, so the state dict keys are the HF weight names except the
routed experts, which live as 3-D tensors (`mlp.experts.{gate,up,down}_proj`) and are split per expert
only on export (`openk2.model.hf`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from openk2.model import block_cache, few_rows
from openk2.model.attention import MLA
from openk2.model.config import ModelConfig
from openk2.model.kv_cache import KVCache
from openk2.model.matmul import Linear, mm, takes_onednn
from openk2.model.moe import MLP, MoE
from openk2.model.norm import RMSNorm
from openk2.model.rope import rope_cos_sin, rope_inv_freq

IGNORE_INDEX = -100

# linear_cross_entropy's grad_x by oneDNN against a transposed copy of the LM head (False: aten's GEMM).
_GRAD_X_BY_ONEDNN = True
# Parameter groups by name (never by ndim): matrices, 3-D experts and the router go to Muon.
_ADAMW_PATTERN = re.compile(r"(embed_tokens|lm_head|norm)\.weight$|\.bias$")
_MUON_PATTERN = re.compile(r"(_proj(_with_mqa)?\.weight|experts\.(gate|up|down)_proj|mlp\.gate\.weight)$")
# Output projections that write into the residual stream get a depth-scaled init (GPT-2 style).
_RESIDUAL_OUT_PATTERN = re.compile(r"(o_proj\.weight|down_proj\.weight|experts\.down_proj)$")


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # None when a loss was computed without `return_logits=True`
    loss: torch.Tensor | None = None


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `x_ND @ w_VD.T` against `labels_N` (IGNORE_INDEX rows skipped), computed in
    row chunks so the [N, V] logits never exist at once (Liger's fused linear cross-entropy).

    The gradients w.r.t. x and w are computed in the forward, while each chunk's logits are still in cache,
    and only scaled by the incoming gradient in the backward. The matmuls run in the inputs' dtype, the
    softmax in fp32, as in the plain path (`lm_head` then `F.cross_entropy(logits.float())`). Chunk logits
    are laid out [V, C] (vocab-major): all three matmuls then run without transposed operands, measurably
    faster on CPU BLAS.
    """

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, w_VD: torch.Tensor, labels_N: torch.Tensor, chunk: int) -> torch.Tensor:
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss = x_ND.new_zeros((), dtype=torch.float32)
        grad_x_ND = torch.empty_like(x_ND) if needs_grad else None
        grad_w_VD = None  # the first chunk's product, then the sum (no zeroed [V, D] to add the first one to)
        # With several chunks, w.T made contiguous once for all of them: oneDNN's (w.T @ grad).T for grad_x, 1.1x
        # aten's grad.T @ w on config A's chunks (the training step 1.004-1.030x on A, 1.018x on B).
        w_DV = (few_rows.transpose_copy(w_VD.t()) if needs_grad and _GRAD_X_BY_ONEDNN and takes_onednn(w_VD)
                and few_rows.available() and x_ND.shape[0] > chunk else None)
        for start in range(0, x_ND.shape[0], chunk):
            # The previous chunk's logits go before the next product allocates: the allocator hands their block back
            # instead of mapping a second one, whose pages fault in on every step (4,096 faults, ~3 ms at 16 MiB).
            logits_VC = exp_VC = grad_VC = None
            x_CD, labels_C = x_ND[start:start + chunk], labels_N[start:start + chunk]
            logits_VC = mm(w_VD, x_CD.t()).float()
            valid_1C = (labels_C != IGNORE_INDEX).unsqueeze(0)
            target_1C = labels_C.clamp(min=0).unsqueeze(0)
            target_logit_1C = logits_VC.gather(0, target_1C)
            # In place: logits -> exp(logits - max) -> softmax: one exp and no [V, C] temporaries.
            max_1C = logits_VC.amax(dim=0, keepdim=True)
            exp_VC = logits_VC.sub_(max_1C).exp_()
            sum_1C = exp_VC.sum(dim=0, keepdim=True)
            loss += ((max_1C + sum_1C.log() - target_logit_1C) * valid_1C).sum()
            if not needs_grad:
                continue
            # d(loss)/d(logits) = softmax - onehot(target), zero on ignored rows.
            grad_VC = exp_VC.mul_(valid_1C / sum_1C).scatter_add_(0, target_1C, -valid_1C.to(exp_VC.dtype))
            grad_VC = grad_VC.to(x_ND.dtype)
            # grad_x: oneDNN's (w.T @ grad).T, or aten's GEMM, which reads the transposed grad in place, where
            # oneDNN's grad.T @ w would first copy it (~6 ms per chunk of config A's LM head; docs/benchmarks.md).
            if w_DV is not None:
                grad_x_ND[start:start + chunk] = mm(w_DV, grad_VC).t()
            else:
                torch.mm(grad_VC.t(), w_VD, out=grad_x_ND[start:start + chunk])
            onednn = takes_onednn(grad_VC, w_VD)
            if grad_w_VD is not None and not onednn and grad_w_VD.dtype == x_CD.dtype:
                grad_w_VD.addmm_(grad_VC, x_CD)  # BLAS accumulates in place
            else:
                part_VD = mm(grad_VC, x_CD) if onednn else grad_VC @ x_CD
                # fp32 accumulation across chunks, whatever the matmuls' dtype
                grad_w_VD = part_VD.float() if grad_w_VD is None else grad_w_VD.add_(part_VD)
        if needs_grad and grad_w_VD is None:  # no rows
            grad_w_VD = torch.zeros_like(w_VD, dtype=torch.float32)
        # Plain attributes, not save_for_backward (they are neither inputs nor outputs): backward takes the only
        # references, scales them in place and hands them over, with no new [V, D] allocation.
        ctx.grads = (grad_x_ND, grad_w_VD)
        ctx.w_dtype = w_VD.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy does not support a second backward (retain_graph)")
        (grad_x_ND, grad_w_VD), ctx.grads = ctx.grads, None
        grad_x = grad_x_ND.mul_(grad_loss.to(grad_x_ND.dtype)) if ctx.needs_input_grad[0] else None
        grad_w = grad_w_VD.mul_(grad_loss).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None


def linear_cross_entropy(
    x_ND: torch.Tensor, w_VD: torch.Tensor, labels_N: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """`F.cross_entropy(F.linear(x_ND, w_VD).float(), labels_N, ignore_index=-100, reduction="sum")` without
    materializing the logits. Under autocast the matmuls run in the autocast dtype, like `F.linear` would."""
    if torch.is_autocast_enabled(x_ND.device.type):
        dtype = torch.get_autocast_dtype(x_ND.device.type)
        x_ND, w_VD = x_ND.to(dtype), w_VD.to(dtype)
    chunk = chunk_rows or loss_chunk_rows(w_VD.shape[0], x_ND.device)
    with torch.autocast(x_ND.device.type, enabled=False):
        return _LinearCrossEntropy.apply(x_ND, w_VD, labels_N, chunk)


@contextlib.contextmanager
def _cached_blocks(device: torch.device) -> Iterator[bool]:
    """Within the block, a CPU training forward takes its large blocks from `block_cache` (yields whether it does)."""
    if not block_cache.applies(device):
        yield False
        return
    with block_cache.training_forward():
        yield True


def loss_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk of `linear_cross_entropy`. On CPU, as many fp32 logits as the last-level cache holds, up to 16 MiB
    (8 MiB on an 8 MiB L3, 16 MiB on the 32 MiB L3 of config A's Zen 4 host: the training step 1.034x over 8 MiB there,
    fewer and larger products and fewer passes over the [V, D] gradient). Not more: glibc's malloc serves a freed size
    up to 32 MiB from its heap, but maps anything larger afresh, page fault by page fault, on every step (32 MiB chunks:
    1.004x; docs/benchmarks.md, "Loss chunks, RMSNorm's backward, the experts' sum"). Elsewhere 2M logits (8 MiB)."""
    chunk_bytes = min(_last_level_cache_bytes(), 16 << 20) if device.type == "cpu" else 8 << 20
    return max(64, chunk_bytes // 4 // vocab_size)


@functools.cache
def _last_level_cache_bytes() -> int:
    """The L3 size Linux reports for CPU 0 (sysfs), 8 MiB where it reports none."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        reported = int(size.rstrip("KMG")) * scale
    except (OSError, ValueError):
        reported = 0
    return reported if reported > 0 else 8 << 20


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp: MLP | MoE = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BTD, cos_BTR, sin_BTR, cache=None) -> torch.Tensor:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_BTR, sin_BTR, cache)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))


class Decoder(nn.Module):
    """HF `DeepseekV3Model`: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class K2Model(nn.Module):
    """Kimi K2 causal LM (HF `DeepseekV3ForCausalLM`).

    Build small models directly (`K2Model(cfg)` then `init_weights()`), or on the meta device for big ones
    (`with torch.device("meta"): m = K2Model(cfg)`, then `m.to_empty(device=...)` and `m.init_weights()`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope: tuple[torch.Tensor, float] | None = None

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> K2Model:
        """All initialization in one place: N(0, initializer_range) matrices and embeddings, residual output
        projections scaled by 1/sqrt(2 * layers), unit norms, zero biases and router selection biases."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                nn.init.normal_(p, 0.0, out_std if _RESIDUAL_OUT_PATTERN.search(name) else std, generator=gen)
        self.reset_buffers()
        return self

    @torch.no_grad()
    def reset_buffers(self, keep_router_bias: bool = False) -> None:
        """(Re)create buffers: needed after meta-device construction or `to_empty`."""
        self._rope = None
        if self.config.tie_word_embeddings:  # to_empty() replaces each parameter separately: re-tie
            self.lm_head.weight = self.model.embed_tokens.weight
        for m in self.moe_layers():
            m.tokens_per_expert.zero_()
            if not keep_router_bias:
                m.gate.e_score_correction_bias.zero_()

    # --------------------------------------------------------------- modules
    def attention_layers(self) -> list[MLA]:
        return [layer.self_attn for layer in self.model.layers]

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """{"muon": [...], "adamw": [...]} as (name, parameter) pairs; every parameter in exactly one."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "adamw": []}
        unassigned = []
        for name, p in self.named_parameters():
            in_adamw, in_muon = bool(_ADAMW_PATTERN.search(name)), bool(_MUON_PATTERN.search(name))
            if in_adamw == in_muon:
                unassigned.append(name)
            else:
                groups["adamw" if in_adamw else "muon"].append((name, p))
        if unassigned:
            raise RuntimeError(f"parameters in no (or both) optimizer groups: {unassigned}")
        return groups

    @contextlib.contextmanager
    def recording_max_logits(self) -> Iterator[None]:
        """Within the block, training forwards record per-head max logits into `attn.max_logit_H`."""
        attns = self.attention_layers()
        previous = [a.record_max_logits for a in attns]
        for a in attns:
            a.record_max_logits = True
        try:
            yield
        finally:
            for a, prev in zip(attns, previous, strict=True):
                a.record_max_logits = prev

    def update_expert_biases(self, rate: float | None = None) -> dict[str, float]:
        """Aux-loss-free balancing for every MoE layer; returns the worst max/mean load ratio seen."""
        rate = self.config.bias_update_rate if rate is None else rate
        worst = 0.0
        for m in self.moe_layers():
            counts = m.update_bias(rate)
            if counts.sum() > 0:
                worst = max(worst, float(counts.max() / counts.mean()))
        return {"max_load_ratio": worst}

    # --------------------------------------------------------------- forward
    def _cos_sin(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != positions_BT.device:
            self._rope = rope_inv_freq(self.config, positions_BT.device)
        inv_freq, attention_factor = self._rope
        return rope_cos_sin(inv_freq, positions_BT, attention_factor, dtype)

    def hidden_states(
        self,
        input_ids_BT: torch.Tensor,
        *,
        position_ids_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        valid_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states [B, T, D] that `lm_head` maps to logits (callers that need only some
        positions' logits, like `openk2.rl.logprobs`, project just those)."""
        B, T = input_ids_BT.shape
        with _cached_blocks(input_ids_BT.device) as cached:
            x_BTD = self.model.embed_tokens(input_ids_BT)
            if cached:
                block_cache.end_backward_at(x_BTD)
            if position_ids_BT is None:
                position_ids_BT = torch.arange(T, device=input_ids_BT.device).unsqueeze(0)
            cos_BTR, sin_BTR = self._cos_sin(position_ids_BT, x_BTD.dtype)
            if cache is not None:
                cache.begin_chunk(valid_BT if valid_BT is not None else input_ids_BT.new_ones(B, T, dtype=torch.bool))
            for layer in self.model.layers:
                layer_cache = None if cache is None else cache.layers[layer.self_attn.layer_idx]
                x_BTD = layer(x_BTD, cos_BTR, sin_BTR, layer_cache)
            if cache is not None:
                cache.end_chunk(T)
            return self.model.norm(x_BTD)

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        reduction: str = "mean",
        position_ids_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        valid_BT: torch.Tensor | None = None,
        last_logits_only: bool = False,
        return_logits: bool | None = None,
    ) -> CausalLMOutput:
        """Logits [B, T, V] and, with `labels`, the cross-entropy over tokens whose label is not -100.

        `labels[b, t]` is the target for position t, i.e. already shifted (the openk2 loader yields
        (inputs, targets) pairs). `reduction="sum"` returns the summed loss for token-count normalization
        across micro-batches. With `labels`, the loss is computed chunk by chunk without materializing the
        [B, T, V] logits (faster and much smaller) and `logits` is None, unless `return_logits=True` asks for
        them (then the loss comes from those logits). Without `labels`, logits are always returned.
        `cache`/`valid_BT`/`position_ids_BT` are used by `generate`.
        """
        with _cached_blocks(input_ids_BT.device) as cached:
            x_BTD = self.hidden_states(input_ids_BT, position_ids_BT=position_ids_BT, cache=cache, valid_BT=valid_BT)
            if last_logits_only:
                x_BTD = x_BTD[:, -1:]
            logits_BTV = None
            if labels is None or return_logits:  # None (the default) = logits only when there is no loss
                logits_BTV = self.lm_head(x_BTD)
            loss = None if labels is None else self._loss(x_BTD, logits_BTV, labels, reduction)
        if cached:
            block_cache.begin_backward_at(loss, logits_BTV)
        return CausalLMOutput(logits=logits_BTV, loss=loss)

    def _loss(self, x_BTD: torch.Tensor, logits_BTV: torch.Tensor | None, labels: torch.Tensor,
              reduction: str) -> torch.Tensor:
        """`forward`'s loss: from the logits if it computed them, else chunk by chunk from the hidden states."""
        if logits_BTV is None:
            loss = linear_cross_entropy(x_BTD.reshape(-1, x_BTD.shape[-1]), self.lm_head.weight, labels.reshape(-1))
        else:
            loss = F.cross_entropy(
                logits_BTV.float().view(-1, logits_BTV.shape[-1]), labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
        if reduction == "mean":
            loss = loss / (labels != IGNORE_INDEX).sum().clamp(min=1)
        if self.training:
            aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
            if aux:
                loss = loss + torch.stack(aux).sum() * (1.0 if reduction == "mean" else labels.numel())
                for m in self.moe_layers():
                    m.aux_loss = None
        return loss

    # ------------------------------------------------------------- generate
    def generate(self, input_ids_BT, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Cached generation; see `openk2.model.generate.generate` for the arguments."""
        from openk2.model.generate import generate

        return generate(self, input_ids_BT, max_new_tokens, **kwargs)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        cfg, w = self.config, self.lm_head.weight
        return KVCache(cfg.num_hidden_layers, batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                       w.device, w.dtype)


def build_model(
    cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0
) -> K2Model:
    """Construct on the meta device, materialize on `device`, and initialize."""
    with torch.device("meta"):
        model = K2Model(cfg)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    if dtype is not None:
        model.to(dtype)
        for m in model.moe_layers():  # the selection bias stays fp32 (HF keeps it fp32 too)
            m.gate.e_score_correction_bias.data = m.gate.e_score_correction_bias.float()
    return model
