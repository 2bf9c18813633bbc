"""Can the nano model form induction heads in a few hundred steps? Train it from its random init with the
trainer's own loop (`openk2.train.trainer.Trainer`: MuonClip or AdamW as configured, the WSD schedule, clipping) on
PURE repeated random-token rows (`openk2.data.repeat_rows`: bos, 128 random ids, the same 128 again; loss on the
repeat) and log the repeat loss on fixed held-out rows every few steps. A model that copies predicts the repeat at
~0-1 nats/token; one that does not pays ~ln(vocab) = 7.3 nats/token. Reports the first step whose held-out repeat
loss is below `--threshold` (the "phase change"), or none (docs/experiments.md, "Induction heads in the nano
model").

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/induction_screen.py --tokenizer runs/nano/tokenizer \
        --steps 200 --set model.overrides.kv_lora_rank=128 --out /tmp/induction/screen-kv128

`--set` takes the trainer's dotted config keys (`openk2.train.config`), so any preset field, the lr, the
optimizer, the schedule's length (`train.max_steps`, default the speedrun's 360: the lr schedule of the speedrun
even when `--steps` stops earlier) can be screened. One JSON line per evaluation, a summary line at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def heldout_repeat_loss(trainer, x_BT: torch.Tensor, y_BT: torch.Tensor) -> float:
    """Mean nats/token on the masked (repeat) targets of a fixed batch."""
    model = trainer.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits_BTV = model(x_BT).logits.float()
    model.train(was_training)
    return float(torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), y_BT.flatten(), ignore_index=-100))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory (e.g. runs/nano/tokenizer): vocab, bos")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps to run (stops early at the threshold)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--threshold", type=float, default=1.0, help="repeat nats/token that counts as the phase change")
    p.add_argument("--patience", type=int, default=0,
                   help="after the phase change, run this many more steps then stop (0: stop at once)")
    p.add_argument("--ids", type=int, default=0,
                   help="draw the random ids from the first N ordinary tokens only (0: all of them); a diagnostic")
    p.add_argument("--ids-until", type=int, default=0,
                   help="with --ids: a curriculum, the small alphabet up to this step, all ids after it (0: always)")
    p.add_argument("--widen", default="",
                   help="a widening alphabet: 'S1:N1,S2:N2,...' = ids from the first N1 tokens up to step S1, then N2 "
                        "up to S2, ..., all ids after the last step (replaces --ids/--ids-until)")
    p.add_argument("--span", type=int, default=0,
                   help="rows of repeated segments of random length <= SPAN with random gaps (varied copy offsets: "
                        "only induction, not a fixed-offset head, predicts them); 0 = one half repeated")
    p.add_argument("--set", action="append", default=[], help="dotted TrainConfig override (repeatable)")
    p.add_argument("--out", default="/tmp/induction_screen", help="scratch run directory (metrics, config)")
    a = p.parse_args()

    from openk2.data.repeat_rows import RepeatLoader
    from openk2.data.tokenizer import Tokenizer
    from openk2.train.config import load_config
    from openk2.train.data_setup import PreparedData
    from openk2.train.trainer import Trainer

    torch.set_num_threads(1)
    tokenizer = Tokenizer.load(a.tokenizer)
    cfg = load_config(None, [f"run.dir={a.out}", "run.force=true", "run.tensorboard=false", "run.progress=false",
                             *a.set])
    t = cfg.train
    high = min(tokenizer.special_ids.values())  # random ids: ordinary tokens only
    widen = [tuple(int(v) for v in part.split(":")) for part in a.widen.split(",")] if a.widen else []
    if widen:  # the --ids diagnostics (held-out rows over all ids) follow the first alphabet
        a.ids, a.ids_until = widen[0][1], widen[-1][0]
    if a.ids:
        high = min(high, a.ids)
    loader = RepeatLoader(t.batch_size, t.seq_len, high, tokenizer.bos_id, seed=t.seed, span=a.span)
    heldout = RepeatLoader(8, t.seq_len, high, tokenizer.bos_id, seed=t.seed + 10_000, span=a.span).batch(8)
    # with --ids: does a circuit learnt on a few ids copy any token? (the same held-out rows over all ids)
    heldout_all = RepeatLoader(8, t.seq_len, min(tokenizer.special_ids.values()), tokenizer.bos_id,
                               seed=t.seed + 10_000, span=a.span).batch(8) if a.ids else None
    data = PreparedData(tokenizer, Path(a.out), loader, val_batches=lambda source: iter(()),
                        token_bytes=torch.tensor(tokenizer.token_bytes(), dtype=torch.long))
    for ckpt in (Path(a.out) / "checkpoints").glob("*"):  # a screen always starts from the random init
        shutil.rmtree(ckpt)
    trainer = Trainer(cfg, data=data)
    cfg_line = {"overrides": a.set, "params": sum(q.numel() for q in trainer.model.parameters())}
    print(json.dumps(cfg_line), flush=True)
    crossed, start, cpu0, history = None, time.time(), time.process_time(), []
    for step in range(1, a.steps + 1):
        if a.ids and step == a.ids_until + 1 and a.ids_until:  # the curriculum's switch to every id
            loader.high = min(tokenizer.special_ids.values())
        for (until, _), (_, next_ids) in zip(widen[:-1], widen[1:], strict=True):  # a widening schedule's next
            if step == until + 1:
                loader.high = min(min(tokenizer.special_ids.values()), next_ids)
        rec = trainer.train_step()
        if step % a.eval_every == 0 or step == a.steps:
            repeat = heldout_repeat_loss(trainer, *heldout)
            line = {"step": step, "train_repeat_nats": round(rec["loss"], 3), "heldout_repeat_nats": round(repeat, 3),
                    **({"heldout_all_ids_repeat_nats": round(heldout_repeat_loss(trainer, *heldout_all), 3)}
                       if heldout_all is not None else {}),
                    "lr": rec["lr"], "cpu_s": round(time.process_time() - cpu0, 1),
                    "wall_s": round(time.time() - start, 1)}
            history.append(line)
            print(json.dumps(line), flush=True)
            if crossed is None and repeat < a.threshold:
                crossed = step
            if crossed is not None and step >= crossed + a.patience:
                break
    last = history[-1]
    print(json.dumps({"summary": True, "overrides": a.set, "ids": a.ids or "all", "ids_until": a.ids_until,
                      "widen": a.widen,
                      "phase_change_step": crossed, "steps_run": last["step"],
                      "last_repeat_nats": last["heldout_repeat_nats"], "cpu_s": last["cpu_s"],
                      "cpu_s_per_step": round(last["cpu_s"] / last["step"], 2)}), flush=True)


if __name__ == "__main__":
    main()
