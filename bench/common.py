"""Shared helpers for the benchmarks: benchmark configs, timers, the fp32 matmul peak, flops per token."""

from __future__ import annotations

import platform
import subprocess
import time
from collections.abc import Callable

import torch

from openk2.model import ModelConfig, count_params, get_preset, matmul

# The model benchmark's configs (issue: vocab 8192, hidden 256, 4 layers, first dense with FFN 768, 4 heads,
# q_lora 128, kv_lora 64, nope 32, rope 16, v 32, 1 shared expert, n_group 1, untied embeddings).
_BASE = dict(
    vocab_size=8192, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=768,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_shared_experts=1, n_group=1, topk_group=1, tie_word_embeddings=False,
)
CONFIGS: dict[str, dict] = {
    "A": dict(_BASE, n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=128),
    "B": dict(_BASE, n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=64),
}
# The bandwidth-bound config: its active fp32 weights per decode token (178 MiB) are 5.6x the 32 MiB
# last-level cache of the bench machine (config A's 15.6 MiB fit in it), so decode is bound by memory
# bandwidth, not per-token overhead. Only `bench/inference.py` runs it.
CONFIGS["C"] = dict(
    _BASE, vocab_size=16384, hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=8,
    q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=512,
)
BATCH, SEQ = 8, 256


def bench_config(name: str) -> ModelConfig:
    return get_preset("nano", **CONFIGS[name])


def timeit(fn: Callable[[], object], warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_peak_flops(n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """Achievable dense matmul FLOP/s on this machine (the MFU denominator), measured now: the faster of aten's
    product and, for fp32 on CPU, oneDNN's (`openk2.model.matmul`, which the model's products use; on the AMD
    bench host it runs at ~2x the MKL of torch's CPU wheel, so aten's alone would overstate MFU)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = timeit(lambda: a @ b, warmup=3, iters=10)
    if matmul.ENABLED and dtype == torch.float32 and a.device.type == "cpu":
        best = min(best, timeit(lambda: matmul.product(a, b), warmup=3, iters=10))
    return 2 * n**3 / best


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x activated matmul params (embedding lookup excluded) + attention scores/values (PaLM convention,
    full T x T): 6 * L * H * (qk_head_dim + v_head_dim) * T, as fwd 2 + bwd 4."""
    c = count_params(cfg)
    matmul_params = c.activated - c.embedding
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return 6 * matmul_params + attn


def machine_info() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    return (f"commit {commit}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}")
