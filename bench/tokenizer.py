"""Tokenizer benchmark: BPE training throughput, and encoding throughput of openk2 vs tiktoken on one vocabulary.

    .venv/bin/pip install tiktoken        # benchmark-only dependency
    .venv/bin/python bench/tokenizer.py [--mb 20] [--vocab-size 32768] [--repeats 3] [--write-docs]

Corpus: the interpreter's standard-library `.py` files in sorted path order, concatenated until `--mb` MB of
UTF-8 (deterministic for a given Python build; no network). openk2 trains its tokenizer on it, then the same
ranks are loaded into a `tiktoken.Encoding` with K2's split pattern (tiktoken would download `cl100k_base`,
which this machine cannot), so both encoders run the same vocabulary and regex and only the engines differ.
Encoding is timed sequentially (one text at a time, one thread) and batched (all files, all cores).
`--write-docs` puts the table into the "Tokenizer" section of docs/benchmarks.md (replacing an older one).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from openk2.data.tokenizer import K2_SPLIT_PATTERN, Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"


def stdlib_corpus(mb: float) -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py") if "site-packages" not in p.parts)
    budget, docs = int(mb * 1e6), []
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        docs.append(text)
        budget -= len(text.encode("utf-8"))
        if budget <= 0:
            break
    return docs


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` runs: the machine is shared, so the minimum is the least disturbed measurement."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    import tiktoken

    docs = stdlib_corpus(args.mb)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    mb = n_bytes / 1e6
    print(f"corpus: {len(docs)} stdlib files, {mb:.1f} MB")

    t0 = time.perf_counter()
    tok: Tokenizer = train_tokenizer(docs, args.vocab_size, show_progress=False)
    train_s = time.perf_counter() - t0

    enc = tiktoken.Encoding(
        name="openk2-bench", pat_str=K2_SPLIT_PATTERN, mergeable_ranks=tok.mergeable_ranks(),
        special_tokens=tok.special_ids,
    )
    threads = os.cpu_count() or 1
    ours_ids = tok.encode_batch(docs)
    tik_ids = enc.encode_ordinary_batch(docs, num_threads=threads)
    n_tokens = sum(map(len, ours_ids))
    same_docs = sum(a == b for a, b in zip(ours_ids, tik_ids, strict=True))
    assert all(tok.decode(ids) == d for ids, d in zip(ours_ids[:50], docs[:50], strict=True))

    timings = {
        ("openk2 (HF tokenizers)", "sequential"): best_of(lambda: [tok.encode(d) for d in docs], args.repeats),
        ("openk2 (HF tokenizers)", "batch"): best_of(lambda: tok.encode_batch(docs), args.repeats),
        ("tiktoken", "sequential"): best_of(lambda: [enc.encode_ordinary(d) for d in docs], args.repeats),
        ("tiktoken", "batch"): best_of(lambda: enc.encode_ordinary_batch(docs, num_threads=threads), args.repeats),
    }

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "?"
    import tokenizers

    machine = (f"{threads} cores ({platform.processor() or platform.machine()}), Python {platform.python_version()}, "
               f"tokenizers {tokenizers.__version__}, tiktoken {tiktoken.__version__}")
    cmd = "  ".join(["`.venv/bin/python bench/tokenizer.py", f"--mb {args.mb:g}", f"--vocab-size {args.vocab_size}",
                     f"--repeats {args.repeats}`"]).replace("  ", " ")
    lines = [
        "## Tokenizer",
        "",
        f"Command: {cmd} (git commit `{commit}`; machine: {machine}; shared, so numbers are best of "
        f"{args.repeats}).",
        "",
        f"Corpus: {len(docs)} Python {platform.python_version()} stdlib `.py` files, {mb:.1f} MB UTF-8. "
        f"Vocabulary {args.vocab_size} (incl. 13 specials); {n_bytes / n_tokens:.2f} bytes/token.",
        "",
        "| Step | Engine | Mode | Seconds | MB/s |",
        "|---|---|---|---:|---:|",
        f"| BPE training | openk2 (HF tokenizers) | all cores | {train_s:.2f} | {mb / train_s:.2f} |",
    ]
    for (engine, mode), s in timings.items():
        label = "1 thread" if mode == "sequential" else f"batch, {threads} threads"
        lines.append(f"| encode | {engine} | {label} | {s:.2f} | {mb / s:.2f} |")
    lines += [
        "",
        f"Same ids from both engines for {same_docs}/{len(docs)} files ({sum(map(len, tik_ids))} vs {n_tokens} "
        "tokens). Differences come from the merge rule: HF BPE applies its learned merges in order, tiktoken "
        "merges whichever adjacent pair forms the lowest-ranked token, which can pick a pair that was never a "
        "training merge.",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if args.write_docs:
        write_section(section)
        print(f"wrote the Tokenizer section of {DOCS.relative_to(ROOT)}")


def write_section(section: str) -> None:
    """Replace this benchmark's own `## Tokenizer` section, or append it; other sections stay as they are."""
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Tokenizer\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOCS.with_name(DOCS.name + ".tmp")
    tmp.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    os.replace(tmp, DOCS)


if __name__ == "__main__":
    sys.exit(main())
