"""Per-GPU memory of a parallel layout, estimated from the model config (`openk2 plan`).

Everything is analytic (no model is built), so it works for Kimi K2 on a laptop:

* **states**: parameters, gradients and optimizer state of the heaviest pipeline rank, sharded as openk2 shards
  them: dense parameters over `dp_shard` (FSDP), routed experts over `ep x efsdp`, replicated over `dp_replicate`.
  openk2 keeps fp32 master weights, fp32 gradients, Muon momentum (fp32) for matrices and AdamW moments (2 x fp32)
  for embeddings, head and norms; during compute FSDP gathers one or two layers in the compute dtype;
* **activations**: bytes saved per token per layer by autograd, counted op by op from the model's forward (see
  `_layer_activation_elems`), times the tokens of one micro-batch and the micro-batches a pipeline rank holds at
  once: pp for 1F1B on the first stage, pp x (1 + (pp - 1) / (pp x v)) for interleaved 1F1B with v virtual stages
  (Narayanan et al., 2021); the switches remove what they recompute, store FP8 tensors at 1 byte (+ a 4-byte scale
  per 128) and move the rest to host memory.

It also prints K2's own accounting ([K2] §2.4: "BF16 parameters and their FP32 gradient accumulation buffers
take ~6 TB over a 256-GPU model-parallel group"), i.e. (2 + 4) bytes per parameter over the pp x ep ranks that
hold one copy of the model, which `openk2 plan --preset kimi-k2 --gpus 256 --pp 16 --ep 16` checks.
Estimates ignore allocator fragmentation, communication buffers and kernels' workspaces (typically 5-15%).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from openk2.model.config import ModelConfig
from openk2.parallel.layout import ParallelLayout

GB = 1e9


@dataclass
class LayerParams:
    attention: int
    dense_mlp: int
    routed: int
    shared: int
    router: int
    norms: int

    @property
    def total(self) -> int:
        return self.attention + self.dense_mlp + self.routed + self.shared + self.router + self.norms


def layer_params(cfg: ModelConfig, i: int) -> LayerParams:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q = D * H * cfg.qk_head_dim
    else:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    kv = (D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
          + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    attn = q + kv + H * cfg.v_head_dim * D
    expert = 3 * D * cfg.moe_intermediate_size
    if cfg.is_moe_layer(i):
        return LayerParams(attn, 0, cfg.n_routed_experts * expert, cfg.n_shared_experts * expert,
                           cfg.n_routed_experts * D, 2 * D)
    return LayerParams(attn, 3 * D * cfg.intermediate_size, 0, 0, 0, 2 * D)


def _layer_activation_elems(cfg: ModelConfig, i: int, recompute: str, fp8: bool) -> tuple[float, float]:
    """(elements stored in the compute dtype, elements stored in FP8) per token for decoder layer i."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, v = cfg.qk_head_dim, cfg.v_head_dim
    ql = cfg.q_lora_rank or 0
    kvl, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    moe = cfg.is_moe_layer(i)
    K, F = cfg.num_experts_per_tok, cfg.moe_intermediate_size
    S = cfg.n_shared_experts * F
    I_dense = cfg.intermediate_size
    if recompute == "none":
        # Autograd's saved tensors: norm inputs/outputs, projection inputs, attention q/k/v/out, SwiGLU inputs and
        # products, expert inputs.
        attn = D + D + ql + ql + kvl + kvl + 3 * H * qk + H * qk + H * v
        if moe:
            swiglu_in = 2 * K * F + 2 * S  # gate and up of routed and shared experts
            other = D + D + cfg.n_routed_experts + K * F + K * F + S + S + K * D  # norm, router, silu, h, ...
            expert_in = K * D
        else:
            swiglu_in = 2 * I_dense
            other = D + D + 2 * I_dense
            expert_in = 0
        fp8_elems = (swiglu_in + expert_in) if fp8 else 0
        return attn + other + (0 if fp8 else swiglu_in + expert_in), fp8_elems
    # Selective recomputation keeps matmul / attention / collective outputs, recomputes the rest (K2's list).
    attn = D + ql + (kvl + rope) + H * qk + D  # layer input, q_a, kv_a, attention output (padded V), o_proj out
    if moe:
        swiglu_in = 2 * K * F + 2 * S
        other = cfg.n_routed_experts + (0 if recompute == "selective+moe_down" else K * D + D)
    else:
        swiglu_in = 2 * I_dense
        other = D
    return attn + other + (0 if fp8 else swiglu_in), (swiglu_in if fp8 else 0)


@dataclass
class Plan:
    gpus: int
    layout: str
    params_per_gpu: int
    param_gb: float
    grad_gb: float
    optimizer_gb: float
    gathered_gb: float
    activation_gb: float
    activation_host_gb: float
    total_gb: float
    k2_states_tb: float  # bf16 params + fp32 grads of the whole model (K2's accounting)
    k2_states_per_gpu_gb: float  # ... over the pp x ep ranks holding one model copy
    model_parallel_gpus: int  # pp x ep
    microbatches_in_flight: float

    def as_dict(self) -> dict:
        return asdict(self)


