"""Pretraining throughput: the full trainer (data loader, logging, validation, checkpoints) against the raw
model step (fwd + bwd + MuonClip on random tokens) at the same shapes. Target: within 15%.

    .venv/bin/python bench/pretrain.py [--steps 60] [--run-dir /tmp/openk2-bench-pretrain] [--set train.batch_size=8]
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


def raw_step(trainer: Trainer, steps: int) -> dict[str, float]:
    """The same model config, optimizer and shapes, without the data path, logging or checkpoints: tokens/s and
    the mean milliseconds of forward, backward and optimizer step (clip + MuonClip)."""
    t = trainer.cfg.train
    model = build_model(trainer.model_config, seed=1)
    opt = MuonClip(model, lr=t.lr, weight_decay=t.weight_decay, qk_clip_tau=t.qk_clip_tau)
    V = trainer.model_config.vocab_size
    x, y = torch.randint(0, V, (t.batch_size, t.seq_len)), torch.randint(0, V, (t.batch_size, t.seq_len))
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def step() -> None:
        t0 = time.perf_counter()
        loss = model(x, labels=y, reduction="sum", return_logits=False).loss / y.numel()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            phases[k] += dt

    for _ in range(3):
        step()
    phases.update(dict.fromkeys(phases, 0.0))
    for _ in range(steps):
        step()
    total = sum(phases.values())
    return {"tok_per_s": steps * x.numel() / total, **{f"{k}_ms": 1e3 * v / steps for k, v in phases.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--run-dir", default="/tmp/openk2-bench-pretrain")
    ap.add_argument("--set", action="append", default=[], help="Config override, e.g. train.batch_size=8.")
    args = ap.parse_args()
    shutil.rmtree(args.run_dir, ignore_errors=True)
    # The speedrun's settings, with its eval/checkpoint cadence scaled to the shorter run.
    cfg = load_config("recipes/nano.toml", [f"run.dir='{args.run_dir}/run'", f"train.max_steps={args.steps}",
                                            f"train.eval_every={args.steps // 2}",
                                            f"train.checkpoint_every={args.steps // 2}", "run.progress=false",
                                            *args.set])
    trainer = Trainer(cfg, prepare_data(cfg))
    trainer.train()
    rows = read_metrics(Path(cfg.run.dir) / "metrics.jsonl")
    trainer_tps = rows[-1]["tok_per_s"]
    raw = raw_step(trainer, args.steps)
    print(f"# {machine_info()}; batch {cfg.train.batch_size} x {cfg.train.seq_len}")
    print(f"| path | tokens/s |\n|---|---:|\n| raw model step | {raw['tok_per_s']:.0f} |\n"
          f"| trainer (speedrun settings) | {trainer_tps:.0f} |\n"
          f"| trainer / raw | {trainer_tps / raw['tok_per_s']:.2f} |")
    print("raw step, mean ms: " + ", ".join(f"{k[:-3]} {v:.0f}" for k, v in raw.items() if k.endswith("_ms")))


if __name__ == "__main__":
    main()
