"""K2 Table 1 in miniature (`openk2 experiment rephrasing`): raw data repeated vs rephrased data, equal tokens.

On the speedrun's world: the raw corpus is one encyclopedic biography per training person. Rephrasings come from
`run_rephrase` with any rephraser: `world` (the programmatic world renderer: the CPU path without a capable
LLM) or an LLM model spec. Three rows, each trained from scratch on the same number of tokens:

    raw x N        the raw biography of every person, N epochs
    1 reph. x N    one rephrasing of every biography, N epochs
    N reph. x 1    N different rephrasings, each once

Every row also carries the same Q/A documents about the last half of the training people (so the model learns
the answer format, `world.qa_people`); "qa" probes ask about the other half (questions never trained on) and
"recall" probes use the raw text's sentence openings. Scored by greedy exact match (`world.answer_matches`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from openk2.data.world import World, qa_people, render_qa, world_documents, world_probes

ROWS = ("raw", "one_rephrasing", "n_rephrasings")
ROW_LABELS = {"raw": "raw x {n} epochs", "one_rephrasing": "1 rephrasing x {n} epochs",
              "n_rephrasings": "{n} rephrasings x 1 epoch"}


def make_rephrasings(world: World, n: int, rephraser: Any, out: Path, style: str = "wrap-medium",
                     seed: int = 0) -> tuple[list[str], list[list[str]], dict[str, Any]]:
    """(raw docs, rephrasings[person][k] (accepted rewrites, up to n), pipeline summary)."""
    from openk2.data.rephrase.pipeline import RephraseConfig, run_rephrase
    from openk2.data.rephrase.prompts import load_library

    raw = world_documents(world, renderings_per_person=1, include_gazetteer=False)
    out.mkdir(parents=True, exist_ok=True)
    inp = out / "raw.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(raw)))
    cfg = RephraseConfig(inputs=[inp], out=out / "rephrased", styles=[load_library()[style]], n=n, seed=seed,
                         progress=False)
    summary = asyncio.run(run_rephrase(cfg, rephraser))
    per: list[list[tuple[int, str]]] = [[] for _ in raw]
    for line in (out / "rephrased" / "rephrased.jsonl").read_text().splitlines():
        rec = json.loads(line)
        per[int(rec["source"]["id"].rsplit("#", 1)[1])].append((rec["rephrasing"], rec["text"]))
    return raw, [[t for _, t in sorted(p)] or [raw[i]] for i, p in enumerate(per)], summary


def row_documents(row: str, raw: list[str], reph: list[list[str]], qa_docs: list[str], n: int
                  ) -> list[list[str]]:
    """Documents per epoch for a row (the Q/A documents are in every epoch of every row)."""
    if row == "raw":
        return [raw + qa_docs for _ in range(n)]
    if row == "one_rephrasing":
        return [[r[0] for r in reph] + qa_docs for _ in range(n)]
    return [[r[e % len(r)] for r in reph] + qa_docs for e in range(n)]


def token_stream(epochs: list[list[str]], tokenizer: Any, seed: int) -> list[int]:
    rng = random.Random(seed)
    ids: list[int] = []
    for docs in epochs:
        docs = list(docs)
        rng.shuffle(docs)
        for ids_doc in tokenizer.encode_batch(docs, add_bos=True):
            ids.extend(ids_doc)
    return ids


@torch.no_grad()
def choice_accuracy(model: Any, tokenizer: Any, probes: list, world: World, batch: int = 64) -> float:
    """Fraction of probes whose true answer has the highest log-likelihood after the prompt among every value
    the world's people have for that attribute (a graded, less noisy read-out than greedy exact match)."""
    import torch.nn.functional as F

    pools = {a: sorted({" " + p.answer(a) for p in world.people}) for a in {p.attribute for p in probes}}
    rows: list[tuple[int, int, list[int], int]] = []  # (probe, candidate, ids, prompt length)
    for i, p in enumerate(probes):
        prompt_ids = tokenizer.encode_batch([p.prompt], add_bos=True)[0]
        for j, cand in enumerate(pools[p.attribute]):
            rows.append((i, j, prompt_ids + tokenizer.encode_batch([cand], add_bos=False)[0], len(prompt_ids)))
    scores: dict[int, list[float]] = {}
    for b in range(0, len(rows), batch):
        chunk = rows[b:b + batch]
        width = max(len(r[2]) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for k, r in enumerate(chunk):
            ids[k, :len(r[2])] = torch.tensor(r[2])
        logp = F.log_softmax(model(ids).logits.float(), dim=-1)
        for k, (i, _j, seq_ids, n_prompt) in enumerate(chunk):
            tgt = torch.tensor(seq_ids[n_prompt:])
            pos = torch.arange(n_prompt - 1, len(seq_ids) - 1)
            scores.setdefault(i, []).append(float(logp[k, pos, tgt].sum()))
    correct = sum(pools[p.attribute].index(p.answer) == max(range(len(scores[i])), key=scores[i].__getitem__)
                  for i, p in enumerate(probes))
    return correct / max(1, len(probes))


def train_and_probe(stream: list[int], tokens: int, tokenizer: Any, probes: list, world: World, *, seed: int,
                    batch: int, seq: int, lr: float, model_overrides: dict[str, Any], log: Callable[[str], None],
                    name: str
                    ) -> dict[str, Any]:
    from openk2.data.world import answer_matches
    from openk2.model import build_model, get_preset
    from openk2.optim.muonclip import MuonClip
    from openk2.train.evaluation import complete

    torch.manual_seed(seed)
    cfg = get_preset("nano", **{"vocab_size": tokenizer.vocab_size, "num_hidden_layers": 2,
                                "n_routed_experts": 8, **model_overrides})
    model = build_model(cfg, seed=seed).train()
    opt = MuonClip(model, lr=lr, weight_decay=0.1, qk_clip_tau=100.0)
    base = [g["lr"] for g in opt.param_groups]
    data = torch.tensor(stream[:tokens + 1], dtype=torch.long)
    steps = tokens // (batch * seq)
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        # warm-up 10%, constant, linear decay over the last 30% (WSD, as the speedrun)
        frac = step / steps
        mult = min(1.0, (step + 1) / max(1, steps // 10)) * (1.0 if frac < 0.7 else max(0.1, (1 - frac) / 0.3))
        for g, b in zip(opt.param_groups, base, strict=True):
            g["lr"] = b * mult
        win = data[step * batch * seq: (step + 1) * batch * seq + 1]
        x = win[:-1].view(batch, seq)
        y = win[1:].view(batch, seq) if win.numel() == batch * seq + 1 else x
        loss = model(x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 25 == 0:
            log(f"[{name}] step {step + 1}/{steps} loss {losses[-1]:.3f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    choice = choice_accuracy(model, tokenizer, [p for p in probes if p.kind == "qa" and p.split == "seen"], world)
    completions = complete(model, tokenizer, [p.prompt for p in probes])
    hits: dict[str, list[int]] = {}
    for p, c in zip(probes, completions, strict=True):
        hits.setdefault(f"{p.kind}/{p.split}", []).append(int(answer_matches(c, p.answer)))
    acc = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    acc["qa-choice/seen"] = choice
    return {"steps": steps, "tokens": steps * batch * seq, "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "probes": acc, "probe_counts": {k: len(v) for k, v in hits.items()},
            "seconds": time.perf_counter() - t0}


def run_rephrasing_experiment(out: Path, rephraser: Any, *, n: int = 10, people: int = 24, world_seed: int = 0,
                              seeds: tuple[int, ...] = (0, 1), batch: int = 8, seq: int = 128, lr: float = 2e-2,
                              vocab: int = 700, style: str = "wrap-medium", model_overrides: dict | None = None,
                              log: Callable[[str], None] = print) -> dict[str, Any]:
    from openk2.data.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    world = World.generate(seed=world_seed, n_people=people)
    raw, reph, pipeline_summary = make_rephrasings(world, n, rephraser, out, style=style)
    qa_docs = [render_qa(world, p, random.Random(f"qa/{i}")) for i, p in enumerate(qa_people(world, 0.5))]
    probes = world_probes(world, qa_fraction=0.5)
    all_texts = raw + [t for r in reph for t in r] + qa_docs
    tokenizer = train_tokenizer(iter(all_texts), vocab, show_progress=False)
    streams = {row: {s: token_stream(row_documents(row, raw, reph, qa_docs, n), tokenizer, s) for s in seeds}
               for row in ROWS}
    tokens = min(len(st) for per in streams.values() for st in per.values()) - 1
    log(f"raw docs {len(raw)}, rephrasings per doc {min(len(r) for r in reph)}-{max(len(r) for r in reph)}, "
        f"tokens per run {tokens:,}, probes {len(probes)}")
    results: dict[str, dict[int, Any]] = {row: {} for row in ROWS}
    for s in seeds:
        for row in ROWS:
            results[row][s] = train_and_probe(streams[row][s], tokens, tokenizer, probes, world, seed=s,
                                              batch=batch, seq=seq, lr=lr, model_overrides=model_overrides or {},
                                              log=log,
                                              name=f"{row}/seed{s}")
            log(f"[{row}/seed{s}] {results[row][s]['probes']}")
    summary = {}
    for row in ROWS:
        keys = results[row][seeds[0]]["probes"].keys()
        summary[row] = {k: [results[row][s]["probes"][k] for s in seeds] for k in keys}
    record = {"rephraser": getattr(rephraser, "name", "?"), "n": n, "people": people, "world_seed": world_seed,
              "seeds": list(seeds), "batch": batch, "seq": seq, "lr": lr, "vocab": tokenizer.vocab_size,
              "tokens_per_run": tokens, "style": style, "pipeline": pipeline_summary, "runs": results,
              "summary": summary, "seconds": time.perf_counter() - t0}
    (out / "rephrasing.json").write_text(json.dumps(record, indent=1, default=str))
    _plot(out, record)
    return record


def _plot(out: Path, record: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("recall/seen", "qa/seen", "qa-choice/seen", "recall/unseen") if k in record["summary"]["raw"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(ROWS)
    for i, row in enumerate(ROWS):
        vals = record["summary"][row]
        means = [100 * sum(vals[k]) / len(vals[k]) for k in kinds]
        ax.bar([j + i * width for j in range(len(kinds))], means, width,
               label=ROW_LABELS[row].format(n=record["n"]))
        for j, k in enumerate(kinds):
            ax.scatter([j + i * width] * len(vals[k]), [100 * v for v in vals[k]], color="k", s=8, zorder=3)
    ax.set_xticks([j + width for j in range(len(kinds))], kinds)
    ax.set(ylabel="probe accuracy (%)", title=f"Rephrasing at equal tokens ({record['rephraser']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rephrasing.png", dpi=110)
    plt.close(fig)
