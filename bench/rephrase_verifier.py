"""Precision and recall of the rephrasing fidelity checks on world documents with injected corruptions.

    PYTHONPATH=src python bench/rephrase_verifier.py [--people 60] [--out runs/experiments/verifier.json]

Source: the encyclopedic biography of each training person. Clean rewrites: the world renderer's faithful
rephrasings of it (`WorldRephraser`, other styles, every fact restated). Corrupted rewrites: a clean rewrite with
one injected error: a changed date (day or month), city, name, number (year), a dropped fact (one sentence
removed) or an invented fact (a sentence with another person's value). A check "flags" a rewrite when it fails;
positives are the corrupted rewrites. The LLM judge is not measured here (no capable LLM on this CPU).
"""

import argparse
import asyncio
import json
import random
import re
from pathlib import Path

from openk2.data.rephrase.chunking import Chunk
from openk2.data.rephrase.fidelity import FidelityConfig, verify_sync
from openk2.data.rephrase.pipeline import InputDoc
from openk2.data.rephrase.prompts import load_library
from openk2.data.rephrase.world_rephraser import WorldRephraser
from openk2.data.world import World, format_date, render_biography

CHECKS = ("numbers", "dates", "entities", "length", "embedding")
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


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=60)
    ap.add_argument("--out", default="runs/experiments/verifier.json")
    args = ap.parse_args()
    world = World.generate(seed=0, n_people=args.people)
    reph = WorldRephraser(world)
    style = load_library()["wrap-medium"]
    cfg = FidelityConfig(checks=CHECKS)
    rng = random.Random(0)
    rows = []  # (kind, {check: flagged})
    for i, p in enumerate(world.train_people):
        src = render_biography(world, p, "encyclopedic", random.Random(f"src/{i}"))
        doc = InputDoc(f"d{i}", "bench", src)
        for k in range(2):
            chunk = Chunk(0, 0, len(src), src, "", 0)
            clean = (await reph.rewrite(style, chunk, "", doc=doc, seed=k)).text
            cases = [("clean", clean)] + corruptions(world, p, clean, rng)
            for kind, text in cases:
                res = {r.name: not r.ok for r in verify_sync(src, text, cfg, style.length_ratio)}
                rows.append((kind, res))
    combos = {c: (c,) for c in CHECKS}
    combos["deterministic (numbers+dates+entities+length)"] = ("numbers", "dates", "entities", "length")
    combos["all"] = CHECKS
    table = {}
    for name, members in combos.items():
        tp = sum(1 for k, r in rows if k != "clean" and any(r[c] for c in members))
        fp = sum(1 for k, r in rows if k == "clean" and any(r[c] for c in members))
        pos = sum(1 for k, _ in rows if k != "clean")
        per_kind = {}
        for kind in sorted({k for k, _ in rows}):
            sel = [r for k, r in rows if k == kind]
            per_kind[kind] = sum(any(r[c] for c in members) for r in sel) / len(sel)
        table[name] = {"precision": tp / max(1, tp + fp), "recall": tp / max(1, pos), "flag_rate": per_kind}
    counts = {k: sum(1 for kk, _ in rows if kk == k) for k in sorted({k for k, _ in rows})}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"counts": counts, "checks": table}, indent=1))
    kinds = sorted(counts)
    print("| check | precision | recall | " + " | ".join(kinds) + " |")
    print("|---|---:|---:|" + "---:|" * len(kinds))
    for name, t in table.items():
        print(f"| {name} | {t['precision']:.3f} | {t['recall']:.3f} | "
              + " | ".join(f"{100 * t['flag_rate'][k]:.0f}%" for k in kinds) + " |")
    print("cases:", counts)


if __name__ == "__main__":
    asyncio.run(main())
