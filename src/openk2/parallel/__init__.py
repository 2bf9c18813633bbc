"""Scale-out on PyTorch's own distributed stack, applied from outside the model (torchtitan's `parallelize`).

* `layout`: the `[parallel]` config (pp x dp_replicate x dp_shard ranks, ep borrowed from dp_shard) and its checks.
* `parallelize`: device meshes and the one call that turns a `K2Model` into this rank's parallel model.
* `fsdp`, `expert_parallel`, `pipeline`: FSDP2, all-to-all expert parallelism, `torch.distributed.pipelining`.
* `optim`: MuonClip on sharded parameters (Moonlight's gather-orthogonalize-slice; QK-Clip on local rows).
* `activation`: selective recomputation, FP8 activation storage, activation offload.
* `dist_checkpoint`: `torch.distributed.checkpoint` save/resume across layouts, HF export.
* `plan`: the per-GPU memory estimator behind `openk2 plan`.

Only `layout` is imported here, so configs validate without touching `torch.distributed`.
"""

from openk2.parallel.layout import LayoutError, ParallelLayout

__all__ = ["LayoutError", "ParallelLayout"]
