"""Math benchmarks: GSM8K, MATH-500 and AIME 2025, answers checked with `math-verify`.

The model is asked for its final answer in `\\boxed{}`; `math_verify.parse` extracts it (boxed first, then the
last LaTeX or plain expression) and `verify(gold, pred)` decides equivalence (fractions vs decimals, LaTeX forms,
units, sets and intervals). A normalized string comparison of the boxed answer backs it up for answers sympy
cannot parse (MATH-500's `\\text{Evelyn}` or base-8 `52_8`).

Timeouts: math-verify bounds parsing and verification with `signal.alarm`, which only works in a process's main
thread. `check_answer` uses those signal timeouts when called from the main thread (the harness scores there);
from any other thread (e.g. an RL reward worker pool) it runs the check in a child process with a wall-clock
limit instead, since signal handlers cannot be installed off the main thread.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openk2.eval.task import Benchmark, BenchmarkDataError, Completion, Sample, Score

PROMPT = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
PARSE_TIMEOUT_S = 5  # per math-verify call (signal mode)
CHILD_TIMEOUT_S = 20  # whole check in the child process (thread mode)


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file; a missing file or a malformed line raises BenchmarkDataError naming it."""
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: file not found (point --data-dir at a directory with this layout)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise BenchmarkDataError(f"{path}:{n}: not valid JSON ({e})") from None
            missing = [k for k in required if not isinstance(row, dict) or k not in row]
            if missing:
                raise BenchmarkDataError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
            rows.append(row)
    return rows


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def _normalize(s: str) -> str:
    s = re.sub(r"\\text\{([^}]*)\}|\\textbf\{([^}]*)\}|\\mbox\{([^}]*)\}", lambda m: next(g for g in m.groups()
                                                                                        if g is not None), s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\dfrac", "\\frac")
    s = s.replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "").replace("$", "")
    return re.sub(r"\s+", "", s).rstrip(".").casefold()


def _verify_here(gold: str, response: str, timeout: int | None) -> tuple[bool, str | None]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_parsed = parse(f"${gold}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                        parsing_timeout=timeout)
    pred = parse(response, extraction_config=[LatexExtractionConfig(boxed_match_priority=0),
                                              ExprExtractionConfig()], parsing_timeout=timeout)
    extracted = str(pred[-1]) if pred else None
    ok = bool(gold_parsed and pred and verify(gold_parsed, pred, timeout_seconds=timeout))
    return ok, extracted


_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _child_check(gold: str, response: str) -> tuple[bool, str | None]:
    return _verify_here(gold, response, PARSE_TIMEOUT_S)  # a pool worker runs this in its main thread


def check_answer(gold: str, response: str) -> tuple[bool, str | None]:
    """(correct, extracted answer) for a LaTeX gold answer and a model response (see the module docstring for
    how time is bounded)."""
    global _pool
    boxed = last_boxed(response)
    if boxed is not None and _normalize(boxed) == _normalize(gold):
        return True, boxed
    if threading.current_thread() is threading.main_thread():
        ok, extracted = _verify_here(gold, response, PARSE_TIMEOUT_S)
    else:
        with _pool_lock:
            if _pool is None:
                _pool = ProcessPoolExecutor(max_workers=1)
            pool = _pool
        try:
            ok, extracted = pool.submit(_child_check, gold, response).result(timeout=CHILD_TIMEOUT_S)
        except FutureTimeout:
            with _pool_lock:  # the worker is stuck in sympy: drop it, the next call starts a fresh one
                if _pool is pool:
                    _pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
            return False, None
    return ok, boxed if boxed is not None else extracted


@dataclass
class MathBenchmark(Benchmark):
    path: str = ""
    problem_key: str = "problem"
    score_in_thread: bool = False  # math-verify's signal timeouts need the main thread (module docstring)

    def data_files(self, data_dir: Path) -> list[Path]:
        return [data_dir / self.path]

    def gold(self, row: dict[str, Any]) -> str:
        return str(row["answer"])

    def sample_of(self, n: int, row: dict[str, Any]) -> Sample:
        return Sample(id=str(row.get("unique_id") or row.get("id") or n),
                      messages=[{"role": "user", "content": PROMPT.format(problem=row[self.problem_key])}],
                      reference=self.gold(row), category=row.get("subject"),
                      metadata={k: row[k] for k in ("level", "subject") if k in row})

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        rows = read_jsonl(data_dir / self.path, (self.problem_key, "answer"))
        return [self.sample_of(n, row) for n, row in enumerate(rows)][:limit]

    def score(self, sample: Sample, completion: Completion) -> Score:
        ok, extracted = check_answer(str(sample.reference), completion.text)
        return Score(float(ok), extracted=extracted)


@dataclass
class GSM8K(MathBenchmark):
    def gold(self, row: dict[str, Any]) -> str:
        if "####" not in row["answer"]:
            raise BenchmarkDataError(f"gsm8k: answer without '#### <number>': {row['answer'][-80:]!r}")
        return row["answer"].rsplit("####", 1)[1].strip().replace(",", "")

    def score(self, sample: Sample, completion: Completion) -> Score:
        text = completion.text
        if last_boxed(text) is None:  # GSM8K-style "#### 42" or "The answer is 42" without a box
            m = re.search(r"(?:####|answer is)\s*\$?\s*(-?[\d,]*\.?\d+)", text, re.I)
            if m:
                text = f"\\boxed{{{m.group(1).replace(',', '')}}}"
        ok, extracted = check_answer(str(sample.reference), text.replace(",", "") if "\\boxed" in text else text)
        return Score(float(ok), extracted=extracted)


BENCHMARKS: list[Benchmark] = [
    # K2-Instruct reports no GSM8K number (K2-Base: 92.12, 8-shot); greedy, one sample.
    GSM8K(name="gsm8k", metric="avg@k", data_source="gsm8k/test.jsonl (openai/grade-school-math, 1,319)",
          k2_score=None, temperature=0.0, k=1, path="gsm8k/test.jsonl", problem_key="question"),
    MathBenchmark(name="math500", metric="avg@k", data_source="math500/test.jsonl (openai/prm800k, 500)",
                  k2_score=97.4, temperature=0.6, k=1, categories=True, path="math500/test.jsonl"),
    MathBenchmark(name="aime2025", metric="avg@k", data_source="aime2025/test.jsonl (AIME 2025 I+II, 30)",
                  k2_score=49.5, temperature=0.6, k=64, path="aime2025/test.jsonl"),
]
