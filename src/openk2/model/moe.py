"""Sigmoid-routed mixture of experts with a shared expert and aux-loss-free load balancing.

Routing follows DeepSeek-V3 / K2 (`noaux_tc`): fp32 sigmoid scores; experts are *selected* on
scores + `e_score_correction_bias` (group-limited top-k); the gate weights are the *unbiased* scores of
the chosen experts, renormalized when `norm_topk_prob`, times `routed_scaling_factor`. Routed experts are
3-D weights computed with sort-based dispatch and grouped matmuls (no Python loop over experts).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from openk2.model import few_rows, matmul
from openk2.model.config import ModelConfig
from openk2.model.few_rows import as_rows
from openk2.model.matmul import Linear


class MLP(nn.Module):
    """SwiGLU feed-forward (the dense layers and the shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _takes_swiglu_kernel(*tensors: torch.Tensor) -> bool:
    return (_SWIGLU_KERNEL and not torch.compiler.is_compiling() and matmul.plain_fp32_cpu(*tensors)
            and few_rows.available())


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; eagerly on fp32 CPU tensors one pass of the kernel library's, forward and backward
    (`csrc/swiglu.cpp`), where aten makes two and three."""
    if not _takes_swiglu_kernel(gate, up) or gate.shape != up.shape or gate.numel() == 0:
        return F.silu(gate) * up
    return _SwiGLU.apply(gate, up)


class _SwiGLU(torch.autograd.Function):
    """`swiglu` through the kernel: gate and up saved, the sigmoid recomputed in the backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return few_rows.swiglu(as_rows(gate), as_rows(up)).view(gate.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = gate.new_empty(gate.shape), up.new_empty(up.shape)
        few_rows.swiglu_backward(as_rows(grad), as_rows(gate), as_rows(up), as_rows(grad_gate), as_rows(grad_up))
        return grad_gate, grad_up


class Router(nn.Module):
    """HF `mlp.gate`: `weight` [E, D] and the fp32 selection bias `e_score_correction_bias` [E]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E = cfg.n_routed_experts
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (expert ids [T, K], gate weights [T, K] fp32, sigmoid scores [T, E] fp32)."""
        return self.route(torch.sigmoid(F.linear(x_TD.float(), self.weight.float())))

    def route(
        self, scores_TE: torch.Tensor, topk: TopK | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` from the sigmoid scores [T, E] fp32. `topk(x, k)` -> (values, indices) replaces `torch.topk`
        (the compiled decode step's, `top_k_by_argmax`)."""
        topk = topk or _torch_topk
        with torch.no_grad():
            choice_TE = scores_TE + self.e_score_correction_bias
            if self.n_group > 1:
                T, E = choice_TE.shape
                choice_TGe = choice_TE.view(T, self.n_group, E // self.n_group)
                group_scores_TG = topk(choice_TGe, 2)[0].sum(dim=-1)
                top_groups_TG = topk(group_scores_TG, self.topk_group)[1]
                keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
                choice_TE = choice_TGe.masked_fill(~keep_TG[..., None], float("-inf")).view(T, E)
            expert_ids_TK = topk(choice_TE, self.top_k)[1]
        # The bias only selects experts; gate weights come from the unbiased scores.
        weights_TK = scores_TE.gather(1, expert_ids_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return expert_ids_TK, weights_TK * self.scaling, scores_TE


TopK = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _torch_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x.topk(k, dim=-1, sorted=False)


def top_k_by_argmax(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk` along the last dim as k rounds of argmax (largest first; a tie goes to the lower index). Compiled on
    CPU, `torch.topk` is a library call (~15 us for decode's few rows); these are reductions Inductor fuses."""
    values, indices = [], []
    for _ in range(k):
        index = x.argmax(dim=-1, keepdim=True)
        values.append(x.gather(-1, index))
        indices.append(index)
        x = x.scatter(-1, index, float("-inf"))
    return torch.cat(values, dim=-1), torch.cat(indices, dim=-1)


def stable_order(ids_S: torch.Tensor) -> torch.Tensor:
    """`ids_S.argsort(stable=True)` for a few values: each position's rank counted by comparisons (S^2 of them),
    then inverted by a scatter. Compiled on CPU, argsort is a library call (~40 us for decode's 16 slots); these
    are elementwise ops and reductions Inductor fuses."""
    S = ids_S.shape[0]
    position_S = torch.arange(S, device=ids_S.device)
    other_SS, own_SS = ids_S[None, :], ids_S[:, None]  # [s, t]: slot t against slot s
    earlier_SS = position_S[None, :] < position_S[:, None]
    rank_S = ((other_SS < own_SS) | ((other_SS == own_SS) & earlier_SS)).sum(dim=1)
    return torch.empty_like(position_S).scatter_(0, rank_S, position_S)


class _GroupedMM(torch.autograd.Function):
    """`F.grouped_mm` with an explicit backward: torch's own CPU backward for grouped_mm fails on
    strides in torch 2.13, while the forward kernels it needs (grouped dX and dW) work. Where oneDNN takes the
    operands (`openk2.model.matmul`), each expert's product is one oneDNN call instead (~2-4x faster on CPU)."""

    @staticmethod
    def forward(ctx, x_SK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_SK, w_EKN, offs_E)
        if matmul.takes_onednn(x_SK, w_EKN, experts_training=True):
            return _per_expert(x_SK, w_EKN, offs_E)
        return F.grouped_mm(x_SK, w_EKN, offs=offs_E)

    @staticmethod
    def backward(ctx, grad_SN: torch.Tensor):
        x_SK, w_EKN, offs_E = ctx.saved_tensors
        grad_SN = grad_SN.contiguous()
        grad_x = grad_w = None
        onednn = matmul.takes_onednn(x_SK, w_EKN, grad_SN, experts_training=True)
        if ctx.needs_input_grad[0]:
            w_ENK = w_EKN.transpose(-2, -1)
            grad_x = _per_expert(grad_SN, w_ENK, offs_E) if onednn else F.grouped_mm(grad_SN, w_ENK, offs=offs_E)
        if ctx.needs_input_grad[1]:
            if onednn:
                grad_w = torch.stack([
                    matmul.product(x_SK[start:end].t(), grad_SN[start:end]) if end > start
                    else w_EKN.new_zeros(w_EKN.shape[1:]) for start, end in _spans(offs_E)])
            else:
                grad_w = F.grouped_mm(x_SK.t(), grad_SN, offs=offs_E)
        return grad_x, grad_w, None


def _spans(offs_E: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs_E.tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _per_expert(x_SK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    pieces = [matmul.product(x_SK[start:end], w_EKN[e]) for e, (start, end) in enumerate(_spans(offs_E))
              if end > start]
    return torch.cat(pieces) if pieces else x_SK.new_empty(0, w_EKN.shape[-1])


def grouped_matmul(x_SK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor, impl: str) -> torch.Tensor:
    """Rows of x_SK sorted by expert (counts_E rows each) times that expert's w_EKN[e]."""
    if impl == "grouped_mm":
        offs_E = counts_E.cumsum(0).to(torch.int32)
        if x_SK.is_cuda:
            return F.grouped_mm(x_SK, w_EKN, offs=offs_E)
        if torch.is_grad_enabled() and (x_SK.requires_grad or w_EKN.requires_grad):
            return _GroupedMM.apply(x_SK, w_EKN, offs_E)
        # Forward only (prefill, evaluation): oneDNN's products at any thread count.
        if matmul.takes_onednn(x_SK, w_EKN):
            return _per_expert(x_SK, w_EKN, offs_E)
        return F.grouped_mm(x_SK, w_EKN, offs=offs_E)
    # padded_bmm: scatter rows into an [E, capacity, K] block, one bmm, gather back.
    E = w_EKN.shape[0]
    starts_E = counts_E.cumsum(0) - counts_E
    expert_S = torch.repeat_interleave(torch.arange(E, device=x_SK.device), counts_E, output_size=x_SK.shape[0])
    slot_S = torch.arange(x_SK.shape[0], device=x_SK.device) - starts_E[expert_S]
    capacity = int(counts_E.max()) if x_SK.shape[0] else 0
    x_ECK = x_SK.new_zeros(E, capacity, x_SK.shape[1]).index_put((expert_S, slot_S), x_SK)
    return torch.bmm(x_ECK, w_EKN)[expert_S, slot_S]


class _SwiGLUHalves(torch.autograd.Function):
    """silu(gate) * up of the two halves of one [S, 2F] tensor (the fused gate-up matmul's output), whose backward
    writes both halves' gradients into one [S, 2F] buffer. `chunk` + silu + mul computes the same numbers, but
    autograd then builds each half's gradient as a zero-filled [S, 2F] tensor and adds the two (~3% of a nano CPU
    training step). Eagerly on fp32 CPU through the kernel library's one-pass forward and backward (`swiglu`);
    elsewhere aten's ops as autograd runs them (mul and silu_backward), whose gradients equal autograd's."""

    @staticmethod
    def forward(ctx, gate_up_S2F: torch.Tensor) -> torch.Tensor:
        gate_SF, up_SF = gate_up_S2F.chunk(2, dim=-1)
        if _takes_swiglu_kernel(gate_up_S2F) and gate_up_S2F.numel():
            ctx.save_for_backward(gate_SF, up_SF)
            return few_rows.swiglu(as_rows(gate_SF), as_rows(up_SF)).view(gate_SF.shape)
        silu_SF = F.silu(gate_SF)
        ctx.save_for_backward(gate_SF, up_SF, silu_SF)
        return silu_SF * up_SF

    @staticmethod
    def backward(ctx, grad_SF: torch.Tensor) -> torch.Tensor:
        saved = ctx.saved_tensors  # once: activation checkpointing unpacks each saved tensor once
        width = grad_SF.shape[-1]
        grad_S2F = grad_SF.new_empty(*grad_SF.shape[:-1], 2 * width)
        if len(saved) == 2:  # the kernel's forward
            grad_gate_RF, grad_up_RF = grad_S2F.view(-1, 2 * width).chunk(2, dim=-1)
            few_rows.swiglu_backward(as_rows(grad_SF), *map(as_rows, saved), grad_gate_RF, grad_up_RF)
            return grad_S2F
        gate_SF, up_SF, silu_SF = saved
        grad_gate_SF, grad_up_SF = grad_S2F.chunk(2, dim=-1)
        torch.ops.aten.silu_backward(grad_SF * up_SF, gate_SF, grad_input=grad_gate_SF)
        torch.mul(grad_SF, silu_SF, out=grad_up_SF)
        return grad_S2F


# Fuse the gate and up grouped matmuls only in training and when experts get this many rows on average: the
# fused weight is a per-call copy of all experts, which costs more than it saves for a few tokens (decode), ~5%
# less MoE time in training (measured on CPU, bench configs A and B). Forward-only calls (prefill, evaluation)
# never fuse: there the copy was 40-110 ms of a 512-token config-C prefill on one thread, a third of its time.
_FUSED_GATE_UP_MIN_ROWS_PER_EXPERT = 32
# SwiGLU's elementwise part through the kernel library eagerly on fp32 CPU (`swiglu`); False: aten's silu and mul.
_SWIGLU_KERNEL = True


def default_moe_impl(device: torch.device) -> str:
    return "grouped_mm" if hasattr(F, "grouped_mm") else "padded_bmm"


class RoutedExperts(nn.Module):
    """E SwiGLU experts as 3-D weights: gate_proj/up_proj [E, F, D], down_proj [E, D, F]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, D, Fd = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, Fd, D))
        self.up_proj = nn.Parameter(torch.empty(E, Fd, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fd))
        self.impl = cfg.moe_impl

    def forward(
        self, x_SD: torch.Tensor, counts_E: torch.Tensor, weights_S1: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows of x_SD sorted by expert (counts_E rows each) through their expert, each output scaled by its
        gate weight in `weights_S1` when given."""
        impl = default_moe_impl(x_SD.device) if self.impl == "auto" else self.impl
        training = torch.is_grad_enabled() and self.gate_proj.requires_grad
        if training and x_SD.shape[0] >= _FUSED_GATE_UP_MIN_ROWS_PER_EXPERT * counts_E.shape[0]:
            # One grouped matmul for gate and up: wider per-expert matmuls, one pass over the experts. The
            # parameters stay separate (HF names, per-matrix Muon), so the cat copies them on every call.
            gate_up_EDX = torch.cat((self.gate_proj, self.up_proj), dim=1).transpose(-2, -1)
            h_SF = _SwiGLUHalves.apply(grouped_matmul(x_SD, gate_up_EDX, counts_E, impl))
        else:
            gate_SF = grouped_matmul(x_SD, self.gate_proj.transpose(-2, -1), counts_E, impl)
            up_SF = grouped_matmul(x_SD, self.up_proj.transpose(-2, -1), counts_E, impl)
            h_SF = F.silu(gate_SF) * up_SF
        if weights_S1 is not None:
            # down_proj is linear: scaling its F-wide input equals scaling the D-wide output, and is cheaper.
            h_SF = (h_SF * weights_S1).to(x_SD.dtype)
        return grouped_matmul(h_SF, self.down_proj.transpose(-2, -1), counts_E, impl)

    def takes_few_rows_kernel(self, x_ND: torch.Tensor, expert_ids_NK: torch.Tensor) -> bool:
        """Whether `forward_gathered` runs the few-row kernel's experts op (`_FEW_ROWS_EXPERTS`): CPU fp32 where the
        kernel builds, up to `few_rows.MAX_SLOTS_PER_EXPERT` slots per expert, except for small experts (<
        `matmul.MIN_ELEMENTS` per matrix) in compiled code, where Inductor fuses the gathered products with the ops
        around them for less than a library call costs (config A's experts, 128 x 256: 0.95x at batch 1, 0.98x at
        batch 8 through the op; docs/benchmarks.md)."""
        small = self.gate_proj[0].numel() < matmul.MIN_ELEMENTS and _SMALL_EXPERTS_TO_INDUCTOR
        return (_FEW_ROWS_EXPERTS and not (small and torch.compiler.is_compiling())
                and few_rows.takes_experts(x_ND, expert_ids_NK, self.gate_proj))

    def forward_gathered(
        self, x_ND: torch.Tensor, expert_ids_NK: torch.Tensor, weights_NK: torch.Tensor
    ) -> torch.Tensor:
        """Sum over k of weights_NK * expert_k(x) by gathering the chosen experts' weights and batched matmuls.

        For a few tokens (decode) this beats dispatch + grouped matmul, which pays per-op costs for every
        expert (a handful of ops in all, instead of several per expert)."""
        N, K = expert_ids_NK.shape
        if self.takes_few_rows_kernel(x_ND, expert_ids_NK):
            return few_rows.experts(x_ND, expert_ids_NK, weights_NK, self.gate_proj, self.up_proj, self.down_proj)
        if _SORTED_GATHER and N > 1:  # one token's experts are distinct: nothing to share
            return self._forward_gathered_sorted(x_ND, expert_ids_NK, weights_NK)
        D = x_ND.shape[1]
        ids_S = expert_ids_NK.reshape(-1)
        x_N1D = x_ND.unsqueeze(1)

        def gathered(w_EFD: torch.Tensor) -> torch.Tensor:  # all K experts of a token at once: [N, D, K*F]
            return w_EFD.index_select(0, ids_S).view(N, -1, D).transpose(1, 2)

        # One gathered weight alive at a time: big short-lived CPU allocations otherwise go back to the OS
        # and page-fault on every decode step.
        h_N1X = F.silu(torch.bmm(x_N1D, gathered(self.gate_proj))) * torch.bmm(x_N1D, gathered(self.up_proj))
        h_S1F = (h_N1X.view(N * K, 1, -1) * weights_NK.reshape(N * K, 1, 1)).to(x_ND.dtype)
        y_S1D = torch.bmm(h_S1F, self.down_proj.index_select(0, ids_S).transpose(1, 2))
        return y_S1D.view(N, K, -1).sum(dim=1)

    def _forward_gathered_sorted(
        self, x_ND: torch.Tensor, expert_ids_NK: torch.Tensor, weights_NK: torch.Tensor
    ) -> torch.Tensor:
        """`forward_gathered` over (token, expert) slots in expert order: tokens that share an expert read its
        weights back to back, the second time from cache, so DRAM traffic approaches the chosen experts' union."""
        N, K = expert_ids_NK.shape
        ids_S = expert_ids_NK.reshape(-1)
        in_graph = _IN_GRAPH_ORDER and torch.compiler.is_compiling() and ids_S.device.type == "cpu"
        order_S = stable_order(ids_S) if in_graph else ids_S.argsort(stable=True)
        experts_S, tokens_S = ids_S[order_S], order_S // K
        x_S1D = x_ND.index_select(0, tokens_S).unsqueeze(1)
        h_S1F = (F.silu(torch.bmm(x_S1D, self.gate_proj.index_select(0, experts_S).transpose(1, 2)))
                 * torch.bmm(x_S1D, self.up_proj.index_select(0, experts_S).transpose(1, 2)))
        h_S1F = (h_S1F * weights_NK.reshape(-1)[order_S].view(-1, 1, 1)).to(x_ND.dtype)
        y_SD = torch.bmm(h_S1F, self.down_proj.index_select(0, experts_S).transpose(1, 2)).squeeze(1)
        return x_ND.new_zeros(x_ND.shape).index_add_(0, tokens_S, y_SD)


# Decode's gathered experts in expert order for several tokens (`RoutedExperts._forward_gathered_sorted`); False:
# token order. In-process A/B, compiled step, 2 threads (bench/decode_variants.py ... --variants default
# token-order-gather): config C batch 8 1.05x, config A batch 8 1.01x; at batch 1 (nothing shared) the sort and
# scatter cost 7% on config A, so one token keeps token order.
_SORTED_GATHER = True
# Compiled for a CPU, that order by counting (`stable_order`), in the graph; False: argsort, a library call.
_IN_GRAPH_ORDER = True
# `forward_gathered` through the few-row kernel's experts op (`openk2.model.few_rows.experts`) on CPUs where it
# builds: each chosen expert read once for all its tokens at the kernel's speed (docs/benchmarks.md, "Few-row
# products"). False: the gathered products above.
_FEW_ROWS_EXPERTS = True
# Compiled code leaves experts below `matmul.MIN_ELEMENTS` per matrix to Inductor (`takes_few_rows_kernel`); False
# sends them through the experts op too (bench/decode_variants.py's `experts-op`).
_SMALL_EXPERTS_TO_INDUCTOR = True


class _SumOverSlots(torch.autograd.Function):
    """y_ND[n] = sum over k of y_SD[slot_NK[n, k]]: each token's K expert outputs, rows of the expert-sorted y_SD,
    summed in k order (a sum, not a scatter-add: deterministic on every device). Its backward is one gather of the
    tokens' gradients, y_SD's row s getting token_S[s]'s; autograd's formula for the same forward written as
    index_copy + view + sum also materialized the expanded [N, K, D] gradient and gathered from it (bench training step
    1.09-1.13x on config B, 6 experts a token; 1.02x on A, 2 a token; docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, y_SD: torch.Tensor, slot_NK: torch.Tensor, token_S: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(token_S)
        N, K = slot_NK.shape
        return y_SD.index_select(0, slot_NK.reshape(-1)).view(N, K, -1).sum(dim=1)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        (token_S,) = ctx.saved_tensors
        return grad_ND.index_select(0, token_S), None, None


def sum_over_slots(y_SD: torch.Tensor, order_S: torch.Tensor, top_k: int) -> torch.Tensor:
    """[N, D]: each token's `top_k` rows of y_SD summed, where row s belongs to slot order_S[s] = n * top_k + k (the
    expert-sorted slot order of dispatch)."""
    slot_S = torch.empty_like(order_S).scatter_(0, order_S, torch.arange(order_S.numel(), device=order_S.device))
    return _SumOverSlots.apply(y_SD, slot_S.view(-1, top_k), order_S // top_k)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts > 0 else None
        )
        self.seq_aux_loss_coef = cfg.seq_aux_loss_coef
        # Tokens routed to each expert since the last bias update (training forwards only).
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        expert_ids_NK, weights_NK, scores_NE = self.gate(x_ND)
        if self.training:
            counts_E = torch.bincount(expert_ids_NK.reshape(-1), minlength=self.n_experts)
            self.tokens_per_expert += counts_E.to(self.tokens_per_expert.dtype)
            if self.seq_aux_loss_coef > 0:
                self.aux_loss = self._seq_aux_loss(expert_ids_NK.view(B, T, -1), scores_NE.view(B, T, -1))
        y_ND = self._routed(x_ND, expert_ids_NK, weights_NK)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        return y_ND.view(B, T, D)

    def _routed(self, x_ND: torch.Tensor, expert_ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        """Weighted sum of each token's routed experts. Expert parallelism replaces this method (only)."""
        # Few token-slots (decode at small batch): gathering the chosen experts' weights beats dispatch, whose
        # cost grows with the number of experts. Gradient-free only: its backward would scatter into [E, F, D].
        # The few-row kernel's experts op reads each chosen expert once for all its tokens, in one call: it takes
        # any inference forward up to a few hundred tokens (a prefill), where dispatch pays per-call costs per expert.
        if not torch.is_grad_enabled() and (2 * expert_ids_NK.numel() < self.n_experts
                                            or self.experts.takes_few_rows_kernel(x_ND, expert_ids_NK)):
            return self.experts.forward_gathered(x_ND, expert_ids_NK, weights_NK)
        return self._dispatched(x_ND, expert_ids_NK, weights_NK)

    def _dispatched(self, x_ND: torch.Tensor, expert_ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        # Sort token-slots by expert, run each expert on its contiguous rows, then sum each token's slots.
        flat_ids = expert_ids_NK.reshape(-1)
        counts_E = torch.bincount(flat_ids, minlength=self.n_experts)
        order = flat_ids.argsort(stable=True)
        token_of_slot = order // self.top_k
        y_sorted_SD = self.experts(x_ND.index_select(0, token_of_slot), counts_E, weights_NK.view(-1, 1)[order])
        return sum_over_slots(y_sorted_SD, order, self.top_k)

    def _seq_aux_loss(self, ids_BTK: torch.Tensor, scores_BTE: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss: coef * sum_e f_e * P_e, averaged over sequences."""
        B, T, K = ids_BTK.shape
        E = self.n_experts
        with torch.no_grad():
            counts_BE = torch.zeros(B, E, device=ids_BTK.device).scatter_add_(
                1, ids_BTK.view(B, -1), torch.ones(B, T * K, device=ids_BTK.device)
            )
            f_BE = counts_BE * E / (K * T)
        p_BE = (scores_BTE / scores_BTE.sum(dim=-1, keepdim=True)).mean(dim=1)
        return self.seq_aux_loss_coef * (f_BE * p_BE).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, rate: float) -> torch.Tensor:
        """Aux-loss-free balancing step: bias += rate * sign(mean load - load), mean-centred (torchtitan).
        Returns the load counts used. Call after the optimizer step; under data/expert parallelism
        all-reduce `tokens_per_expert` first so every rank applies the same update."""
        counts_E = self.tokens_per_expert.clone()
        if counts_E.sum() > 0:
            delta_E = rate * torch.sign(counts_E.mean() - counts_E)
            self.gate.e_score_correction_bias += delta_E - delta_E.mean()
        self.tokens_per_expert.zero_()
        return counts_E
