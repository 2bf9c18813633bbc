"""GPQA-Diamond (arXiv 2311.12022) from a user-supplied file; avg@8 as K2 reports it.

GPQA's licence asks that its examples not be shared in plain text online, so openk2 ships no copy: download
`dataset.zip` from idavidrein/gpqa (the password is in its README) or the gated HF `Idavidrein/gpqa`, and put
`gpqa_diamond.csv` (198 rows) at `<data-dir>/gpqa/gpqa_diamond.csv` (a JSON Lines file with the same columns,
`gpqa_diamond.jsonl`, works too). Columns used: Question, Correct Answer, Incorrect Answer 1-3, Record ID,
High-level domain.

The four options are shuffled per question with a fixed seed (`--seed`, default 0) so the correct letter is
uniform and every run of one seed sees the same order. Prompt and answer extraction follow OpenAI simple-evals
("Answer: $LETTER" on the last line).
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openk2.eval.benchmarks.math import last_boxed, read_jsonl
from openk2.eval.task import Benchmark, BenchmarkDataError, Completion, Sample, Score

PROMPT = ("Answer the following multiple choice question. The last line of your response should be of the following "
          "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before "
          "answering.\n\n{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}")
COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
LETTERS = "ABCD"
_ANSWER = re.compile(r"(?i)answer\s*(?:is)?\s*[:：]?\s*\**\s*\(?\$?\s*([ABCD])\b")


def extract_letter(text: str) -> str | None:
    """The chosen option: the last 'Answer: X' (also 'answer is (X)', '**Answer:** X'), else a boxed letter."""
    found = _ANSWER.findall(text)
    if found:
        return found[-1].upper()
    boxed = last_boxed(text)
    if boxed is not None and re.fullmatch(r"\s*(?:\\text\{)?([ABCD])\}?\s*", boxed):
        return re.sub(r"[^ABCD]", "", boxed)[:1]
    return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return read_jsonl(path, COLUMNS)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkDataError(f"{path}:1: missing column(s) {', '.join(missing)}")
        rows = []
        for n, row in enumerate(reader, 2):
            if any(not (row.get(c) or "").strip() for c in COLUMNS):
                raise BenchmarkDataError(f"{path}:{n}: empty question or answer")
            rows.append(row)
        return rows


@dataclass
class GPQA(Benchmark):
    files: tuple[str, ...] = ("gpqa/gpqa_diamond.csv", "gpqa/gpqa_diamond.jsonl")

    def _path(self, data_dir: Path) -> Path:
        for rel in self.files:
            if (data_dir / rel).is_file():
                return data_dir / rel
        raise BenchmarkDataError(
            f"{data_dir / self.files[0]}: file not found. GPQA is not redistributable in plain text: download "
            "dataset.zip from github.com/idavidrein/gpqa (password in its README) and copy gpqa_diamond.csv there")

    def data_files(self, data_dir: Path) -> list[Path]:
        try:
            return [self._path(data_dir)]
        except BenchmarkDataError:
            return []

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        samples = []
        for n, row in enumerate(_read_rows(self._path(data_dir))):
            item_id = str(row.get("Record ID") or n)
            options = [row[c].strip() for c in COLUMNS[1:]]
            order = list(range(4))
            random.Random(f"gpqa:{seed}:{item_id}").shuffle(order)  # str seeds hash stably (sha512)
            shuffled = [options[i] for i in order]
            answer = LETTERS[order.index(0)]
            prompt = PROMPT.format(question=row["Question"].strip(), **dict(zip(LETTERS, shuffled, strict=True)))
            samples.append(Sample(id=item_id, messages=[{"role": "user", "content": prompt}], reference=answer,
                                  category=row.get("High-level domain") or None,
                                  metadata={"options": shuffled}))
        return samples[:limit]

    def score(self, sample: Sample, completion: Completion) -> Score:
        letter = extract_letter(completion.text)
        return Score(float(letter == sample.reference), extracted=letter)


BENCHMARKS: list[Benchmark] = [
    GPQA(name="gpqa-diamond", metric="avg@k", data_source="user file gpqa/gpqa_diamond.csv (198; not shipped)",
         k2_score=75.1, temperature=0.6, k=8, categories=True),
]
