"""The decode step: one new token per sequence over a static-shape latent cache, compiled where torch allows.

`generate`, the serving engine (`openk2.serve.engine`) and anything else that decodes (RL rollouts run
through either) share one `DecodeStep` per model (`decode_step(model)`). A step is a pure function

    (latent_NBSL, key_valid_BS, tok_B, rope_pos_B) -> (logits_BV, new_latent_NBL)

over a fixed-size window of the latent cache: the cache is read, never written, inside the graph, and the
caller stores `new_latent_NBL` (one indexed copy). Keeping the graph free of input mutation is what lets
CUDA graphs (`mode="reduce-overhead"`) replay it, and it lets the same graph serve `KVCache` (one shared
time axis, left padding) and `SlotKVCache` (one length per row) alike.

`generate`'s greedy tokens use a second kind of graph (`DecodeStep.greedy`, `greedy_forward`): the step plus
the argmax, the eos bookkeeping and, on CPU, the cache write (an in-place write of the graph's input, which
CUDA graphs could not replay, so on GPU the caller stores the latents), so that a greedy token is one call.

Why it is faster than the reference path (`K2Model.forward(..., cache=...)`, which stays the reference):
static shapes (the window is a power-of-two bucket, so a graph is reused for many steps), no host syncs
and no data-dependent shapes in the step (expert routing is a dense gather of the chosen experts' weights
for small batches, or every expert with zero gates for larger ones), and `torch.compile` fuses the
hundred-odd small ops of a step (norms, rope, softmax, SwiGLU, routing) into a few C++ (CPU) or Triton
(GPU) kernels around the matmuls. Per-call overhead is cut where it showed in profiles (config A, CPU):
Dynamo checks only the guards on the step's inputs (not ~650 on the model's parameters), Inductor's C++
wrapper calls the kernels (not a Python function), on CPU a graph, once compiled, is called directly
(`openk2.model.direct_call`) instead of through Dynamo's per-call work, and without oneDNN the LM head, the
largest matrix of a token, is read from a transposed copy whose GEMV runs faster on CPU BLAS. On CPU the step's
first call also moves the model's large weights onto transparent huge pages (`openk2.model.huge_pages`), which a
token streams faster than 4 KiB pages.

Shapes that need a new graph compile once each (`dynamic=False`) up to `max_graphs` per `DecodeStep`;
beyond that, or when compilation fails (no C++ compiler, an unsupported platform), the step runs the
eager reference path, with one warning: never a silent recompile storm. Inductor's FX graph cache keeps
compiled kernels across processes (`TORCHINDUCTOR_CACHE_DIR`), so a second process mostly re-traces.

`OPENK2_COMPILE=0` in the environment turns `compile="auto"` off (the test suite sets it: most tests
generate a few tokens, where compiling would cost far more than it saves).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from openk2.model import direct_call, few_rows, huge_pages, matmul
from openk2.model.attention import MLA
from openk2.model.moe import MLP, MoE, Router, top_k_by_argmax
from openk2.model.rope import apply_rope
from openk2.model.switches import env_switch

if TYPE_CHECKING:
    from openk2.model.transformer import K2Model

log = logging.getLogger(__name__)

# Window sizes are powers of two from here: few graphs, and attention over at most 2x the live keys.
MIN_WINDOW = 64
# Graphs per DecodeStep. Each is a full compile (tens of seconds on a small CPU), so beyond this the step
# runs eagerly instead of compiling more.
DEFAULT_MAX_GRAPHS = 8
# Dense routing (every expert, zero gate for the unchosen) only once the token-slots outnumber the experts 4x.
# Below that, each token's chosen experts are gathered: compiled, Inductor fuses the gather into the GEMV kernel
# (no weight copy). It reads B x K expert matrices where the dense path reads E once, but does E / K times
# fewer FLOPs; on config A (16 experts, top-2, 1 thread) gathering was 1.47x / 1.56x / 1.22x the dense path's
# tokens/s at batch 8 / 16 / 32 (docs/benchmarks.md).
_DENSE_ROUTING_MIN_FRACTION = 4.0
# CPU fp32 weights with at least this many elements go through oneDNN (`openk2.model.matmul`), the rest through
# aten's (MKL) `linear`: at decode's 1-8 rows oneDNN streams a large matrix 1.5-3x faster than MKL's GEMV on the
# AMD EPYC hosts we measure on and splits it over both threads; for small ones MKL's lower per-call cost wins.
_ONEDNN_MIN_ELEMENTS = matmul.MIN_ELEMENTS
# Compiled CPU products as Inductor reductions where a library call's fixed cost outweighs its speed: every
# product of a one-row step, and small weights at any batch. In-process A/B at 2 threads (docs/benchmarks.md):
# config A batch 1 1.38x, config C batch 1 1.18x, config A batch 8 (small weights only) 1.13x; large weights at
# 8 rows stay on oneDNN (as reductions: config C batch 8 0.61x). False: every product as a library call.
_REDUCTION_PRODUCTS = True
_BMM_REDUCTIONS = True
# CPU fp32 products of up to `few_rows.MAX_ROWS` rows through our own few-row kernel (`openk2.model.few_rows`),
# where it builds: it streams a weight at 1-8 rows faster than oneDNN and than Inductor's reductions (in-process
# A/B in docs/benchmarks.md, "Few-row products"). False: the choices above.
_FEW_ROWS = True
# The attention over the latent cache (scores, softmax, weighted sum of latents) of a CPU fp32 step through the
# kernel library's `latent_attention` (`openk2.model.few_rows`) where it builds: compiled, Inductor runs the sum over
# keys as one chain of dependent adds per output vector; decode at 1,000 tokens of context 1.15-1.25x faster through
# the op (docs/benchmarks.md, "Prefetching products, decode attention as a kernel"). False: the reductions below.
_LATENT_ATTENTION = True
# A compiled CPU step's routing in the graph: the router's logits as a reduction and top-k as rounds of argmax, which
# Inductor fuses with the sigmoid and the gate weights, where `torch.topk` and the product would be library calls
# (~45 us per MoE layer on config A). False: `Router.forward` as the eager path runs it.
_IN_GRAPH_ROUTING = True
# A CPU graph, after its first call, called directly (`direct_call`) while the step's arguments match that call's:
# without Dynamo's frame hook, guards and parameter-gathering bytecode, ~0.35 ms of config A's 3.5 ms batch-8 step.
# False: every call through Dynamo.
_DIRECT_CALLS = True
# A CPU step's first call puts the model's large weights on transparent huge pages (`huge_pages`), which stream
# faster than 4 KiB pages: config C's batch-1 decode 1.07-1.14x, batch 8 1.05-1.09x (in-process A/Bs,
# docs/benchmarks.md).
# False: the weights stay where they are.
_HUGE_PAGE_WEIGHTS = True

CompileSwitch = bool | str  # True, False or "auto"


def window_size(n_keys: int) -> int:
    """The power-of-two cache window (>= MIN_WINDOW) that holds `n_keys` keys."""
    return max(MIN_WINDOW, 1 << max(0, n_keys - 1).bit_length())


def compile_enabled(compile: CompileSwitch) -> bool:
    """Resolve the switch: "auto" compiles unless OPENK2_COMPILE=0 (or false/off/no) is set."""
    if compile == "auto":
        return env_switch("OPENK2_COMPILE")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile


# ---------------------------------------------------------------------------------------------- the step
def _compiling_for_cpu_fp32(t: torch.Tensor) -> bool:
    """Dynamo is tracing a CPU fp32 step: where the step's products and routing become Inductor's own kernels."""
    return torch.compiler.is_compiling() and t.device.type == "cpu" and t.dtype == torch.float32


def _linear(x_BK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x @ w.T for the step. On CPU in fp32, compiled or not: our few-row kernel (`_FEW_ROWS`, up to
    `few_rows.MAX_ROWS` rows), except a compiled one-row step's small weights, whose fused reductions cost less
    than a call (config A batch 1: 0.95x through the kernel). Without the kernel, compiled: an Inductor reduction
    (C++ code fused with the ops around it, no library call) for one row, or for a small weight
    (< `_ONEDNN_MIN_ELEMENTS`) at any batch; oneDNN for a large weight at several rows. Eager, or elsewhere:
    oneDNN for a large fp32 CPU weight, aten's linear otherwise. (Not `matmul.linear`: its plain-tensor check is
    about eager tensors; here Dynamo traces fake ones.)"""
    cpu_fp32 = w_NK.device.type == "cpu" and w_NK.dtype == torch.float32
    large = w_NK.numel() >= _ONEDNN_MIN_ELEMENTS
    fused_reduction = torch.compiler.is_compiling() and _REDUCTION_PRODUCTS and x_BK.shape[0] == 1 and not large
    if _FEW_ROWS and not fused_reduction and few_rows.takes(x_BK, w_NK):
        return few_rows.mm(x_BK, w_NK)
    if _compiling_for_cpu_fp32(w_NK) and _REDUCTION_PRODUCTS and (x_BK.shape[0] == 1 or not large):
        return _reduction_product(x_BK, w_NK)
    if large and cpu_fp32 and matmul.ENABLED:
        return matmul.onednn_mm(x_BK, w_NK.t())
    return F.linear(x_BK, w_NK)


