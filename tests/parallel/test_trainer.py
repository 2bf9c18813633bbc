"""`openk2 pretrain` on every parallel layout, through the CLI as a user runs it (torchrun, gloo on CPU): the same
config logs the same training and validation losses as one process, writes DCP checkpoints, and a run killed on
one layout resumes on another and continues the same samples."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openk2.model import load_hf
from openk2.train.checkpoint import checkpoint_dirs
from openk2.train.config import TrainConfigError, load_config
from openk2.train.metrics import read_metrics
from tests.parallel._harness import free_port

STEPS, BATCH, SEQ = 6, 4, 32
TINY = ["model.preset='tiny'", "model.overrides.num_hidden_layers=4", "data.world_people=60", "data.vocab_size=700",
        f"train.batch_size={BATCH}", f"train.seq_len={SEQ}", f"train.max_steps={STEPS}", "train.checkpoint_every=3",
        "train.eval_every=3", "train.eval_batches=2", "train.warmup_steps=2", "run.progress=false",
        "run.tensorboard=false"]
INTERLEAVED = ["parallel.pp=2", "parallel.pp_schedule='interleaved_1f1b'", "parallel.pp_virtual_stages=2",
               "parallel.microbatches=2"]
# AdamW at an AdamW learning rate: at Muon's 2e-2 its first sign-like updates amplified a last-bit gradient difference
# (another summation order across ranks) ~1000x in 6 steps (1e-7 -> 1.2e-4 relative), at 3e-3 it stays at ~1e-7.
ADAMW = ["train.optimizer='adamw'", "train.lr=3e-3"]
# The layouts of tests/parallel/test_equivalence.py, as configs: (ranks, overrides).
LAYOUTS = {
    "micro_batches": (1, ["train.micro_batch_size=1"]),
    "fsdp": (2, []),
    "hsdp_adamw": (2, ["parallel.dp_replicate=2", *ADAMW]),
    "ep": (2, ["parallel.ep=2"]),
    "pp_1f1b": (2, ["parallel.pp=2"]),
    "pp_interleaved": (2, INTERLEAVED),
    "ep_recompute": (2, ["parallel.ep=2", "parallel.recompute='selective+moe_down'"]),
    "ep_recompute_fp8": (2, ["parallel.ep=2", "parallel.recompute='selective'", "parallel.fp8_activations=true"]),
    "pp_ep_fsdp": (4, [*INTERLEAVED, "parallel.ep=2"]),
}
FP8_RTOL = 2e-3  # FP8 storage of activations perturbs the gradients (never the forward)


def _pretrain(root: Path, name: str, nproc: int, *overrides: str, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    sets = [a for o in [*TINY, f"run.dir='{root / name}'", f"data.cache_dir='{root / 'cache'}'", *overrides]
            for a in ("--set", o)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "openk2", "pretrain", *sets]
    else:
        cmd = [sys.executable, "-m", "openk2", "pretrain", *sets]
    # One thread per rank and for the reference: matmul blocking then matches across runs.
    full_env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=full_env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _curves(run: Path) -> tuple[list[float], list[float]]:
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # rank 0 alone logs
    return [r["loss"] for r in rows], [r["val_loss"] for r in rows if "val_loss" in r]


@functools.cache
def _reference(root: Path) -> tuple[list[float], list[float]]:
    _pretrain(root, "reference", 1)
    return _curves(root / "reference")


def _rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("layouts")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_trains_validates_and_checkpoints_like_one_process(root, name):
    ref_losses, ref_val = _reference(root)
    nproc, overrides = LAYOUTS[name]
    if "adamw" in name:  # its own single-process reference: same optimizer, one process
        _pretrain(root, "reference_adamw", 1, *ADAMW)
        ref_losses, ref_val = _curves(root / "reference_adamw")
    out = _pretrain(root, name, nproc, *overrides)
    assert f"global batch {BATCH} =" in out.stdout
    losses, val = _curves(root / name)
    rtol = FP8_RTOL if "fp8" in name else 1e-5
    assert _rel(losses, ref_losses) <= rtol, (losses, ref_losses)
    assert _rel(val, ref_val) <= rtol, (val, ref_val)
    assert len(val) == 2  # validated at steps 3 and 6
    ckpts = checkpoint_dirs(root / name)
    assert [p.name for p in ckpts] == ["step_000000003", "step_000000006"]
    assert all((p / "dcp.json").is_file() for p in ckpts)
    assert read_metrics(root / name / "metrics.jsonl")[-1]["tokens"] == STEPS * BATCH * SEQ


def test_a_run_killed_on_one_layout_resumes_on_another_with_the_same_samples(root):
    ref_losses, ref_val = _reference(root)
    run = root / "moved"
    killed = _pretrain(root, "moved", 2, "parallel.pp=2", env={"OPENK2_FAULT_KILL_AT_STEP": "4"}, check=False)
    assert killed.returncode != 0
    assert [p.name for p in checkpoint_dirs(run)] == ["step_000000003"]
    out = _pretrain(root, "moved", 2, "parallel.ep=2")  # pp=2 -> dp_shard=2 with expert parallelism
    assert "resumed from" in out.stdout and "at step 3" in out.stdout
    losses, val = _curves(run)
    assert _rel(losses, ref_losses) <= 1e-5 and _rel(val, ref_val) <= 1e-5

    out = _pretrain(root, "moved", 1, "train.max_steps=8", "train.micro_batch_size=2")  # 2 ranks -> 1 process
    assert "at step 6" in out.stdout
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 9))
    hf = root / "hf"
    proc = subprocess.run([sys.executable, "-m", "openk2", "export-hf", str(run), str(hf)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_hf(hf).config.n_routed_experts == 8


def test_an_impossible_batch_split_names_the_keys(tmp_path, monkeypatch):
    from openk2.train.trainer import Trainer

    base = [*TINY, f"run.dir='{tmp_path / 'run'}'"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainConfigError, match=r"train.batch_size=3 .* not divisible by the 2 data-parallel ranks"):
        Trainer(load_config(None, [*base, "train.batch_size=3"]))
    with pytest.raises(TrainConfigError, match=r"2 ranks x train.micro_batch_size=3 does not divide it"):
        Trainer(load_config(None, [*base, "train.batch_size=8", "train.micro_batch_size=3"]))
    with pytest.raises(TrainConfigError, match=r"train.micro_batch_size=1 sequences must split into "
                                               r"parallel.microbatches=2"):
        Trainer(load_config(None, [*base, "parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch_size=1"]))
    assert not (tmp_path / "run").exists()  # failed before touching the run directory or the data
    monkeypatch.delenv("WORLD_SIZE")
    proc = subprocess.run([sys.executable, "-m", "openk2", "pretrain", "--set", "train.grad_accum=2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "train.grad_accum was removed" in proc.stderr + proc.stdout
