import os
import subprocess
import sys

import pytest
import torch

from openk2.parallel.dist_checkpoint import read_extra
from openk2.train.checkpoint import checkpoint_dirs, latest_checkpoint, load_model_from_run
from openk2.train.config import TrainConfigError, load_config
from openk2.train.metrics import read_metrics
from openk2.train.trainer import Trainer

TINY = ["model.preset='tiny'", "data.world_people=60", "data.vocab_size=700", "train.batch_size=2",
        "train.seq_len=64", "train.max_steps=8", "train.checkpoint_every=4", "train.eval_every=4",
        "train.eval_batches=2", "train.warmup_steps=2", "run.progress=false", "run.tensorboard=false"]


def _cfg(tmp_path, name, *extra):
    return load_config(None, [*TINY, f"run.dir='{tmp_path / name}'", f"data.cache_dir='{tmp_path / 'cache'}'",
                              *extra])


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def test_train_logs_checkpoints_and_keeps_last(tmp_path):
    cfg = _cfg(tmp_path, "a", "train.keep_last=1")
    last = Trainer(cfg).train()
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("step", "loss", "lr", "tokens", "max_logit", "clipped_heads"):
        assert key in rows[0]
    assert "val_loss" in rows[3] and "val_bpb" in rows[7]
    assert rows[-1]["tokens"] == 8 * 2 * 64
    assert last["loss"] < rows[0]["loss"]
    assert [p.name for p in checkpoint_dirs(tmp_path / "a")] == ["step_000000008"]
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").is_file()


def test_sigkill_then_resume_logs_identical_losses(tmp_path):
    reference = _cfg(tmp_path, "ref")
    Trainer(reference).train()
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "openk2", "pretrain"]
    for o in [*TINY, f"run.dir='{run}'", f"data.cache_dir='{tmp_path / 'cache'}'"]:
        args += ["--set", o]
    env = {**os.environ, "OPENK2_FAULT_KILL_AT_STEP": "6"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really SIGKILLed
    assert latest_checkpoint(run).name == "step_000000004"
    assert max(s for s, _ in _losses(run)) == 6  # steps 5-6 were logged, then lost with the process
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)  # same command resumes
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _losses(run) == _losses(tmp_path / "ref")


def test_resume_refuses_a_different_config(tmp_path):
    Trainer(_cfg(tmp_path, "a", "train.max_steps=4")).train()
    with pytest.raises(TrainConfigError, match="train.lr"):
        Trainer(_cfg(tmp_path, "a", "train.max_steps=8", "train.lr=0.5"))
    t = Trainer(_cfg(tmp_path, "a", "train.max_steps=6", "train.lr=0.5", "run.force=true"))
    assert t.step == 4


def test_tokenizer_larger_than_model_vocab_is_an_error(tmp_path):
    with pytest.raises(TrainConfigError, match="tokenizer has 700 tokens"):
        Trainer(_cfg(tmp_path, "a", "model.overrides.vocab_size=300"))


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    t = Trainer(_cfg(tmp_path, "a", "train.max_steps=4", "train.checkpoint_every=2"))
    t.train_step()
    t.train_step()
    good = t.save()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    t.train_step()
    import torch.distributed.checkpoint.filesystem as fs

    monkeypatch.setattr(fs.FileSystemWriter, "write_data", full_disk)
    with pytest.raises(OSError, match="No space"):
        t.save()
    assert latest_checkpoint(tmp_path / "a") == good
    assert read_extra(good)["step"] == 2
    assert not list((tmp_path / "a" / "checkpoints").glob(".tmp*"))


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    big = Trainer(_cfg(tmp_path, "big", "train.batch_size=4", "train.optimizer='adamw'", "train.grad_clip=0.0"))
    acc = Trainer(_cfg(tmp_path, "acc", "train.batch_size=4", "train.micro_batch_size=2", "train.optimizer='adamw'",
                       "train.grad_clip=0.0"))
    assert acc.plan.grad_accum == 2 and big.plan.grad_accum == 1
    grads = {}
    for name, t in (("big", big), ("acc", acc)):  # capture the gradients the optimizer sees
        t.optimizer.step = lambda name=name, t=t: grads.__setitem__(
            name, [p.grad.clone() for p in t.model.parameters()])
    r1, r2 = big.train_step(), acc.train_step()
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
    for (n, _), g1, g2 in zip(big.model.named_parameters(), grads["big"], grads["acc"], strict=True):
        assert torch.allclose(g1, g2, atol=1e-6, rtol=1e-4), n


def test_start_from_checkpoint_with_new_schedule_and_yarn(tmp_path):
    Trainer(_cfg(tmp_path, "base", "train.max_steps=4")).train()
    yarn = ('{type = "yarn", factor = 2.0, original_max_position_embeddings = 64, beta_fast = 32, beta_slow = 1, '
            'mscale = 1.0, mscale_all_dim = 1.0}')
    t = Trainer(_cfg(tmp_path, "long", "train.seq_len=128", "train.lr=0.001", "train.max_steps=2",
                     f"init.from_checkpoint='{tmp_path / 'base'}'",
                     f"init.rope_scaling={yarn}"))
    base = load_model_from_run(tmp_path / "base").state_dict()
    assert torch.equal(t.model.state_dict()["lm_head.weight"], base["lm_head.weight"])
    assert t.model.config.rope_scaling["factor"] == 2.0
    assert t.step == 0
    t.train()
    assert read_metrics(tmp_path / "long" / "metrics.jsonl")[-1]["tokens"] == 2 * 2 * 128


def test_run_directory_exports_to_hf_with_its_tokenizer(tmp_path):
    from typer.testing import CliRunner

    from openk2.cli import app
    from openk2.model import load_hf
    from openk2.serve.model_dir import load_model_dir

    Trainer(_cfg(tmp_path, "a", "train.max_steps=2", "train.checkpoint_every=2")).train()
    result = CliRunner().invoke(app, ["export-hf", str(tmp_path / "a"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    state = load_model_from_run(tmp_path / "a").state_dict()
    assert torch.equal(load_hf(tmp_path / "hf").state_dict()["lm_head.weight"], state["lm_head.weight"])
    bundle = load_model_dir(tmp_path / "a")  # serving reads run directories directly too
    assert bundle.tokenizer.vocab_size == bundle.model.config.vocab_size == 700