def _reduction_product(x_BK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x @ w.T spelt as a broadcast multiply and a sum: compiled, an Inductor reduction fused with the ops around it
    instead of a library call."""
    return (x_BK[:, None, :] * w_NK).sum(dim=-1)


def _bmm(a_XMK: torch.Tensor, b_XKN: torch.Tensor) -> torch.Tensor:
    """Batched a @ b; compiled on CPU in fp32 (`_REDUCTION_PRODUCTS`), an Inductor reduction like `_linear`'s."""
    if _REDUCTION_PRODUCTS and _BMM_REDUCTIONS and _compiling_for_cpu_fp32(a_XMK):
        return (a_XMK[..., :, :, None] * b_XKN[..., None, :, :]).sum(dim=-2)
    return torch.bmm(a_XMK, b_XKN)


def _queries(attn: MLA, x_BD: torch.Tensor) -> torch.Tensor:
    if hasattr(attn, "q_proj"):
        return _linear(x_BD, attn.q_proj.weight)
    return _linear(attn.q_a_layernorm(_linear(x_BD, attn.q_a_proj.weight)), attn.q_b_proj.weight)


def _mlp(mlp: MLP, x_BD: torch.Tensor) -> torch.Tensor:
    h_BF = F.silu(_linear(x_BD, mlp.gate_proj.weight)) * _linear(x_BD, mlp.up_proj.weight)
    return _linear(h_BF, mlp.down_proj.weight)


def _attention_step(
    attn: MLA, x_BD: torch.Tensor, cos_BR: torch.Tensor, sin_BR: torch.Tensor,
    latent_BSL: torch.Tensor, key_valid_BS: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA for one query per row over the cached latents plus the row's own new latent.

    The new key is scored separately instead of being written into the cache first: the graph stays free of
    input mutation. Returns (attention output [B, D], the new latent [B, L] for the caller to store)."""
    B = x_BD.shape[0]
    H, N, C, V = attn.n_heads, attn.nope_dim, attn.kv_lora_rank, attn.v_dim
    q_BHQ = _queries(attn, x_BD).view(B, H, attn.qk_dim)
    ckv_BC, k_pe_BR = _linear(x_BD, attn.kv_a_proj_with_mqa.weight).split([C, attn.rope_dim], dim=-1)
    ckv_BC = attn.kv_a_layernorm(ckv_BC)
    # The shared rope key rotates as one more head.
    pe_BXR = apply_rope(torch.cat((q_BHQ[..., N:], k_pe_BR.unsqueeze(1)), dim=1), cos_BR[:, None], sin_BR[:, None])
    new_BL = torch.cat((ckv_BC, pe_BXR[:, H]), dim=-1)
    w_HXC = attn.kv_b_proj.weight.view(H, N + V, C)
    # W_uk folded into the query: per head [B, N] @ [N, C].
    q_lat_HBC = _bmm(q_BHQ[..., :N].transpose(0, 1), w_HXC[:, :N])
    q_BHL = torch.cat((q_lat_HBC.transpose(0, 1), pe_BXR[:, :H]), dim=-1)
    if _LATENT_ATTENTION and few_rows.takes_attention(q_BHL, latent_BSL):
        o_lat_BHC = few_rows.latent_attention(q_BHL, latent_BSL, key_valid_BS, new_BL, attn.scale, C)
    else:
        scores_BHS = _bmm(q_BHL, latent_BSL.transpose(1, 2)) * attn.scale
        scores_BHS = scores_BHS.masked_fill(~key_valid_BS[:, None, :], float("-inf"))
        own_BH1 = (q_BHL * new_BL[:, None, :]).sum(dim=-1, keepdim=True) * attn.scale
        probs_BHX = torch.cat((scores_BHS, own_BH1), dim=-1).float().softmax(dim=-1).to(latent_BSL.dtype)
        S = latent_BSL.shape[1]
        o_lat_BHC = _bmm(probs_BHX[..., :S], latent_BSL[..., :C]) + probs_BHX[..., S:] * ckv_BC[:, None, :]
    # W_uv folded into the output: per head [B, C] @ [C, V].
    out_HBV = _bmm(o_lat_BHC.transpose(0, 1), w_HXC[:, N:].transpose(1, 2))
    return _linear(out_HBV.transpose(0, 1).reshape(B, H * V), attn.o_proj.weight), new_BL


def _route(gate: Router, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [B, K], gate weights [B, K]): `Router.forward`'s numbers, in the graph where it compiles for a
    CPU (`_IN_GRAPH_ROUTING`)."""
    if _IN_GRAPH_ROUTING and _compiling_for_cpu_fp32(x_BD):
        scores_BE = torch.sigmoid(_reduction_product(x_BD, gate.weight.float()))
        expert_ids_BK, weights_BK, _ = gate.route(scores_BE, top_k_by_argmax)
    else:
        expert_ids_BK, weights_BK, _ = gate(x_BD)
    return expert_ids_BK, weights_BK


def _moe_step(moe: MoE, x_BD: torch.Tensor) -> torch.Tensor:
    """Routed + shared experts for a few tokens, with shapes that depend only on B (no dispatch sort)."""
    expert_ids_BK, weights_BK = _route(moe.gate, x_BD)
    B, K = expert_ids_BK.shape
    E = moe.n_experts
    ex = moe.experts
    # The few-row kernel's experts op reads each chosen expert once whatever the batch: it gathers at any batch
    # it takes (`forward_gathered` calls it).
    if ex.takes_few_rows_kernel(x_BD, expert_ids_BK) or B * K <= _DENSE_ROUTING_MIN_FRACTION * E:
        y_BD = ex.forward_gathered(x_BD, expert_ids_BK, weights_BK)
    else:
        # Every expert on every token, gates zero for the unchosen: each expert's weights are read once.
        Fd, D = ex.gate_proj.shape[1], ex.gate_proj.shape[2]
        gate_BEF = _linear(x_BD, ex.gate_proj.reshape(E * Fd, D)).view(B, E, Fd)
        up_BEF = _linear(x_BD, ex.up_proj.reshape(E * Fd, D)).view(B, E, Fd)
        gates_BE = torch.zeros(B, E, dtype=weights_BK.dtype, device=x_BD.device).scatter(1, expert_ids_BK, weights_BK)
        h_EBF = (F.silu(gate_BEF) * up_BEF * gates_BE[..., None]).to(x_BD.dtype).transpose(0, 1)
        y_BD = torch.bmm(h_EBF, ex.down_proj.transpose(1, 2)).sum(dim=0)
    if moe.shared_experts is not None:
        y_BD = y_BD + _mlp(moe.shared_experts, x_BD)
    return y_BD


def decode_forward(
    model: K2Model, inv_freq: torch.Tensor, latent_NBSL: torch.Tensor, key_valid_BS: torch.Tensor,
    tok_B: torch.Tensor, rope_pos_B: torch.Tensor, lm_head_DV: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: (logits [B, V], new latents [n_layers, B, L]). Uncompiled, this is plain eager code
    (tested against the reference forward); `DecodeStep` compiles it. `lm_head_DV`: the LM head's weight
    transposed and contiguous, if the caller keeps one (see `DecodeStep`)."""
    assert model._rope is not None
    attention_factor = model._rope[1]
    x_BD = model.model.embed_tokens(tok_B)
    angles_BR = rope_pos_B.to(torch.float32)[:, None] * inv_freq
    cos_BR = (angles_BR.cos() * attention_factor).to(x_BD.dtype)
    sin_BR = (angles_BR.sin() * attention_factor).to(x_BD.dtype)
    new = []
    for i, layer in enumerate(model.model.layers):
        a_BD, new_BL = _attention_step(layer.self_attn, layer.input_layernorm(x_BD), cos_BR, sin_BR,
                                       latent_NBSL[i], key_valid_BS)
        new.append(new_BL)
        x_BD = x_BD + a_BD
        h_BD = layer.post_attention_layernorm(x_BD)
        mlp = layer.mlp
        x_BD = x_BD + (_moe_step(mlp, h_BD) if isinstance(mlp, MoE) else _mlp(mlp, h_BD))
    h_BD = model.model.norm(x_BD)
    logits_BV = _linear(h_BD, model.lm_head.weight) if lm_head_DV is None else h_BD @ lm_head_DV
    return logits_BV, torch.stack(new).to(latent_NBSL.dtype)


def greedy_forward(
    model: K2Model, inv_freq: torch.Tensor, latent_NBSL: torch.Tensor, key_valid_BS: torch.Tensor,
    tok_B: torch.Tensor, rope_pos_B: torch.Tensor, finished_B: torch.Tensor, write_pos_1: torch.Tensor,
    eos: torch.Tensor, pad: torch.Tensor, write_cache: bool, lm_head_DV: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """One whole greedy token of `generate`: the step, the argmax, eos bookkeeping and (`write_cache`) the cache
    write at `write_pos_1`, so that a token costs one graph call and no host sync. Returns (next tokens [B]
    (pad where the row had finished), finished [B], next rope positions, next write position), plus the new
    latents when the caller writes the cache (CUDA: a graph that mutates its inputs cannot be replayed)."""
    logits_BV, new_NBL = decode_forward(model, inv_freq, latent_NBSL, key_valid_BS, tok_B, rope_pos_B, lm_head_DV)
    next_B = torch.where(finished_B, pad, logits_BV.argmax(dim=-1))
    out = (next_B, finished_B | (next_B == eos), rope_pos_B + 1, write_pos_1 + 1)
    if not write_cache:
        return (*out, new_NBL)
    latent_NBSL.index_copy_(2, write_pos_1, new_NBL.unsqueeze(2))
    key_valid_BS.index_fill_(1, write_pos_1, True)
    return out


# ---------------------------------------------------------------------------------------------- compiling
_COMPILE_BROKEN: str | None = None  # set once compilation failed on this platform: warn once, then stay eager
_lock = threading.Lock()
_graph_budget_total = 0  # sum of max_graphs over the DecodeSteps made: they share one code object in Dynamo


def _reserve_graphs(n: int) -> None:
    """Dynamo counts recompiles per code object, and every DecodeStep compiles the same `step` function: raise
    its limit to the budgets of all steps together, so that our own budget, not Dynamo's, decides."""
    global _graph_budget_total
    with _lock:
        _graph_budget_total += n
    _apply_graph_limit()


def _apply_graph_limit() -> None:
    """Dynamo's config is per thread (torch 2.13): a serving engine compiles on its own thread, which starts
    at the default limit of 8 whatever the constructing thread set. Called before each new graph."""
    if torch._dynamo.config.recompile_limit < _graph_budget_total:
        torch._dynamo.config.recompile_limit = _graph_budget_total


def _mode_for(device: torch.device) -> str | None:
    # CUDA graphs replay the whole step with one launch; on CPU, default mode (C++ kernels, no graphs).
    return "reduce-overhead" if device.type == "cuda" else None


def _inductor_options(device: torch.device, cpp_wrapper: bool) -> dict[str, bool]:
    """CPU: the kernel call sequence in C++ (`cpp_wrapper`), not a Python function calling ~80 kernels, and no
    per-call size asserts on the inputs (the guards already check them). ~20% of a config-A token (measured in
    docs/benchmarks.md); the C++ wrapper adds compile time once per graph (cached across processes)."""
    if device.type != "cpu":
        return {}
    return {"cpp_wrapper": cpp_wrapper, "size_asserts": False, "alignment_asserts": False}


def _input_guards_only(arg_names: tuple[str, ...]) -> Callable:
    """Dynamo's guard filter: keep the guards on the step's own inputs (their shapes, strides, dtypes and
    devices tell its graphs apart) and the global-state ones (grad mode), drop the ~650 on the model's modules
    and parameters, whose check cost ~0.3 ms per token on config A. Safe because each DecodeStep compiles
    its own isolated region for one model whose structure does not change; the parameters are still read at
    each call, so in-place weight updates (RL) are seen. A model moved to another dtype or device gets new
    caches, whose guards fail and recompile."""
    prefixes = tuple(p for n in arg_names for p in (f"L['{n}']", f"{n}.", f"{n}["))

    def keep(entries: list) -> list[bool]:
        on_inputs = [e.name in arg_names or e.name.startswith(prefixes) for e in entries]
        if not any(on_inputs):  # guard names we do not recognize (another torch): keep them all
            return [True] * len(entries)
        return [e.name == "" or k for e, k in zip(entries, on_inputs, strict=True)]

    return keep


_LOGITS_ARGS = ("lm_head_DV", "inv_freq", "latent_NBSL", "key_valid_BS", "tok_B", "rope_pos_B")
_GREEDY_ARGS = (*_LOGITS_ARGS, "finished_B", "write_pos_1", "eos", "pad")
GraphKey = tuple[str, int, int, tuple[int, ...], bool]  # (kind, batch, window, cache strides, inference tensor)


class DecodeStep:
    """The shared decode step of one model; see the module docstring.

    Two kinds of graph: `__call__` (logits and new latents; the serving and RL engines, sampling) and
    `greedy` (a whole greedy token of `generate`). Both return None when the step must run the eager
    reference path instead (compiling disabled or failed, or the graph budget spent); callers then run
    `K2Model.forward` with their cache.

    `compile_seconds` holds the wall time of each graph's first call (trace + compile, or a cache load),
    keyed by (batch, window); `eager_fallbacks` counts steps sent to the reference path. The graph budget
    counts what Dynamo compiles: one graph per (kind, batch, window, cache strides, inference tensor or not),
    since callers whose caches differ in layout or kind (`generate`'s cache, made in inference mode; a serving
    engine's slot cache, made outside it and sliced to the live rows) get separate graphs for the same
    (batch, window).
    """

    def __init__(
        self, model: K2Model, compile: CompileSwitch = "auto", max_graphs: int = DEFAULT_MAX_GRAPHS,
        backend: str | Callable = "inductor", cpp_wrapper: bool | None = None,
        transposed_lm_head: bool | None = None,
    ) -> None:
        self.model = model
        self.enabled = compile_enabled(compile)
        self.max_graphs = max_graphs
        if self.enabled:
            _reserve_graphs(max_graphs)
        self.backend = backend
        # OPENK2_CPP_WRAPPER=0 keeps Inductor's Python wrapper (faster to compile, ~10% slower per token).
        self.cpp_wrapper = (os.environ.get("OPENK2_CPP_WRAPPER", "1") != "0") if cpp_wrapper is None else cpp_wrapper
        self.compile_seconds: dict[tuple[int, int], float] = {}
        self._graphs: set[GraphKey] = set()
        self._eager_graphs: set[GraphKey] = set()  # Dynamo refused these
        self.eager_fallbacks = 0
        self._fns: dict[str, Callable] = {}
        self._warned_budget = False
        device = model.lm_head.weight.device
        # A graph that writes the cache cannot be replayed as a CUDA graph: there the caller writes it.
        self.writes_cache = device.type != "cuda"
        # CPU without oneDNN: the LM head's GEMV reads its weight as [D, V] rows (a copy, refreshed when the
        # weight changes) ~1.3-2.8x faster than MKL through the [V, D] weight (docs/benchmarks.md); the biggest
        # matrix of a token. oneDNN on the plain weight is faster still, and needs no copy.
        if transposed_lm_head is None:
            transposed_lm_head = device.type == "cpu" and not matmul.ENABLED
        self.transposed_lm_head = transposed_lm_head
        self._lm_head_DV: torch.Tensor | None = None
        self._lm_head_version: tuple[int, int] | None = None
        self._capture = direct_call.Capture()
        self._weights_placed = False  # huge pages (`_HUGE_PAGE_WEIGHTS`) are set up at the first compiled call
        self._direct: dict[direct_call.CallKey, direct_call.DirectCall] = {}

    def raise_budget(self, max_graphs: int) -> None:
        """Allow up to `max_graphs` graphs (a benchmark that visits many shapes on purpose)."""
        if self.enabled and max_graphs > self.max_graphs:
            _reserve_graphs(max_graphs - self.max_graphs)
        self.max_graphs = max(self.max_graphs, max_graphs)

    @property
    def compiled(self) -> bool:
        return self.enabled and _COMPILE_BROKEN is None

    def _compiled_fn(self, kind: str) -> Callable:
        fn = self._fns.get(kind)
        if fn is None:
            model, write_cache = self.model, self.writes_cache
            if kind == "logits":
                def step(lm_head_DV, inv_freq, latent_NBSL, key_valid_BS, tok_B, rope_pos_B):
                    return decode_forward(model, inv_freq, latent_NBSL, key_valid_BS, tok_B, rope_pos_B, lm_head_DV)
                names = _LOGITS_ARGS
            else:
                def step(lm_head_DV, inv_freq, latent_NBSL, key_valid_BS, tok_B, rope_pos_B, finished_B, write_pos_1,
                         eos, pad):
                    return greedy_forward(model, inv_freq, latent_NBSL, key_valid_BS, tok_B, rope_pos_B, finished_B,
                                          write_pos_1, eos, pad, write_cache, lm_head_DV)
                names = _GREEDY_ARGS
            device = model.lm_head.weight.device
            options: dict = {"guard_filter_fn": _input_guards_only(names)}
            backend, mode = self.backend, None
            if self.backend == "inductor" and self._direct_calls(device):
                backend = direct_call.capturing_backend(_inductor_options(device, self.cpp_wrapper), self._capture)
            elif self.backend == "inductor":
                options.update(_inductor_options(device, self.cpp_wrapper))
                mode = _mode_for(device)
            fn = torch.compile(step, backend=backend, fullgraph=True, dynamic=False, mode=mode, options=options,
                               isolate_recompiles=True)
            self._fns[kind] = fn
        return fn

    @staticmethod
    def _direct_calls(device: torch.device) -> bool:
        # CUDA graphs already replay a whole step in one launch.
        return _DIRECT_CALLS and device.type == "cpu"

    def __call__(
        self, latent_NBSL: torch.Tensor, key_valid_BS: torch.Tensor, tok_B: torch.Tensor, rope_pos_B: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits [B, V], new latents [n_layers, B, L]) of one token per row, or None: run the eager path."""
        return self._run("logits", (latent_NBSL, key_valid_BS, tok_B, rope_pos_B))

    def greedy(
        self, latent_NBSL: torch.Tensor, key_valid_BS: torch.Tensor, tok_B: torch.Tensor, rope_pos_B: torch.Tensor,
        finished_B: torch.Tensor, write_pos_1: torch.Tensor, eos: torch.Tensor, pad: torch.Tensor,
    ) -> tuple[torch.Tensor, ...] | None:
        """`greedy_forward` over a `KVCache`'s tensors (written at `write_pos_1` where `writes_cache`), or None:
        run the eager path. `eos`, `pad` are 0-d long tensors (ints would be baked into the graph)."""
        return self._run("greedy", (latent_NBSL, key_valid_BS, tok_B, rope_pos_B, finished_B, write_pos_1, eos, pad))

    def _lm_head_input(self) -> torch.Tensor | None:
        """The transposed LM head, recopied whenever the weight was written in place (its version counter moves:
        RL weight updates) or replaced."""
        if not self.transposed_lm_head:
            return None
        w_VD = self.model.lm_head.weight
        version = (w_VD._version, w_VD.data_ptr())
        if self._lm_head_version != version:
            # A normal tensor whoever asks first (generate runs in inference mode, the engines do not): the
            # graphs guard on it, and must not recompile for the kind of tensor.
            with torch.inference_mode(False), torch.no_grad():
                self._lm_head_DV = w_VD.detach().t().contiguous()
            self._lm_head_version = version
        return self._lm_head_DV

    def _run(self, kind: str, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        global _COMPILE_BROKEN
        if not self.compiled:
            self.eager_fallbacks += 1
            return None
        latent_NBSL = args[0]
        model = self.model
        if not self._weights_placed:
            self._weights_placed = True
            if _HUGE_PAGE_WEIGHTS and latent_NBSL.device.type == "cpu":
                huge_pages.move_weights_to_huge_pages(model)
        if model._rope is None or model._rope[0].device != latent_NBSL.device:
            model._cos_sin(args[3][:1, None], latent_NBSL.dtype)  # builds model._rope
        step_args = (self._lm_head_input(), model._rope[0], *args)
        if self._direct:
            direct = self._direct.get((kind, direct_call.call_key(step_args)))
            if direct is not None:
                return tuple(direct(step_args))
        key = (latent_NBSL.shape[1], latent_NBSL.shape[2])
        graph = (kind, *key, latent_NBSL.stride(), latent_NBSL.is_inference())
        if graph in self._eager_graphs:
            self.eager_fallbacks += 1
            return None
        new_graph = graph not in self._graphs
        if new_graph and len(self._graphs) >= self.max_graphs:
            if not self._warned_budget:
                self._warned_budget = True
                warnings.warn(f"decode step: {self.max_graphs} graphs compiled already; shape (batch, window) "
                              f"{key} runs the eager path", RuntimeWarning, stacklevel=3)
            self.eager_fallbacks += 1
            return None
        if not new_graph:
            out = self._compiled_fn(kind)(*step_args)
        else:
            _apply_graph_limit()
            t0 = time.perf_counter()
            try:
                out = self._first_call(kind, step_args)
            except Exception as e:
                if "recompile limit" in str(e) or "RecompileLimit" in type(e).__name__:
                    # A guard this budget does not model made Dynamo recompile past its limit: this shape stays
                    # eager, compiling goes on for the others (it is not a platform failure).
                    self._graphs.add(graph)
                    self._eager_graphs.add(graph)
                    warnings.warn(f"decode step: Dynamo's recompile limit was reached at (batch, window) {key}; "
                                  f"that shape runs the eager path", RuntimeWarning, stacklevel=3)
                    self.eager_fallbacks += 1
                    return None
                with _lock:
                    if _COMPILE_BROKEN is None:
                        _COMPILE_BROKEN = f"{type(e).__name__}: {e}"
                        warnings.warn(f"torch.compile failed for the decode step; decoding eagerly from now on "
                                      f"({_COMPILE_BROKEN.splitlines()[0][:300]})", RuntimeWarning, stacklevel=3)
                        log.warning("decode step compile failed", exc_info=True)
                self.eager_fallbacks += 1
                return None
            self._graphs.add(graph)
            self.compile_seconds[key] = self.compile_seconds.get(key, 0.0) + time.perf_counter() - t0
            log.info("decode step: %s graph for (batch, window) %s in %.1f s", kind, key, self.compile_seconds[key])
        captured = self._capture.take()  # a graph compiled during this call: call it directly from now on
        if captured is not None and new_graph:
            direct = direct_call.plan(*captured[:2], step_args, model, captured[2], out)
            if direct is not None:
                self._direct[(kind, direct_call.call_key(step_args))] = direct
        if latent_NBSL.device.type == "cuda":
            # CUDA-graph outputs are overwritten by the next replay: the caller may keep them.
            out = tuple(t.clone() for t in out)
        return out

    def _first_call(self, kind: str, step_args: tuple[torch.Tensor | None, ...]) -> tuple:
        """Compile and run a new graph. If Inductor's C++ wrapper fails (a toolchain that builds kernels but
        not the wrapper), retry once with the Python wrapper before calling compiling broken (compiling fails
        before the graph runs, so a failed attempt has not written the cache)."""
        try:
            return self._compiled_fn(kind)(*step_args)
        except Exception as e:
            if not (self.cpp_wrapper and self.backend == "inductor") or "recompile limit" in str(e):
                raise
            log.warning("decode step: Inductor's C++ wrapper failed (%s); using the Python wrapper", e)
            self.cpp_wrapper = False
            self._fns.pop(kind, None)
            return self._compiled_fn(kind)(*step_args)


def decode_step(model: K2Model, compile: CompileSwitch = "auto") -> DecodeStep:
    """The model's shared DecodeStep for this switch (created on first use, then reused: its graphs live as
    long as the model). `compile=False` gets a step that always sends callers to the eager path."""
    enabled = compile_enabled(compile)
    steps: dict[bool, DecodeStep] = model.__dict__.setdefault("_decode_steps", {})
    if enabled not in steps:
        steps[enabled] = DecodeStep(model, compile=enabled)
    return steps[enabled]


def reset_compile_failure() -> None:
    """Forget an earlier compile failure (tests; or after installing a compiler)."""
    global _COMPILE_BROKEN
    _COMPILE_BROKEN = None
