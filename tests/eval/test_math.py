"""Math scorers: gold answers score 1, perturbed ones 0; math-verify equivalences; data errors name file and line."""

import json
import threading
from pathlib import Path

import pytest

from openk2.eval.benchmarks.math import BENCHMARKS, check_answer, last_boxed
from openk2.eval.registry import get_benchmark
from openk2.eval.task import BenchmarkDataError, Completion

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
need_data = pytest.mark.skipif(not (DATA / "gsm8k").is_dir(), reason="../shared/data not present")


@pytest.mark.parametrize("gold,response", [
    ("\\frac{1}{2}", "so $\\boxed{0.5}$"),
    ("\\frac{14}{3}", "\\boxed{\\dfrac{14}{3}}"),
    ("3\\sqrt{13}", "\\boxed{\\sqrt{117}}"),
    ("10", "The length is \\boxed{10\\text{ cm}}."),
    ("90^\\circ", "\\boxed{90}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}"),
    ("x=5", "\\boxed{5}"),
    ("1,-2", "\\boxed{-2, 1}"),
    ("50\\%", "\\boxed{50}"),
    ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}"),
])
def test_math_verify_equivalences(gold, response):
    assert check_answer(gold, response)[0], (gold, response)


@pytest.mark.parametrize("gold,response", [
    ("\\frac{1}{2}", "\\boxed{0.6}"), ("6 - 5i", "\\boxed{6+5i}"), ("3\\sqrt{13}", "\\boxed{3\\sqrt{12}}"),
    ("70", "I am not sure."), ("\\text{Evelyn}", "\\boxed{\\text{Bob}}"),
])
def test_wrong_answers_fail(gold, response):
    assert not check_answer(gold, response)[0]


def test_check_answer_off_the_main_thread_uses_a_child_process():
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", check_answer("\\frac{1}{2}", "\\boxed{0.5}")))
    t.start()
    t.join(60)
    assert result["r"][0] is True


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("no box") is None


@need_data
@pytest.mark.parametrize("name", ["gsm8k", "math500", "aime2025"])
def test_gold_answers_score_one_and_perturbed_zero(name):
    bench = get_benchmark(name)
    samples = bench.load(DATA)
    assert len(samples) == {"gsm8k": 1319, "math500": 500, "aime2025": 30}[name]
    for s in samples:  # every item, through the string fast path
        assert bench.score(s, Completion(text=f"Thus the answer is $\\boxed{{{s.reference}}}$.")).value == 1.0, s.id
    for s in samples[:8]:  # a few through math-verify proper, and perturbed
        assert bench.score(s, Completion(text=f"$\\boxed{{ {s.reference} }}$")).value == 1.0, s.id
        assert bench.score(s, Completion(text="\\boxed{123456789}")).value == 0.0, s.id


def test_gsm8k_reads_hash_and_answer_is_forms(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "x\n#### 1,200"}) + "\n")
    bench = get_benchmark("gsm8k")
    [s] = bench.load(tmp_path)
    assert s.reference == "1200"
    for text in ("#### 1,200", "The answer is 1200.", "\\boxed{1,200}", "so $1200$ dollars"):
        assert bench.score(s, Completion(text=text)).value == 1.0, text
    assert bench.score(s, Completion(text="The answer is 1201")).value == 0.0


def test_missing_and_malformed_data_files_name_file_and_line(tmp_path):
    bench = next(b for b in BENCHMARKS if b.name == "math500")
    with pytest.raises(BenchmarkDataError, match="math500/test.jsonl: file not found"):
        bench.load(tmp_path)
    (tmp_path / "math500").mkdir()
    (tmp_path / "math500" / "test.jsonl").write_text('{"problem": "p", "answer": "1"}\n{oops\n')
    with pytest.raises(BenchmarkDataError, match=r"test.jsonl:2: not valid JSON"):
        bench.load(tmp_path)
    (tmp_path / "math500" / "test.jsonl").write_text('{"problem": "p"}\n')
    with pytest.raises(BenchmarkDataError, match=r"test.jsonl:1: missing field\(s\) answer"):
        bench.load(tmp_path)
