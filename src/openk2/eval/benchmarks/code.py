"""Code benchmarks: HumanEval, LiveCodeBench and OJBench. Every program runs in `openk2.sandbox`.

Data layout under `--data-dir` (each directory can also be pointed at on its own, see the variables):

- ``humaneval/HumanEval.jsonl.gz``: ships in shared/data (openai/human-eval).
- ``livecodebench/test*.jsonl`` (``OPENK2_LIVECODEBENCH_DIR``): the files of Hugging Face
  ``livecodebench/code_generation_lite`` (``test.jsonl`` ... ``test6.jsonl`` is release v6). Problems are filtered by
  ``contest_date`` to a window, K2's Aug 2024 - May 2025 by default; ``OPENK2_LCB_WINDOW=2023-05-01:2025-05-31``
  (either side may be empty) or ``all`` changes it; the benchmark option ``lcb_window`` (what a CLI flag hands over
  through `Benchmark.options`) wins over the variable. ``livecodebench_dir`` / ``ojbench_dir`` options likewise.
- ``ojbench/`` (``OPENK2_OJBENCH_DIR``): a clone of Hugging Face ``He-Ren/OJBench_testdata``:
  ``prompts/full.jsonl`` plus one DMOJ problem directory per problem under ``NOI/`` or ``ICPC/`` (``init.yml``
  listing ``test_cases`` of ``{in, out}`` files, optionally inside an ``archive`` zip; without ``init.yml`` the
  directory's ``*.in`` files are paired with ``*.out``/``*.ans``). C++ items load only where ``g++`` exists.

Hidden tests stay on disk until a sample is scored: a LiveCodeBench sample's reference is the file and byte offset
of its line, decoded (base64 -> zlib -> pickle -> JSON) only then; OJBench test files are read only then.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import pickle
import re
import threading
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from openk2.eval.task import Benchmark, BenchmarkDataError, Completion, Sample, Score, ScoringInfrastructureError
from openk2.sandbox import Limits, RunResult, Sandbox
from openk2.sandbox.judge import JudgeInfrastructureError, JudgeOutcome, Program, cpp_available, judge

K2_LCB_WINDOW = "2024-08-01:2025-05-31"  # K2's LiveCodeBench v6 window (Aug 2024 - May 2025)

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#-]*)[^\n]*\n(.*?)```", re.S)
_LANGUAGE_TAGS = {"python": {"python", "python3", "py", "py3"}, "cpp": {"cpp", "c++", "cc", "cxx", "c"}}

_sandbox: Sandbox | None = None
_sandbox_lock = threading.Lock()


def code_sandbox() -> Sandbox:
    """The sandbox every code benchmark shares (its `parallel` bounds concurrent programs across threads;
    ``OPENK2_SANDBOX_PARALLEL`` sets it, default the CPU count)."""
    global _sandbox
    with _sandbox_lock:
        if _sandbox is None:
            parallel = int(os.environ.get("OPENK2_SANDBOX_PARALLEL", "0")) or None
            _sandbox = Sandbox(Limits(wall_s=10, cpu_s=10, memory_mb=2048, max_procs=32), parallel=parallel,
                               max_capture=64 << 20)
        return _sandbox


def extract_code(text: str, language: str = "python") -> str:
    """The last fenced block tagged `language` (or untagged), else the last fenced block, else the raw text."""
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    if not blocks:
        # An unclosed fence (output cut at max_tokens) still starts a code block.
        opened = re.search(r"```[ \t]*[A-Za-z0-9_+#-]*[^\n]*\n", text)
        return text[opened.end():] if opened else text
    tags = _LANGUAGE_TAGS.get(language, {language})
    matching = [body for tag, body in blocks if tag in tags or tag == ""]
    return (matching or [body for _, body in blocks])[-1]


def _open_text(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: file not found")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 (returned to the caller's with-block)


def _json_line(path: Path, number: int, line: str, required: tuple[str, ...]) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise BenchmarkDataError(f"{path}:{number}: not valid JSON ({exc})") from None
    missing = [key for key in required if not isinstance(row, dict) or key not in row]
    if missing:
        raise BenchmarkDataError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
    return row


def _failure_details(outcome: JudgeOutcome, passed: int, total: int, failure: dict[str, Any] | None) -> dict:
    details: dict[str, Any] = {"passed": passed, "tests": total}
    if outcome.compile_error is not None:
        details["compile_error"] = outcome.compile_error[-2000:]
    if failure:
        details["first_failure"] = failure
    return details


def _raise_if_not_started(result: RunResult) -> None:
    if result.killed_reason == "start-failed":
        raise ScoringInfrastructureError(f"sandbox could not start the program: {result.stderr}")


def _judge(sandbox: Sandbox, program: Program, inputs: list[str], **kwargs: Any) -> JudgeOutcome:
    try:
        return judge(sandbox, program, inputs, **kwargs)
    except JudgeInfrastructureError as exc:
        raise ScoringInfrastructureError(str(exc)) from exc


# --- HumanEval --------------------------------------------------------------------------------------------------

HUMANEVAL_PROMPT = (
    "Complete the following Python function. Reply with the complete function (including the signature and any "
    "imports it needs) in a single ```python code block.\n\n```python\n{prompt}```"
)


@dataclass
class HumanEval(Benchmark):
    """pass@k on OpenAI's 164 problems: the program is prompt + completion + the problem's tests + check(...)."""

    timeout_s: float = 10.0
    score_in_thread: bool = True  # sandbox runs overlap (bounded by the sandbox's `parallel`)

    def data_files(self, data_dir: Path) -> list[Path]:
        return [data_dir / "humaneval" / "HumanEval.jsonl.gz"]

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        path = self.data_files(data_dir)[0]
        samples = []
        with _open_text(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = _json_line(path, number, line, ("task_id", "prompt", "test", "entry_point"))
                samples.append(Sample(
                    id=row["task_id"],
                    messages=[{"role": "user", "content": HUMANEVAL_PROMPT.format(prompt=row["prompt"])}],
                    reference={"prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]},
                ))  # fmt: skip
        return samples[:limit]

    @staticmethod
    def program(reference: dict[str, Any], code: str) -> str:
        # The prompt first: a completion that is only the function body continues the prompt's def, and a whole
        # function simply redefines it (the prompt also brings the imports the problem expects).
        return f"{reference['prompt']}{code}\n\n{reference['test']}\n\ncheck({reference['entry_point']})\n"

    def score(self, sample: Sample, completion: Completion) -> Score:
        code = extract_code(completion.text, "python")
        result = code_sandbox().run(code=self.program(sample.reference, code),
                                    limits=code_sandbox().limits.with_(wall_s=self.timeout_s))
        _raise_if_not_started(result)
        details: dict[str, Any] = {}
        if not result.ok:
            details = {"returncode": result.returncode, "killed": result.killed_reason,
                       "stderr": result.stderr[-1500:]}
        return Score(float(result.ok), extracted=code, details=details)


# --- LiveCodeBench ----------------------------------------------------------------------------------------------

LCB_SYSTEM = ("You are an expert Python programmer. You will be given a question (problem specification) and will "
              "generate a correct Python program that matches the specification and passes all tests.")
LCB_STDIN_FORMAT = (
    "### Format: Read the inputs from stdin solve the problem and write the answer to the regular output. Do not "
    "directly test on the sample inputs. Enclose your code within delimiters as follows. Ensure that when the "
    "python program runs, it reads the inputs, runs the algorithm and writes output to STDOUT.\n"
    "```python\n# YOUR CODE HERE\n```\n\n"
)
LCB_CALL_FORMAT = ("### Format: You will use the following starter code to write the solution to the problem and "
                   "enclose your code within delimiters.\n```python\n{starter}\n```\n\n")
# LiveCodeBench runs solutions after these imports (lcb_runner/evaluation/testing_util.py), so solutions may
# use List, defaultdict, heapq ... without importing them.
LCB_IMPORTS = "\n".join(
    [f"from {m} import *" for m in ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math",
                                    "random", "statistics", "itertools", "functools", "operator", "io", "sys",
                                    "json", "builtins", "typing")]
    + ["import string, re, datetime, collections, heapq, bisect, copy, math, random, statistics, itertools",
       "import functools, operator, io, sys, json", "sys.setrecursionlimit(50000)", ""]
)


class _StringOnlyUnpickler(pickle.Unpickler):
    """LiveCodeBench's private tests are a pickled JSON string; refusing every class keeps a crafted data file
    from running code on the host."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a test file")