def estimate(
    cfg: ModelConfig,
    layout: ParallelLayout,
    *,
    seq_len: int = 4096,
    micro_batch: int = 1,
    compute_bytes: int = 2,
) -> Plan:
    """Memory of the most loaded GPU for `layout` (resolved) training `cfg` on micro-batches of
    `micro_batch` sequences of `seq_len` tokens, activations in a `compute_bytes`-byte dtype."""
    L = cfg.num_hidden_layers
    stages = layout.stage_layers(L) if layout.pp > 1 else [list(range(L))]
    emb = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    n_stages = len(stages)

    def rank_layers(pp_rank: int) -> list[int]:
        ids = layout.stages_of_rank(pp_rank) if layout.pp > 1 else [0]
        return [i for s in ids for i in stages[s]]

    best: tuple[float, int, list[int]] | None = None
    for r in range(layout.pp):
        layers = rank_layers(r)
        dense = sum(layer_params(cfg, i).total - layer_params(cfg, i).routed for i in layers)
        routed = sum(layer_params(cfg, i).routed for i in layers)
        ids = layout.stages_of_rank(r) if layout.pp > 1 else [0]
        if 0 in ids:
            dense += emb
        if n_stages - 1 in ids:
            dense += head + cfg.hidden_size
        per_gpu = dense / layout.dp_shard + routed / (layout.ep * layout.efsdp)
        if best is None or per_gpu > best[0]:
            best = (per_gpu, r, layers)
    assert best is not None
    params_per_gpu, _, layers = best
    # Optimizer: Muon momentum for matrices (everything but embeddings, head and norms), AdamW moments for those.
    adamw_share = (emb + head + sum(layer_params(cfg, i).norms for i in range(L))) / max(
        1, emb + head + sum(layer_params(cfg, i).total for i in range(L)))
    opt_bytes_per_param = 4 * (1 - adamw_share) + 8 * adamw_share
    # FSDP gathers the running layer and prefetches the next one (compute dtype).
    biggest_layer = max(layer_params(cfg, i).total - layer_params(cfg, i).routed
                        + layer_params(cfg, i).routed / layout.ep for i in layers) if layers else 0
    gathered = 2 * biggest_layer * compute_bytes
    # Activations of the micro-batches this rank holds at its peak (first pipeline stage).
    if layout.pp == 1:
        in_flight = 1.0
    elif layout.pp_schedule == "interleaved_1f1b":
        in_flight = layout.pp * (1 + (layout.pp - 1) / (layout.pp * layout.pp_virtual_stages))
    else:
        in_flight = float(layout.pp)
    tokens = seq_len * micro_batch
    elems = [_layer_activation_elems(cfg, i, layout.recompute, layout.fp8_activations) for i in layers]
    per_mb = sum(e * compute_bytes + f8 * (1 + 4 / 128) for e, f8 in elems) * tokens
    act = per_mb * in_flight
    act_host = 0.0
    if layout.offload_activations:
        # All but the layer being recomputed / back-propagated move to host memory.
        act_host = act - per_mb / max(1, len(layers))
        act -= act_host
    total_params = emb + head + cfg.hidden_size + sum(layer_params(cfg, i).total for i in range(L))
    k2_tb = total_params * (2 + 4) / 1e12
    return Plan(
        gpus=layout.world_size,
        layout=layout.describe(),
        params_per_gpu=int(params_per_gpu),
        param_gb=params_per_gpu * 4 / GB,
        grad_gb=params_per_gpu * 4 / GB,
        optimizer_gb=params_per_gpu * opt_bytes_per_param / GB,
        gathered_gb=gathered / GB,
        activation_gb=act / GB,
        activation_host_gb=act_host / GB,
        total_gb=(params_per_gpu * (8 + opt_bytes_per_param) + gathered + act) / GB,
        k2_states_tb=k2_tb,
        k2_states_per_gpu_gb=k2_tb * 1e12 / (layout.pp * layout.ep) / GB,
        model_parallel_gpus=layout.pp * layout.ep,
        microbatches_in_flight=in_flight,
    )


def format_plan(p: Plan) -> str:
    lines = [
        f"layout: {p.layout}",
        f"per GPU (most loaded pipeline rank): {p.params_per_gpu / 1e9:.2f}B parameters",
        f"  parameters (fp32 master shard)   {p.param_gb:8.1f} GB",
        f"  gradients (fp32 shard)           {p.grad_gb:8.1f} GB",
        f"  optimizer (Muon + AdamW, fp32)   {p.optimizer_gb:8.1f} GB",
        f"  gathered layers (FSDP, compute)  {p.gathered_gb:8.1f} GB",
        f"  activations ({p.microbatches_in_flight:.1f} micro-batches) {p.activation_gb:8.1f} GB"
        + (f"  (+{p.activation_host_gb:.1f} GB in host memory)" if p.activation_host_gb else ""),
        f"  total                            {p.total_gb:8.1f} GB",
        f"K2's accounting (bf16 params + fp32 grads): {p.k2_states_tb:.2f} TB for the model, "
        f"{p.k2_states_per_gpu_gb:.1f} GB per GPU over the {p.model_parallel_gpus} GPUs (pp x ep) holding one copy",
    ]
    return "\n".join(lines)


__all__ = ["LayerParams", "Plan", "estimate", "format_plan", "layer_params"]
