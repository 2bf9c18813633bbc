"""Muon math: batched Newton–Schulz orthogonalization and the Muon parameter update.

The update follows `torch.optim.Muon` (and Moonlight, `k2-recipe.md` §1.2) matrix by matrix:

    B <- lerp(B, G, 1 - mu)              # momentum as an EMA, like torch.optim.Muon
    U <- lerp(G, B, mu) if nesterov else B
    O <- NS5(U)                          # quintic Newton–Schulz, (a, b, c) = (3.4445, -4.7750, 2.0315)
    W <- W * (1 - lr * wd)               # decoupled decay with the *unadjusted* lr
    W <- W - lr * ratio(A, B) * O        # "match_rms_adamw": 0.2 sqrt(max(A, B)); "original": sqrt(max(1, A/B))

Moonlight writes the momentum as a sum (M = mu M + G) rather than an EMA; the two differ by the constant factor
(1 - mu), which NS's Frobenius normalization removes (up to `eps`).

What differs from torch.optim.Muon is the schedule, not the math: instead of a Python loop over parameters, all
matrices of one (oriented) shape — every attention projection of that shape, every 3-D expert stack `[E, A, B]`
seen as E matrices — are stacked and orthogonalized by one batched NS, and the momentum / decay / update are
`torch._foreach_*` calls over the whole group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
ADJUST_LR_MODES = ("match_rms_adamw", "original")
# Cap on one stacked NS batch (elements), so a huge model never materializes every expert at once.
DEFAULT_MAX_BATCH_ELEMS = 1 << 27


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where tensor cores make it fast (CUDA), fp32 elsewhere: CPUs without AVX512-BF16/AMX run bf16
    matmuls ~100x slower than fp32 (1.2 vs 136 GFLOP/s measured on the 2-core AMD EPYC dev box)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def zeropower_via_newtonschulz(
    G: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Approximate U V^T of each matrix in G ([..., A, B]; any leading batch dims) by quintic Newton–Schulz.

    Same steps as torch.optim.Muon's `_zeropower_via_newtonschulz` (transpose tall matrices, divide by the
    Frobenius norm clamped at eps, X <- aX + (bA + cA^2)X with A = XX^T), batched over leading dims. Returns a
    tensor of `dtype` (default: `default_ns_dtype(G.device)`) and G's shape. G is not modified.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs matrices, got shape {tuple(G.shape)}")
    if steps >= 100:
        raise ValueError("ns_steps must be < 100")
    a, b, c = coefficients
    dtype = default_ns_dtype(G.device) if dtype is None else dtype
    squeeze = G.ndim == 2
    X_NMK = G.to(dtype).reshape(-1, *G.shape[-2:])
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X_NMK = X_NMK.mT
    X_NMK = X_NMK / X_NMK.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    # CPU baddbmm with beta != 1 is ~1.5x slower than bmm + add_ in fp32 (measured); in bf16 keep torch's fused
    # form, whose single rounding makes the result bitwise equal to torch.optim.Muon's.
    split_add = X_NMK.device.type == "cpu" and dtype == torch.float32
    for _ in range(steps):
        A_NMM = X_NMK @ X_NMK.mT
        B_NMM = torch.baddbmm(A_NMM, A_NMM, A_NMM, beta=b, alpha=c)
        if split_add:
            X_NMK = torch.bmm(B_NMM, X_NMK).add_(X_NMK, alpha=a)
        else:
            X_NMK = torch.baddbmm(X_NMK, B_NMM, X_NMK, beta=a)
    if tall:
        X_NMK = X_NMK.mT
    return X_NMK[0] if squeeze else X_NMK.reshape(G.shape)


def adjusted_lr_ratio(A: int, B: int, mode: str) -> float:
    """Per-matrix lr multiplier for an A x B update (torch.optim.Muon's `_adjust_lr`, same float arithmetic)."""
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    if mode == "original":
        return math.sqrt(max(1, A / B))
    raise ValueError(f"adjust_lr must be one of {ADJUST_LR_MODES}, got {mode!r}")


@dataclass
class _Bucket:
    """Indices (into the step's parameter list) of same-shape matrices orthogonalized in one batched NS."""

    indices: list[int]
    transposed: list[bool]  # stored as B x A (tall) and transposed to A x B (wide) for the stack
    counts: list[int]  # matrices per parameter: 1 for 2-D, E for a 3-D expert stack


def plan_buckets(shapes: Sequence[torch.Size], max_batch_elems: int = DEFAULT_MAX_BATCH_ELEMS) -> list[_Bucket]:
    """Group parameters by oriented matrix shape (min, max); a tall A x B joins the wide B x A bucket transposed.
    Buckets are split so that no stack exceeds `max_batch_elems` (a single parameter may exceed it alone)."""
    by_key: dict[tuple[int, int], _Bucket] = {}
    buckets: list[_Bucket] = []
    sizes: dict[int, int] = {}
    for i, shape in enumerate(shapes):
        if len(shape) not in (2, 3):
            raise ValueError(f"Muon updates 2-D matrices or 3-D stacks of matrices, got shape {tuple(shape)}")
        A, B = shape[-2], shape[-1]
        n = 1 if len(shape) == 2 else shape[0]
        key = (min(A, B), max(A, B))
        bucket = by_key.get(key)
        if bucket is not None and sizes[id(bucket)] + n * A * B > max_batch_elems:
            bucket = None
        if bucket is None:
            bucket = _Bucket([], [], [])
            by_key[key] = bucket
            buckets.append(bucket)
            sizes[id(bucket)] = 0
        bucket.indices.append(i)
        bucket.transposed.append(A > B)
        bucket.counts.append(n)
        sizes[id(bucket)] += n * A * B
    return buckets


def batched_orthogonalize(
    updates: Sequence[Tensor],
    buckets: Sequence[_Bucket],
    steps: int,
    coefficients: tuple[float, float, float],
    eps: float,
    dtype: torch.dtype | None,
) -> list[Tensor]:
    """NS of every update, one batched NS per bucket; returns views shaped like the inputs (in NS dtype)."""
    out: list[Tensor | None] = [None] * len(updates)
    for bucket in buckets:
        mats = []
        for i, tr in zip(bucket.indices, bucket.transposed, strict=True):
            u = updates[i] if updates[i].ndim == 3 else updates[i].unsqueeze(0)
            mats.append(u.mT if tr else u)
        stack_NMK = mats[0] if len(mats) == 1 else torch.cat(mats)
        O_NMK = zeropower_via_newtonschulz(stack_NMK, steps, coefficients, eps, dtype)
        start = 0
        for i, tr, n in zip(bucket.indices, bucket.transposed, bucket.counts, strict=True):
            o = O_NMK[start : start + n]
            start += n
            o = o.mT if tr else o
            out[i] = o if updates[i].ndim == 3 else o[0]
    return out  # type: ignore[return-value]


def muon_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_bufs: Sequence[Tensor],
    buckets: Sequence[_Bucket],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    ns_coefficients: tuple[float, float, float],
    ns_eps: float,
    ns_dtype: torch.dtype | None,
    adjust_lr: str,
) -> None:
    """One Muon step for `params` in place (`buckets` from `plan_buckets` over their shapes)."""
    if not params:
        return
    torch._foreach_lerp_(momentum_bufs, grads, 1 - momentum)
    updates = torch._foreach_lerp(grads, momentum_bufs, momentum) if nesterov else list(momentum_bufs)
    ortho = batched_orthogonalize(updates, buckets, ns_steps, ns_coefficients, ns_eps, ns_dtype)
    decay = 1 - lr * weight_decay
    if decay != 1.0:  # multiplying by exactly 1 is a no-op; skipping it saves a pass over the weights
        torch._foreach_mul_(list(params), decay)
    # One foreach add per distinct adjusted lr (at most two per matrix shape).
    by_alpha: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    for p, o in zip(params, ortho, strict=True):
        alpha = -(lr * adjusted_lr_ratio(p.shape[-2], p.shape[-1], adjust_lr))
        ps, os_ = by_alpha.setdefault(alpha, ([], []))
        ps.append(p)
        os_.append(o)
    for alpha, (ps, os_) in by_alpha.items():
        torch._foreach_add_(ps, os_, alpha=alpha)