def decode_private_tests(blob: str) -> list[dict[str, Any]]:
    """LiveCodeBench's `private_test_cases`: plain JSON in early releases, base64(zlib(pickle(json))) later."""
    try:
        return json.loads(blob)
    except ValueError:
        pass
    text = _StringOnlyUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(blob.encode("ascii"))))).load()
    return json.loads(text)


def encode_private_tests(tests: list[dict[str, Any]]) -> str:
    """The inverse of `decode_private_tests` (the released format), for fixtures."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode("ascii")


def parse_window(window: str | None) -> tuple[datetime | None, datetime | None]:
    """"YYYY-MM-DD:YYYY-MM-DD" (either side may be empty; the end day is included) or "all"."""
    if not window or window.strip().lower() == "all":
        return None, None
    start, sep, end = window.partition(":")
    if not sep:
        raise ValueError(f"contest-date window {window!r}: expected START:END (e.g. {K2_LCB_WINDOW}) or 'all'")
    first = datetime.fromisoformat(start.strip()) if start.strip() else None
    last = datetime.fromisoformat(end.strip()).replace(hour=23, minute=59, second=59) if end.strip() else None
    return first, last


def lcb_outputs_match(got: str, expected: str) -> bool:
    """LiveCodeBench's stdio check: line by line after stripping, a line also matching when its tokens are equal
    as decimals ("1.0" == "1")."""
    got_lines = [line.strip() for line in got.strip().split("\n")]
    want_lines = [line.strip() for line in expected.strip().split("\n")]
    if len(got_lines) != len(want_lines):
        return False
    for mine, theirs in zip(got_lines, want_lines, strict=True):
        if mine == theirs:
            continue
        mine_tokens, their_tokens = mine.split(), theirs.split()
        if len(mine_tokens) != len(their_tokens):
            return False
        try:
            if any(Decimal(a) != Decimal(b) for a, b in zip(mine_tokens, their_tokens, strict=True)):
                return False
        except InvalidOperation:
            return False
    return True


@dataclass
class LiveCodeBench(Benchmark):
    """pass@1 on hidden tests (stdio or call-based), as lcb_runner grades code_generation_lite."""

    window: str = K2_LCB_WINDOW
    timeout_s: float = 6.0  # lcb_runner's default per-test timeout
    score_in_thread: bool = True

    def data_dir_of(self, data_dir: Path) -> Path:
        override = getattr(self, "options", {}).get("livecodebench_dir") or os.environ.get("OPENK2_LIVECODEBENCH_DIR")
        return Path(override) if override else data_dir / "livecodebench"

    def data_files(self, data_dir: Path) -> list[Path]:
        folder = self.data_dir_of(data_dir)
        # test.jsonl, test2.jsonl, ... test6.jsonl: release order, not string order (test10 after test9).
        files = sorted(folder.glob("test*.jsonl"), key=lambda p: (len(p.stem), p.stem))
        return files

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        files = self.data_files(data_dir)
        if not files:
            raise BenchmarkDataError(
                f"{self.data_dir_of(data_dir)}: no test*.jsonl files. Download them from the Hugging Face dataset "
                "livecodebench/code_generation_lite (test.jsonl ... test6.jsonl for release v6) into that "
                "directory, or set OPENK2_LIVECODEBENCH_DIR")
        options = getattr(self, "options", {})
        window = options.get("lcb_window") or os.environ.get("OPENK2_LCB_WINDOW") or self.window
        first, last = parse_window(window)
        required = ("question_id", "question_content", "contest_date", "public_test_cases", "private_test_cases")
        samples = []
        for path in files:
            with open(path, "rb") as f:
                number = 0
                while line := f.readline():
                    number += 1
                    offset = f.tell() - len(line)
                    if not line.strip():
                        continue
                    row = _json_line(path, number, line.decode("utf-8", errors="replace"), required)
                    try:
                        date = datetime.fromisoformat(str(row["contest_date"]))
                        public = json.loads(row["public_test_cases"])
                        metadata = json.loads(row.get("metadata") or "{}")
                    except (ValueError, TypeError) as exc:
                        raise BenchmarkDataError(f"{path}:{number}: bad contest_date, public_test_cases or "
                                                 f"metadata ({exc})") from None
                    if (first and date < first) or (last and date > last):
                        continue
                    starter = row.get("starter_code") or ""
                    # lcb_runner decides by metadata.func_name: call-based (LeetCode) if present, stdio otherwise.
                    call_based = bool(metadata.get("func_name"))
                    if not call_based and any(t.get("testtype") == "functional" for t in public):
                        raise BenchmarkDataError(f"{path}:{number}: functional tests but no metadata.func_name")
                    prompt = f"### Question:\n{row['question_content']}\n\n"
                    prompt += LCB_CALL_FORMAT.format(starter=starter) if starter else LCB_STDIN_FORMAT
                    prompt += "### Answer: (use the provided format with backticks)\n\n"
                    samples.append(Sample(
                        id=str(row["question_id"]),
                        messages=[{"role": "system", "content": LCB_SYSTEM}, {"role": "user", "content": prompt}],
                        reference={"file": str(path), "offset": offset, "line": number,
                                   "mode": "call" if call_based else "stdio", "func_name": metadata.get("func_name")},
                        category=row.get("difficulty"),
                        metadata={"contest_date": date.date().isoformat(), "platform": row.get("platform"),
                                  "difficulty": row.get("difficulty")},
                    ))  # fmt: skip
        return samples[:limit]

    @staticmethod
    def tests_of(reference: dict[str, Any]) -> list[dict[str, Any]]:
        """Public then hidden tests, read from the data file only now (see the module docstring)."""
        path = Path(reference["file"])
        with open(path, "rb") as f:
            f.seek(reference["offset"])
            row = _json_line(path, reference["line"], f.readline().decode("utf-8"), ("private_test_cases",))
        try:
            return json.loads(row["public_test_cases"]) + decode_private_tests(row["private_test_cases"])
        except (ValueError, zlib.error, pickle.UnpicklingError, EOFError) as exc:
            raise BenchmarkDataError(f"{path}:{reference['line']}: undecodable tests ({exc})") from None

    def score(self, sample: Sample, completion: Completion) -> Score:
        code = extract_code(completion.text, "python")
        ref = sample.reference
        tests = self.tests_of(ref)
        outcome = _judge(code_sandbox(), Program("python", LCB_IMPORTS + code), [t["input"] for t in tests],
                        mode=ref["mode"], func_name=ref["func_name"], timeout_s=self.timeout_s)
        passed, failure = 0, None
        for test, result in zip(tests, outcome.tests, strict=True):
            if result.status == "ok":
                if ref["mode"] == "call":
                    try:
                        ok = json.loads(result.output or "null") == json.loads(test["output"])
                    except ValueError:
                        ok = False
                else:
                    ok = lcb_outputs_match(result.output or "", test["output"])
                if ok:
                    passed += 1
                    continue
                failure = {"test": result.index, "status": "wrong-answer", "expected": test["output"][:300],
                           "got": (result.output or "")[:300]}
            else:
                failure = {"test": result.index, "status": result.status, "stderr": (result.stderr or "")[-1000:]}
            break  # pass@1 needs every test; the first failure is enough to report
        return Score(float(passed == len(tests) and bool(tests)), extracted=code,
                     details=_failure_details(outcome, passed, len(tests), failure))


# --- OJBench ----------------------------------------------------------------------------------------------------


def tokens_match(got: str, expected: str, precision: int | None = None) -> bool:
    """DMOJ's `standard` checker (whitespace-insensitive tokens) and, with `precision`, its `floats` checker."""
    mine, theirs = got.split(), expected.split()
    if len(mine) != len(theirs):
        return False
    for a, b in zip(mine, theirs, strict=True):
        if a == b:
            continue
        if precision is None:
            return False
        try:
            x, y = float(a), float(b)
        except ValueError:
            return False
        if abs(x - y) > 10 ** -precision * max(1.0, abs(y)):
            return False
    return True


