"""`torchrun ... -m openk2 pretrain` end to end on CPU/gloo: FSDP training with rank-0 logging and DCP checkpoints,
resumed with expert parallelism, then on one process, then exported to Hugging Face format."""

from __future__ import annotations

import os
import subprocess
import sys

from openk2.model import load_hf
from openk2.train.checkpoint import checkpoint_dirs
from openk2.train.metrics import read_metrics
from tests.parallel._harness import free_port

TINY = ["model.preset='tiny'", "data.world_people=60", "data.vocab_size=700", "train.batch_size=2",
        "train.seq_len=64", "train.checkpoint_every=2", "train.eval_every=2", "train.eval_batches=2",
        "train.warmup_steps=2", "run.progress=false", "run.tensorboard=false"]


def _pretrain(tmp_path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    sets = [a for o in [*TINY, f"run.dir='{tmp_path / 'run'}'", f"data.cache_dir='{tmp_path / 'cache'}'",
                        *overrides] for a in ("--set", o)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "openk2", "pretrain", *sets]
    else:
        cmd = [sys.executable, "-m", "openk2", "pretrain", *sets]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_pretrain_resume_with_other_layouts_and_export(tmp_path):
    out = _pretrain(tmp_path, 2, "train.max_steps=4")
    assert "2 ranks: pp=1 dp_replicate=1 dp_shard=2 ep=1" in out.stdout
    run = tmp_path / "run"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone logs
    assert rows[-1]["tokens"] == 4 * 2 * 2 * 64  # steps x ranks x batch x seq
    assert "val_loss" in rows[1] and rows[-1]["loss"] < rows[0]["loss"]
    assert [p.name for p in checkpoint_dirs(run)] == ["step_000000002", "step_000000004"]
    assert all((p / "dcp.json").is_file() for p in checkpoint_dirs(run))

    out = _pretrain(tmp_path, 2, "train.max_steps=6", "parallel.ep=2")  # dp=2 -> ep=2
    assert "resumed from" in out.stdout and "at step 4" in out.stdout
    out = _pretrain(tmp_path, 1, "train.max_steps=8")  # 2 ranks -> 1 process, no torchrun
    assert "at step 6" in out.stdout
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 9))

    hf = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "openk2", "export-hf", str(run), str(hf)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_hf(hf).config.n_routed_experts == 8
