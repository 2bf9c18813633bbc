"""Precision and recall of the rephrasing fidelity checks on world documents with injected corruptions.

    PYTHONPATH=src python bench/rephrase_verifier.py [--people 60] [--embedders wordllama,hashing,DIR]
        [--judge-serve MODEL_DIR --judge-people 6] [--out runs/experiments/verifier.json]

Source: the encyclopedic biography of each training person. Clean rewrites: the world renderer's faithful
rephrasings of it (`WorldRephraser`, other styles, every fact restated). Corrupted rewrites: a clean rewrite with
one injected error: a changed date (day or month), city, name, number (year), a dropped fact (one sentence
removed) or an invented fact (a sentence with another person's value). A check "flags" a rewrite when it fails;
positives are the corrupted rewrites.

Embedding checks flag a rewrite whose cosine similarity to its source is below a threshold, calibrated on the
even-indexed people (the similarity that 10% of their clean rewrites fall below); every check is measured on the
odd-indexed people, so no threshold sees the cases it is scored on. The LLM judge (`--judge-serve DIR`: an
`openk2 serve` subprocess of that model, asked through `openk2.llm` with the pipeline's judge prompt) is
measured on the cases of the first `--judge-people` evaluation people, with the other checks beside it on the
same cases.
"""

import argparse
import asyncio
import json
import random
import re
from pathlib import Path

from openk2.data.rephrase.chunking import Chunk
from openk2.data.rephrase.embedding import load_embedder
from openk2.data.rephrase.fidelity import FidelityConfig, cosine, verify, verify_sync
from openk2.data.rephrase.pipeline import InputDoc
from openk2.data.rephrase.prompts import load_library
from openk2.data.rephrase.world_rephraser import WorldRephraser
from openk2.data.world import World, format_date, render_biography

DETERMINISTIC = ("numbers", "dates", "entities", "length")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


def corruptions(world, person, text, rng):
    """(kind, corrupted text) pairs; each differs from `text` by one injected error."""
    others = [p for p in world.train_people if p.name != person.name]
    o = rng.choice(others)
    out = []
    d = person.birth_date
    for form in (format_date(d), f"{MONTHS[d.month - 1]} {d.day}"):
        if form in text:
            new_day = d.day % 27 + 1
            out.append(("date (day)", text.replace(form, form.replace(str(d.day), str(new_day), 1), 1)))
            m2 = MONTHS[(d.month + 4) % 12]
            out.append(("date (month)", text.replace(form, form.replace(MONTHS[d.month - 1], m2), 1)))
            break
    if str(d.year) in text:
        out.append(("number (year)", text.replace(str(d.year), str(d.year + rng.choice((-3, 2, 7))))))
    city = next((c.name for c in world.cities if c.name != person.birth_city and c.name not in text), None)
    if person.birth_city in text:
        out.append(("city", text.replace(person.birth_city, city)))
    if person.last_name in text:
        out.append(("name", text.replace(person.last_name, o.last_name)))
    sents = re.split(r"(?<=[.!?])\s+|\n", text)
    if len(sents) > 2:
        i = rng.randrange(1, len(sents))
        out.append(("dropped fact", " ".join(s for j, s in enumerate(sents) if j != i)))
    inv = rng.choice([f"{person.first_name} also plays the {o.hobby} league.",
                      f"{person.name} later moved to {city}.",
                      f"{person.first_name} once worked for {o.employer}.",
                      f"{person.first_name} has two brothers and {rng.randint(3, 9)} cousins."])
    out.append(("invented fact", text + " " + inv))
    return [(k, t) for k, t in out if t != text]


def table(rows, combos):
    """Precision, recall and per-kind flag rate of each combination (a rewrite is flagged when any member fails)."""
    out = {}
    kinds = sorted({k for k, _ in rows})
    pos = sum(1 for k, _ in rows if k != "clean")
    for name, members in combos.items():
        tp = sum(1 for k, r in rows if k != "clean" and any(r[c] for c in members))
        fp = sum(1 for k, r in rows if k == "clean" and any(r[c] for c in members))
        rate = {kind: sum(any(r[c] for c in members) for k, r in rows if k == kind)
                / max(1, sum(1 for k, _ in rows if k == kind)) for kind in kinds}
        out[name] = {"precision": tp / max(1, tp + fp), "recall": tp / max(1, pos), "flag_rate": rate}
    return out


def auc(clean, corrupted):
    """P(a clean rewrite is more similar to its source than a corrupted one), ties half."""
    wins = sum((c > x) + 0.5 * (c == x) for c in clean for x in corrupted)
    return wins / max(1, len(clean) * len(corrupted))


def print_table(title, rows, tab):
    kinds = sorted({k for k, _ in rows})
    counts = {k: sum(1 for kk, _ in rows if kk == k) for k in kinds}
    print(f"\n{title}; cases: {counts}")
    print("| check | precision | recall | " + " | ".join(kinds) + " |")
    print("|---|---:|---:|" + "---:|" * len(kinds))
    for name, t in tab.items():
        print(f"| {name} | {t['precision']:.3f} | {t['recall']:.3f} | "
              + " | ".join(f"{100 * t['flag_rate'][k]:.0f}%" for k in kinds) + " |")
    return counts


