"""Does a model copy from its context? Two teacher-forced measurements, a few CPU-seconds per model
(docs/experiments.md, "Name copying: the model has no copy circuit"):

1. Induction: (a) 8 sequences of 40 random BPE tokens, each repeated once after itself; mean loss (nats/token) on
   the first pass and on the repeat. A model with induction heads predicts the repeat almost perfectly (~0-1 nats);
   one without scores the repeat like the first pass. (b) A fresh name (`openk2.data.copy_text.fresh_name`)
   mentioned twice in one sentence: loss on each mention, and the share of second mentions greedy would write.
2. Name copy in a tool call: for lookup / company_city tasks whose person is named after a space in the request,
   the expert's first tool call (copy-friendly, `openk2.agentic.world_sft`) teacher-forced after the request;
   loss on the call's name tokens, the share of calls whose first name piece is the model's argmax, and of calls
   whose every name piece is (greedy decoding would then write the full name), for four populations: the
   pretraining world's held-out people (the world-agent benchmark's), its training people, the people of the
   first registry world (in the SFT stage's dialogs) and of a world no stage uses (seed 5000).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/name_copy_probe.py runs/nano runs/nano/sft [--people 30]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch


def induction(model, tokenizer, n: int = 8, length: int = 40, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    first, repeat = [], []
    for _ in range(n):
        seq = [rng.randrange(300, 1500) for _ in range(length)]
        ids = [tokenizer.bos_id, *seq, *seq]
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        nll = [-float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        first.append(statistics.mean(nll[1:length]))
        repeat.append(statistics.mean(nll[length + 1:]))
    return {"first_pass_nats": statistics.mean(first), "repeat_nats": statistics.mean(repeat)}


def copy_offsets(model, tokenizer, n: int = 6, length: int = 40, seed: int = 1) -> dict[str, float]:
    """Repeat loss (nats/token) of 40 random tokens when the repeat starts 40, 64 or 128 positions after the first
    pass (a random gap between): an induction head copies at every distance, a head trained on fixed-offset rows
    only at its own (docs/experiments.md, "The copy curriculum in pretraining")."""
    rng = random.Random(seed)
    out = {}
    for offset in (40, 64, 128):
        losses = []
        for _ in range(n):
            seq = [rng.randrange(300, 1500) for _ in range(length)]
            gap = [rng.randrange(300, 1500) for _ in range(offset - length)]
            ids = [tokenizer.bos_id, *seq, *gap, *seq]
            with torch.no_grad():
                lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            start = 1 + offset  # the repeat's first token: unpredictable, not scored
            losses.append(statistics.mean(-float(lp[i - 1, ids[i]]) for i in range(start + 1, len(ids))))
        out[f"offset_{offset}_nats"] = statistics.mean(losses)
    return out


def prose_copy(model, tokenizer, n: int = 30, seed: int = 12345) -> dict[str, float]:
    """A fresh name (`openk2.data.copy_text.fresh_name`) mentioned twice in a sentence: nats/token on its first and
    second mention, and the share of second mentions that greedy decoding would write in full."""
    from openk2.data.copy_text import fresh_name

    rng = random.Random(seed)
    first, second, full = [], [], 0
    for _ in range(n):
        name = fresh_name(rng)
        head, mid = tokenizer.encode("Visitor log."), tokenizer.encode(" arrived at the library. The guard asked")
        name_ids = tokenizer.encode(" " + name)
        ids = [tokenizer.bos_id, *head, *name_ids, *mid, *name_ids, *tokenizer.encode(" to sign.")]
        at1 = 1 + len(head)
        at2 = at1 + len(name_ids) + len(mid)
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        first.append(statistics.mean(-float(lp[at1 + j - 1, x]) for j, x in enumerate(name_ids)))
        second.append(statistics.mean(-float(lp[at2 + j - 1, x]) for j, x in enumerate(name_ids)))
        full += all(int(lp[at2 + j - 1].argmax()) == x for j, x in enumerate(name_ids))
    return {"first_mention_nats": statistics.mean(first), "second_mention_nats": statistics.mean(second),
            "second_mention_greedy": full / n}


def name_copy(model, tokenizer, world, split: str, n_people: int) -> dict[str, float]:
    from openk2.agentic.world_domain import TOOLS
    from openk2.agentic.world_sft import expert_dialog
    from openk2.agentic.world_tasks import make_tasks
    from openk2.data.chat import render_chat_ids

    seen, tasks = set(), []
    for t in make_tasks(world, split, 400, seed=0):
        if t.kind in ("lookup", "company_city") and t.person not in seen and " " + t.person in t.instruction:
            seen.add(t.person)
            tasks.append(t)
    nll, first, full, pieces = [], 0, 0, []
    for t in tasks[:n_people]:
        record = expert_dialog(world, [t])
        if record is None:
            continue
        msgs = record["messages"]
        call = next(i for i, m in enumerate(msgs) if m.get("role") == "assistant" and m.get("tool_calls"))
        ids, _ = render_chat_ids(tokenizer, msgs[: call + 1], TOOLS)
        name = tokenizer.encode(" " + t.person)
        at = max(j for j in range(len(ids) - len(name) + 1) if ids[j:j + len(name)] == name)  # the call's copy
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        nll += [-float(lp[at + j - 1, x]) for j, x in enumerate(name)]
        top = [int(lp[at + j - 1].argmax()) == x for j, x in enumerate(name)]
        first += top[0]
        full += all(top)
        pieces.append(len(name))
    n = len(pieces)
    return {"people": n, "pieces_per_name": statistics.mean(pieces), "name_nats": statistics.mean(nll),
            "first_piece_argmax": first / n, "full_name_greedy": full / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model directories (a pretraining run, its sft/, ...)")
    p.add_argument("--people", type=int, default=30, help="people per population in the name-copy measurement")
    a = p.parse_args()

    from openk2.agentic.world_sft import REGISTRY_SEED
    from openk2.data.world import World
    from openk2.model_dir import load_model_dir

    torch.set_num_threads(1)
    world = World.generate(seed=0, n_people=100)
    populations = {"heldout": (world, "heldout"), "train": (world, "train"),
                   "registry": (World.generate(seed=REGISTRY_SEED, n_people=100), "train"),
                   "unused world": (World.generate(seed=5000, n_people=100), "train")}
    for d in a.models:
        loaded = load_model_dir(d)
        out = {"model": d, "induction": induction(loaded.model, loaded.tokenizer),
               "offsets": copy_offsets(loaded.model, loaded.tokenizer),
               "prose": prose_copy(loaded.model, loaded.tokenizer)}
        for label, (w, split) in populations.items():
            out[label] = name_copy(loaded.model, loaded.tokenizer, w, split, a.people)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