@dataclass
class OJBench(Benchmark):
    """pass@1 = every judge test passes (OJBench's `is_passed`), Python and, where g++ exists, C++ solutions.

    Differences from OJBench's DMOJ judge: Python runs on CPython, not PyPy (a slow solution PyPy would pass can
    time out), time is wall-clock per test, and only the standard and floats checkers exist."""

    timeout_s: float = 10.0  # OJBench judges every problem with 10 s and 1 GB per test
    memory_mb: int = 1024
    score_in_thread: bool = True

    def data_dir_of(self, data_dir: Path) -> Path:
        override = getattr(self, "options", {}).get("ojbench_dir") or os.environ.get("OPENK2_OJBENCH_DIR")
        return Path(override) if override else data_dir / "ojbench"

    def data_files(self, data_dir: Path) -> list[Path]:
        return [self.data_dir_of(data_dir) / "prompts" / "full.jsonl"]

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        root = self.data_dir_of(data_dir)
        path = self.data_files(data_dir)[0]
        if not path.is_file():
            raise BenchmarkDataError(
                f"{path}: file not found. Clone the Hugging Face dataset He-Ren/OJBench_testdata (git-lfs) into "
                f"{root} (prompts/full.jsonl, NOI/, ICPC/), or set OPENK2_OJBENCH_DIR")
        languages = {"python"} | ({"cpp"} if cpp_available() else set())
        samples = []
        with _open_text(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = _json_line(path, number, line, ("id", "prompt", "dataset", "language"))
                if row["language"] not in languages:
                    continue
                problem_id = f"loj-{row['id']}" if isinstance(row["id"], int) else str(row["id"])
                problem_dir = root / str(row["dataset"]) / problem_id
                if not problem_dir.is_dir():
                    raise BenchmarkDataError(f"{path}:{number}: problem directory {problem_dir} not found")
                samples.append(Sample(
                    id=f"{problem_id}:{row['language']}",
                    messages=[{"role": "user", "content": row["prompt"]}],
                    reference={"problem_dir": str(problem_dir), "language": row["language"]},
                    category=f"{row['dataset']}/{row['language']}",
                    metadata={"difficulty": row.get("difficulty"), "dataset": row["dataset"],
                              "language": row["language"]},
                ))  # fmt: skip
        return samples[:limit]

    @staticmethod
    def tests_of(problem_dir: Path) -> tuple[list[tuple[str, str]], int | None]:
        """((input, expected output) per test, float precision or None), read from the DMOJ problem directory."""
        init = problem_dir / "init.yml"
        if not init.is_file():
            inputs = sorted(problem_dir.glob("*.in"), key=lambda p: [int(t) if t.isdigit() else t
                                                                      for t in re.split(r"(\d+)", p.name)])
            pairs = []
            for test_in in inputs:
                answer = next((a for a in (test_in.with_suffix(".out"), test_in.with_suffix(".ans")) if a.is_file()),
                              None)
                if answer is None:
                    raise BenchmarkDataError(f"{test_in}: no matching .out or .ans file")
                pairs.append((test_in.read_text(errors="replace"), answer.read_text(errors="replace")))
            if not pairs:
                raise BenchmarkDataError(f"{problem_dir}: neither init.yml nor *.in/*.out test files")
            return pairs, None
        try:
            import yaml
        except ImportError:
            raise BenchmarkDataError(f"{init}: reading DMOJ init.yml needs PyYAML (pip install pyyaml)") from None
        try:
            config = yaml.safe_load(init.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise BenchmarkDataError(f"{init}: invalid YAML ({exc})") from None
        archive = zipfile.ZipFile(problem_dir / config["archive"]) if config.get("archive") else None

        def read(name: str) -> str:
            if archive is not None and name in archive.namelist():
                return archive.read(name).decode("utf-8", errors="replace")
            file = problem_dir / name
            if not file.is_file():
                raise BenchmarkDataError(f"{init}: test file {name} not found")
            return file.read_text(encoding="utf-8", errors="replace")

        cases = []
        for case in config.get("test_cases") or []:
            cases.extend(case.get("batched") or [case])  # a batch is a group of cases scored together
        if not cases or any("in" not in c or "out" not in c for c in cases):
            raise BenchmarkDataError(f"{init}: test_cases must list {{in, out}} files")
        checker = config.get("checker") or "standard"
        name = checker.get("name") if isinstance(checker, dict) else checker
        precision = None
        if name == "floats":
            precision = int((checker.get("args") or {}).get("precision", 6)) if isinstance(checker, dict) else 6
        elif name not in ("standard", "identical"):
            # Special judges (testlib, bridged checkers) would need their checker compiled and run: not supported.
            raise BenchmarkDataError(f"{init}: checker {name!r} is not supported (standard, floats)")
        try:
            return [(read(c["in"]), read(c["out"])) for c in cases], precision
        finally:
            if archive is not None:
                archive.close()

    def score(self, sample: Sample, completion: Completion) -> Score:
        language = sample.reference["language"]
        code = extract_code(completion.text, language)
        tests, precision = self.tests_of(Path(sample.reference["problem_dir"]))
        outcome = _judge(code_sandbox(), Program(language, code), [t[0] for t in tests], timeout_s=self.timeout_s,
                        memory_mb=self.memory_mb)
        passed, failure = 0, None
        for (_, expected), result in zip(tests, outcome.tests, strict=True):
            if result.status == "ok" and tokens_match(result.output or "", expected, precision):
                passed += 1
                continue
            status = "wrong-answer" if result.status == "ok" else result.status
            failure = {"test": result.index, "status": status, "stderr": (result.stderr or "")[-1000:]}
            break
        return Score(float(passed == len(tests) and bool(tests)), extracted=code,
                     details=_failure_details(outcome, passed, len(tests), failure))


BENCHMARKS: list[Benchmark] = [
    # K2's table has no HumanEval row for K2-Instruct (EvalPlus is reported for K2-Base only).
    HumanEval(name="humaneval", metric="pass@k", data_source="humaneval/HumanEval.jsonl.gz (openai/human-eval, 164)",
              k2_score=None, temperature=0.0, k=1),
    LiveCodeBench(name="livecodebench", metric="pass@k",
                  data_source="livecodebench/test*.jsonl (HF livecodebench/code_generation_lite; user-supplied)",
                  k2_score=53.7, temperature=0.0, k=1, categories=True),
    OJBench(name="ojbench", metric="pass@k",
            data_source="ojbench/ (HF He-Ren/OJBench_testdata: prompts/full.jsonl, NOI/, ICPC/; user-supplied)",
            k2_score=27.1, temperature=0.0, k=1, categories=True),
]