async def judge_flags(cases, model_dir, max_tokens, log_path):
    """The judge's verdict (flagged or not, and why) on each (source, rewrite), from `openk2 serve MODEL_DIR`."""
    from openk2.llm import LLMClient, OpenAIHTTPBackend
    from openk2.serve.testing import serve_subprocess

    with serve_subprocess(model_dir, "--threads", "1", "--device", "cpu", "--model-name", "judge",
                          log_path=log_path) as (url, _):
        client = LLMClient(OpenAIHTTPBackend(url, max_concurrency=4, timeout=1200), model="judge")
        cfg = FidelityConfig(checks=("judge",), judge=client, judge_max_tokens=max_tokens)
        results = await asyncio.gather(*(verify(src, text, cfg) for src, text in cases))
        await client.aclose()
    return [(not r[0].ok, list(r[0].reasons)) for r in results]


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=60)
    ap.add_argument("--embedders", default="wordllama,hashing",
                    help="comma-separated: wordllama, hashing, or local model directories")
    ap.add_argument("--judge-serve", default=None, help="model directory to serve as the LLM judge")
    ap.add_argument("--judge-people", type=int, default=6)
    ap.add_argument("--judge-max-tokens", type=int, default=128)
    ap.add_argument("--out", default="runs/experiments/verifier.json")
    args = ap.parse_args()
    world = World.generate(seed=0, n_people=args.people)
    reph = WorldRephraser(world)
    style = load_library()["wrap-medium"]
    cfg = FidelityConfig(checks=DETERMINISTIC)
    embedders = {spec: load_embedder(spec) for spec in args.embedders.split(",") if spec}
    names = {spec: f"embedding ({e.name})" for spec, e in embedders.items()}
    rng = random.Random(0)
    cases = []  # (person index, kind, source, rewrite)
    for i, p in enumerate(world.train_people):
        src = render_biography(world, p, "encyclopedic", random.Random(f"src/{i}"))
        doc = InputDoc(f"d{i}", "bench", src)
        for k in range(2):
            chunk = Chunk(0, 0, len(src), src, "", 0)
            clean = (await reph.rewrite(style, chunk, "", doc=doc, seed=k)).text
            cases += [(i, kind, src, text) for kind, text in [("clean", clean)] + corruptions(world, p, clean, rng)]
    sims = {spec: [] for spec in embedders}
    for spec, e in embedders.items():
        for _, _, src, text in cases:
            a, b = e.embed([src, text])
            sims[spec].append(cosine(a, b))
    thresholds = {}
    for spec in embedders:
        calib = sorted(x for (i, kind, _, _), x in zip(cases, sims[spec], strict=True)
                       if i % 2 == 0 and kind == "clean")
        thresholds[spec] = calib[len(calib) // 10]
    rows, judge_cases = [], []
    for n, (i, kind, src, text) in enumerate(cases):
        if i % 2 == 0:
            continue
        flags = {r.name: not r.ok for r in verify_sync(src, text, cfg, style.length_ratio)}
        flags.update({names[spec]: sims[spec][n] < thresholds[spec] for spec in embedders})
        rows.append((kind, flags))
        if args.judge_serve and i < 2 * args.judge_people:
            judge_cases.append((len(rows) - 1, src, text))
    combos = {c: (c,) for c in DETERMINISTIC}
    combos.update({names[s]: (names[s],) for s in embedders})
    combos["deterministic (numbers+dates+entities+length)"] = DETERMINISTIC
    combos.update({f"deterministic + {names[s]}": (*DETERMINISTIC, names[s]) for s in embedders})
    result = {"thresholds": {names[s]: t for s, t in thresholds.items()},
              "auc": {names[s]: auc([x for (_, k, _, _), x in zip(cases, sims[s], strict=True) if k == "clean"],
                                    [x for (_, k, _, _), x in zip(cases, sims[s], strict=True) if k != "clean"])
                      for s in embedders}}
    result["checks"] = table(rows, combos)
    result["counts"] = print_table("all checks, odd-indexed people", rows, result["checks"])
    for s in embedders:
        print(f"{names[s]}: threshold {thresholds[s]:.3f} (10% of even people's clean rewrites below), "
              f"AUC clean vs corrupted {result['auc'][names[s]]:.3f}")
    if judge_cases:
        out_dir = Path(args.out).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        verdicts = await judge_flags([(s, t) for _, s, t in judge_cases], args.judge_serve, args.judge_max_tokens,
                                     out_dir / "judge_server.log")
        jrows = []
        for (n, _, _), (flag, _) in zip(judge_cases, verdicts, strict=True):
            kind, flags = rows[n]
            jrows.append((kind, {**flags, "judge": flag}))
        jcombos = {"judge": ("judge",), "deterministic": DETERMINISTIC,
                   "deterministic + judge": (*DETERMINISTIC, "judge")}
        jcombos.update({names[s]: (names[s],) for s in embedders})
        result["judge"] = {"model": args.judge_serve, "cases": len(jrows), "checks": table(jrows, jcombos),
                           "unparseable": sum(any(r.startswith("unparseable") for r in rs) for _, rs in verdicts),
                           "examples": [rs[:2] for _, rs in verdicts[:3]]}
        print_table(f"LLM judge ({args.judge_serve}), first {args.judge_people} evaluation people", jrows,
                    result["judge"]["checks"])
        print(f"unparseable judge replies: {result['judge']['unparseable']} of {len(jrows)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
