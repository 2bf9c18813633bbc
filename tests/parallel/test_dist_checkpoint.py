"""Distributed checkpoints: save under one layout, resume under another, export to Hugging Face format."""

from __future__ import annotations

import functools

import torch

from openk2.model import build_model, load_hf, save_hf
from openk2.optim import MuonClip
from openk2.parallel import dist_checkpoint
from tests.parallel._harness import assert_close_state, batches, reference_run, run_ranks, tiny_config

TAU = 0.02
LAYOUTS = {"dp": dict(), "pp": dict(pp=2, microbatches=2)}


@functools.cache
def _data():
    cfg = tiny_config()
    return cfg, batches(cfg, 3, 4, 32)


def _make(rank_layout: dict, world: int, cfg):
    from openk2.parallel.layout import ParallelLayout
    from openk2.parallel.optim import DistributedMuonClip
    from openk2.parallel.parallelize import ParallelDims, parallelize

    layout = ParallelLayout(**rank_layout).resolve(world)
    dims = ParallelDims.build(layout, torch.device("cpu"))
    pm = parallelize(build_model(cfg, seed=0), dims)
    opt = DistributedMuonClip(pm.model, lr=2e-2, weight_decay=0.1, momentum=0.95, qk_clip_tau=TAU,
                              dp_group=dims.dp_group)
    return layout, dims, pm, opt


def _steps(layout, dims, pm, opt, steps) -> list[float]:
    from openk2.parallel.step import train_step

    dp, r = layout.dp, dims.dp_rank
    out = []
    for x, y in steps:
        b = x.shape[0] // dp
        out.append(train_step(pm, opt, [(x[r * b:(r + 1) * b], y[r * b:(r + 1) * b])], grad_clip=1.0)["loss"])
    return out


def save_after_two_steps(rank: int, world: int, cfg, steps, root: str) -> None:
    for name, spec in LAYOUTS.items():
        layout, dims, pm, opt = _make(spec, world, cfg)
        _steps(layout, dims, pm, opt, steps[:2])
        dist_checkpoint.save(f"{root}/{name}", 2, pm.model, opt,
                             {"step": 2, "tokens": 0, "model_config": cfg.to_hf_dict()})


def resume_with_ep(rank: int, world: int, cfg, steps, ckpt: str) -> dict:
    from openk2.parallel.dist_checkpoint import full_state_dict

    layout, dims, pm, opt = _make(dict(ep=2), world, cfg)
    extra = dist_checkpoint.load(ckpt, pm.model, opt)
    losses = _steps(layout, dims, pm, opt, steps[2:])
    return {"step": extra["step"], "losses": losses, "state": full_state_dict(pm.model, dims)}


def test_save_on_two_ranks_resume_on_one_rank_and_on_expert_parallel_ranks_and_export_hf(tmp_path):
    cfg, steps = _data()
    run_ranks(save_after_two_steps, 2, cfg, steps, str(tmp_path))
    ckpts = {name: dist_checkpoint.latest(tmp_path / name) for name in LAYOUTS}
    assert all(dist_checkpoint.is_dcp_checkpoint(c) for c in ckpts.values())
    # Both layouts accumulate the global batch as 2 partial sums (data shards / pipeline micro-batches).
    ref_losses, ref_state = reference_run(cfg, steps, qk_clip_tau=TAU, accum=2)
    _, ref_state_2 = reference_run(cfg, steps[:2], qk_clip_tau=TAU, accum=2)

    # 2 ranks (dp=2, or pp=2) -> 1 rank, no process group: weights, Muon momentum, AdamW moments, step counters.
    for name, ckpt in ckpts.items():
        torch.manual_seed(0)
        model = build_model(cfg, seed=0).train()
        opt = MuonClip(model, lr=2e-2, weight_decay=0.1, momentum=0.95, qk_clip_tau=TAU)
        extra = dist_checkpoint.load(ckpt, model, opt)
        assert extra["step"] == 2 and opt.steps == 2, name
        assert_close_state({k: v.detach() for k, v in model.state_dict().items()}, ref_state_2)
        x, y = steps[2]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the reference and the spawned ranks
        try:
            for x_mb, y_mb in zip(x.chunk(2), y.chunk(2), strict=True):
                (model(x_mb, labels=y_mb, reduction="sum", return_logits=False).loss / y.numel()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        finally:
            torch.set_num_threads(threads)
        assert_close_state({k: v.detach() for k, v in model.state_dict().items()}, ref_state)

    # dp=2 -> ep=2 (experts now split over the two ranks).
    results = run_ranks(resume_with_ep, 2, cfg, steps, str(ckpts["dp"]))
    for r in results:
        assert r["step"] == 2
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses[2:]), rtol=1e-5, atol=0)
        assert_close_state(r["state"], ref_state)

    # Hugging Face export from the distributed checkpoint (what `openk2 export-hf <run> <dir>` does).
    full = dist_checkpoint.load_full_model(ckpts["pp"])
    assert_close_state({k: v.detach() for k, v in full.state_dict().items()}, ref_state_2)
    hf = load_hf(save_hf(full, tmp_path / "hf"))
    x, _ = steps[0]
    torch.testing.assert_close(hf(x).logits, full(x).logits)
