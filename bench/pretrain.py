"""Pretraining throughput: the full trainer (data loader, logging, validation, checkpoints) against the raw
model step (fwd + bwd + MuonClip on random tokens) at the same shapes. Target: within 15%.

    .venv/bin/python bench/pretrain.py [--steps 60] [--run-dir /tmp/openk2-bench-pretrain]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from openk2.model import build_model
from openk2.optim import MuonClip
from openk2.train.config import load_config
from openk2.train.data_setup import prepare_data
from openk2.train.metrics import read_metrics
from openk2.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info  # noqa: E402


def raw_tok_per_s(trainer: Trainer, steps: int) -> float:
    """The same model config, optimizer and shapes, without the data path, logging or checkpoints."""
    t = trainer.cfg.train
    model = build_model(trainer.model_config, seed=1)
    opt = MuonClip(model, lr=t.lr, weight_decay=t.weight_decay, qk_clip_tau=t.qk_clip_tau)
    V = trainer.model_config.vocab_size
    x, y = torch.randint(0, V, (t.batch_size, t.seq_len)), torch.randint(0, V, (t.batch_size, t.seq_len))

    def step() -> None:
        loss = model(x, labels=y, reduction="sum", return_logits=False).loss / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * x.numel() / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--run-dir", default="/tmp/openk2-bench-pretrain")
    args = ap.parse_args()
    shutil.rmtree(args.run_dir, ignore_errors=True)
    # The speedrun's settings, with its eval/checkpoint cadence scaled to the shorter run.
    cfg = load_config("recipes/nano.toml", [f"run.dir='{args.run_dir}/run'", f"train.max_steps={args.steps}",
                                            f"train.eval_every={args.steps // 2}",
                                            f"train.checkpoint_every={args.steps // 2}", "run.progress=false"])
    trainer = Trainer(cfg, prepare_data(cfg))
    trainer.train()
    rows = read_metrics(Path(cfg.run.dir) / "metrics.jsonl")
    trainer_tps = rows[-1]["tok_per_s"]
    raw = raw_tok_per_s(trainer, args.steps)
    print(f"# {machine_info()}")
    print(f"| path | tokens/s |\n|---|---:|\n| raw model step | {raw:.0f} |\n| trainer (speedrun settings) | "
          f"{trainer_tps:.0f} |\n| trainer / raw | {trainer_tps / raw:.2f} |")


if __name__ == "__main__":
    main()
