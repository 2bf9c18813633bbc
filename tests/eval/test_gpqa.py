"""GPQA-Diamond from a user file (self-written stand-in rows): seeded shuffles, letter extraction, data errors."""

import csv
from collections import Counter

import pytest

from openk2.eval.benchmarks.gpqa import COLUMNS, extract_letter
from openk2.eval.registry import get_benchmark
from openk2.eval.task import BenchmarkDataError, Completion


def _write(tmp_path, n=40):
    (tmp_path / "gpqa").mkdir(exist_ok=True)
    with open(tmp_path / "gpqa" / "gpqa_diamond.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "Record ID", "High-level domain"])
        w.writeheader()
        for i in range(n):
            w.writerow({"Question": f"Which number is {i}?", "Correct Answer": str(i), "Incorrect Answer 1": f"{i}a",
                        "Incorrect Answer 2": f"{i}b", "Incorrect Answer 3": f"{i}c", "Record ID": f"rec{i}",
                        "High-level domain": "Physics" if i % 2 else "Chemistry"})
    return tmp_path


def test_shuffle_is_seeded_and_gold_scores_one(tmp_path):
    bench = get_benchmark("gpqa-diamond")
    samples = bench.load(_write(tmp_path))
    assert [s.reference for s in samples] == [s.reference for s in bench.load(tmp_path)]  # fixed seed
    assert [s.reference for s in samples] != [s.reference for s in bench.load(tmp_path, seed=1)]
    assert len(Counter(s.reference for s in samples)) == 4  # the correct letter moves around
    for i, s in enumerate(samples):
        assert s.metadata["options"]["ABCD".index(s.reference)] == str(i)
        assert bench.score(s, Completion(text=f"Reasoning...\nAnswer: {s.reference}")).value == 1.0
        wrong = next(x for x in "ABCD" if x != s.reference)
        assert bench.score(s, Completion(text=f"Answer: {wrong}")).value == 0.0
    assert {s.category for s in samples} == {"Physics", "Chemistry"} and bench.k == 8 and bench.k2_score == 75.1


@pytest.mark.parametrize("text,letter", [("Answer: B", "B"), ("**Answer:** (C)", "C"), ("the answer is D.", "D"),
                                         ("Answer: A\nWait. Answer: C", "C"), ("\\boxed{B}", "B"), ("no idea", None)])
def test_extract_letter(text, letter):
    assert extract_letter(text) == letter


def test_missing_and_malformed_files(tmp_path):
    bench = get_benchmark("gpqa-diamond")
    with pytest.raises(BenchmarkDataError, match="gpqa_diamond.csv: file not found.*idavidrein/gpqa"):
        bench.load(tmp_path)
    _write(tmp_path, n=3)
    path = tmp_path / "gpqa" / "gpqa_diamond.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1], ",,,,,x,y", lines[3]]) + "\n")
    with pytest.raises(BenchmarkDataError, match="gpqa_diamond.csv:3: empty question"):
        bench.load(tmp_path)
