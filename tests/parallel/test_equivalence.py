"""Every parallel layout trains like one process: same per-step losses and final weights (1e-5 relative, fp32).

Ranks are spawned with gloo on 127.0.0.1. Each rank trains on its data-parallel slice of the same global batches
the single-process reference sees; the reference is the single-process trainer's step (tests/parallel/_harness).
Layouts of one world size share one spawn to keep the suite inside the CI budget.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.parallel._harness import assert_close_state, batches, reference_run, run_ranks, tiny_config

TAU = 0.02  # low enough that QK-Clip clips heads on every step (tau = 100 would never trigger at this scale)
STEPS, BATCH, SEQ = 3, 4, 32
FP8_LOSS_RTOL = 2e-3  # FP8 (e4m3) storage of activations perturbs gradients, never the forward


def train_layouts(rank: int, world: int, cfg, steps, specs: list[dict]) -> list[dict]:
    from openk2.model import build_model
    from openk2.parallel.dist_checkpoint import full_state_dict
    from openk2.parallel.layout import ParallelLayout
    from openk2.parallel.optim import DistributedMuonClip
    from openk2.parallel.parallelize import ParallelDims, parallelize
    from openk2.parallel.step import train_step

    out = []
    for spec in specs:
        layout = ParallelLayout(**spec["layout"]).resolve(world)
        dims = ParallelDims.build(layout, torch.device("cpu"))
        pm = parallelize(build_model(cfg, seed=0), dims)
        if spec.get("optimizer") == "adamw":
            opt = torch.optim.AdamW(pm.model.parameters(), lr=2e-2, weight_decay=0.1, betas=(0.9, 0.95))
        else:
            opt = DistributedMuonClip(pm.model, lr=2e-2, weight_decay=0.1, momentum=0.95, qk_clip_tau=TAU,
                                      dp_group=dims.dp_group)
        dp, r = layout.dp, dims.dp_rank
        losses, clipped = [], 0
        for x, y in steps:
            b = x.shape[0] // dp
            losses.append(train_step(pm, opt, [(x[r * b:(r + 1) * b], y[r * b:(r + 1) * b])], grad_clip=1.0)["loss"])
            clipped += getattr(opt, "last_stats", {}).get("clipped_heads", 0)
        out.append({"losses": losses, "state": full_state_dict(pm.model, dims), "clipped": clipped})
    return out


@functools.cache
def _setup():
    cfg = tiny_config()
    steps = batches(cfg, STEPS, BATCH, SEQ)
    return cfg, steps


@functools.cache
def _reference(optimizer: str = "muonclip", accum: int = 1):
    cfg, steps = _setup()
    return reference_run(cfg, steps, optimizer=optimizer, qk_clip_tau=TAU, accum=accum)


def _check(result: dict, optimizer: str = "muonclip", accum: int = 2) -> None:
    """Against the single-process run of the same global batches, accumulated over the same micro-batches
    (2: the two data shards, or the two pipeline micro-batches, of every layout here)."""
    ref_losses, ref_state = _reference(optimizer, accum)
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    assert_close_state(result["state"], ref_state, rtol=1e-5)


WORLD2 = {
    "fsdp": dict(layout=dict()),
    "hsdp_adamw": dict(layout=dict(dp_replicate=2), optimizer="adamw"),
    "ep": dict(layout=dict(ep=2)),
    "pp_1f1b": dict(layout=dict(pp=2)),
    "pp_interleaved": dict(layout=dict(pp=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=2, microbatches=2)),
    "ep_recompute": dict(layout=dict(ep=2, recompute="selective+moe_down")),
    "ep_recompute_fp8": dict(layout=dict(ep=2, recompute="selective", fp8_activations=True)),
}


@pytest.fixture(scope="module")
def world2():
    cfg, steps = _setup()
    results = run_ranks(train_layouts, 2, cfg, steps, list(WORLD2.values()))
    return {name: [r[i] for r in results] for i, name in enumerate(WORLD2)}


@pytest.mark.parametrize("name", ["fsdp", "ep", "pp_1f1b", "pp_interleaved", "ep_recompute"])
def test_two_rank_layout_equals_single_process(world2, name):
    for rank_result in world2[name]:
        _check(rank_result)
    assert world2[name][0]["clipped"] > 0  # QK-Clip acted on sharded q_b_proj / kv_b_proj rows


def test_hsdp_with_adamw_equals_single_process(world2):
    for rank_result in world2["hsdp_adamw"]:
        _check(rank_result, optimizer="adamw")


def test_expert_parallel_fp8_storage_stays_within_tolerance(world2):
    ref_losses, _ = _reference(accum=2)
    for rank_result in world2["ep_recompute_fp8"]:
        losses = torch.tensor(rank_result["losses"])
        torch.testing.assert_close(losses, torch.tensor(ref_losses), rtol=FP8_LOSS_RTOL, atol=0)
        assert losses[0] == ref_losses[0]  # the forward never sees FP8 values
        assert not torch.equal(losses, torch.tensor(ref_losses))  # ...but the gradients do


def test_composed_pp_fsdp_ep_on_four_ranks_equals_single_process():
    cfg, steps = _setup()
    spec = dict(layout=dict(pp=2, ep=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=2, microbatches=2))
    results = run_ranks(train_layouts, 4, cfg, steps, [spec])
    for r in results:
        _check(r[0], accum=4)  # 2 data shards x 2 pipeline micro-batches
