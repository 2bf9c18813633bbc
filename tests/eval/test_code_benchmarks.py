"""Code benchmarks: HumanEval on the shipped data, LiveCodeBench and OJBench on small fixtures written here in their
public formats. Every program runs in openk2.sandbox."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from openk2.eval.benchmarks.code import (
    BENCHMARKS,
    HumanEval,
    LiveCodeBench,
    OJBench,
    code_sandbox,
    decode_private_tests,
    encode_private_tests,
    extract_code,
    lcb_outputs_match,
    parse_window,
)
from openk2.eval.task import BenchmarkDataError, Completion

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
if not (SHARED_DATA / "humaneval").is_dir():
    SHARED_DATA = Path("/work/shared/data")
BY_NAME = {b.name: b for b in BENCHMARKS}


def fenced(code: str, language: str = "python") -> str:
    return f"Here is my solution.\n\n```{language}\n{code}```\n\nIt runs in O(n)."


def test_registered_names_and_k2_scores() -> None:
    assert set(BY_NAME) == {"humaneval", "livecodebench", "ojbench"}
    assert BY_NAME["livecodebench"].k2_score == 53.7 and BY_NAME["ojbench"].k2_score == 27.1
    assert BY_NAME["humaneval"].k2_score is None
    assert all(b.metric == "pass@k" for b in BENCHMARKS)


def test_extract_code() -> None:
    assert extract_code(fenced("print(1)\n")) == "print(1)\n"
    two = "```python\nfirst()\n```\ntext\n```python\nsecond()\n```"
    assert extract_code(two) == "second()\n"
    mixed = "```cpp\nint main(){}\n```\n```python\nx = 1\n```\n```text\noutput\n```"
    assert extract_code(mixed, "python") == "x = 1\n" and extract_code(mixed, "cpp") == "int main(){}\n"
    assert extract_code("    return 1\n") == "    return 1\n"  # raw text (a completion-style continuation)
    assert extract_code("```python\ndef f():\n    return 1\n") == "def f():\n    return 1\n"  # cut-off fence


# --- HumanEval ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def humaneval_rows() -> dict[str, dict]:
    path = SHARED_DATA / "humaneval" / "HumanEval.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return {row["task_id"]: row for row in map(json.loads, f)}


def test_humaneval_canonical_solutions_pass_164_of_164(humaneval_rows: dict[str, dict]) -> None:
    bench = BY_NAME["humaneval"]
    samples = bench.load(SHARED_DATA)
    assert len(samples) == 164
    with ThreadPoolExecutor(max_workers=code_sandbox().parallel) as pool:
        scores = list(pool.map(lambda s: bench.score(s, Completion(humaneval_rows[s.id]["canonical_solution"])),
                               samples))
    failed = {s.id: sc.details for s, sc in zip(samples, scores, strict=True) if sc.value != 1.0}
    assert failed == {}


def test_humaneval_wrong_and_chat_style_solutions() -> None:
    bench = HumanEval(name="humaneval", timeout_s=1.5)
    sample = next(s for s in bench.load(SHARED_DATA, limit=3) if s.id == "HumanEval/2")  # truncate_number
    wrong = bench.score(sample, Completion("    return number\n"))
    assert wrong.value == 0.0 and "AssertionError" in wrong.details["stderr"]
    whole_function = "def truncate_number(number: float) -> float:\n    return number % 1.0\n"
    assert bench.score(sample, Completion(fenced(whole_function))).value == 1.0
    looping = bench.score(sample, Completion("    while True:\n        pass\n"))
    assert looping.value == 0.0 and looping.details["killed"] in ("wall-time", "cpu-time")


def test_humaneval_missing_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkDataError, match="HumanEval.jsonl.gz: file not found"):
        HumanEval(name="humaneval").load(tmp_path)
    (tmp_path / "humaneval").mkdir()
    with gzip.open(tmp_path / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps({"task_id": "t/0", "prompt": "", "test": "", "entry_point": "f"}) + "\n{oops\n")
    with pytest.raises(BenchmarkDataError, match=r"HumanEval\.jsonl\.gz:2: not valid JSON"):
        HumanEval(name="humaneval").load(tmp_path)


# --- LiveCodeBench ------------------------------------------------------------------------------------------------

STDIO_PROBLEM = dict(question_id="abc001_a", question_title="Sum", platform="atcoder", contest_id="abc001",
                     contest_date="2024-09-14T00:00:00", starter_code="", difficulty="easy",
                     question_content="Read two integers and print their sum.", metadata="{}")
CALL_PROBLEM = dict(question_id="lc-two-max", question_title="Largest", platform="leetcode", contest_id="weekly-430",
                    contest_date="2025-01-05T00:00:00", difficulty="medium",
                    starter_code="class Solution:\n    def largest(self, nums: List[int], k: int) -> List[int]:\n",
                    question_content="Return the k largest numbers in decreasing order.",
                    metadata=json.dumps({"func_name": "largest"}))
OLD_PROBLEM = dict(STDIO_PROBLEM, question_id="abc000_a", contest_date="2023-06-01T00:00:00")

STDIO_TESTS = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
               {"input": "10 -4\n", "output": "6\n", "testtype": "stdin"}]
STDIO_HIDDEN = [{"input": f"{a} {a * 7}\n", "output": f"{a * 8}\n", "testtype": "stdin"} for a in range(5)]
CALL_TESTS = [{"input": "[3, 1, 2]\n2", "output": "[3, 2]", "testtype": "functional"}]
CALL_HIDDEN = [{"input": "[5, 5, 1, 9]\n3", "output": "[9, 5, 5]", "testtype": "functional"},
               {"input": "[-1]\n1", "output": "[-1]", "testtype": "functional"}]

STDIO_SOLUTION = "a, b = map(int, input().split())\nprint(a + b)\n"
CALL_SOLUTION = ("class Solution:\n    def largest(self, nums: List[int], k: int) -> List[int]:\n"
                 "        return heapq.nlargest(k, nums)\n")  # uses LiveCodeBench's implicit imports


def _lcb_row(problem: dict, public: list, hidden: list, encoded: bool = True) -> str:
    private = encode_private_tests(hidden) if encoded else json.dumps(hidden)
    return json.dumps(dict(problem, public_test_cases=json.dumps(public), private_test_cases=private))


@pytest.fixture
def lcb_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "livecodebench"
    folder.mkdir()
    # Two release files, as code_generation_lite ships them; the old one uses plain-JSON private tests.
    (folder / "test.jsonl").write_text(_lcb_row(OLD_PROBLEM, STDIO_TESTS, STDIO_HIDDEN, encoded=False) + "\n")
    rows = [_lcb_row(STDIO_PROBLEM, STDIO_TESTS, STDIO_HIDDEN), _lcb_row(CALL_PROBLEM, CALL_TESTS, CALL_HIDDEN)]
    (folder / "test2.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_lcb_private_tests_round_trip_and_refuse_code() -> None:
    assert decode_private_tests(encode_private_tests(STDIO_HIDDEN)) == STDIO_HIDDEN
    assert decode_private_tests(json.dumps(STDIO_HIDDEN)) == STDIO_HIDDEN

    class Evil:
        def __reduce__(self):  # what a crafted data file could carry
            return (os.system, ("echo pwned",))

    import base64
    import zlib

    crafted = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        decode_private_tests(crafted)


def test_lcb_window_and_lazy_tests(lcb_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENK2_LCB_WINDOW", raising=False)
    bench = LiveCodeBench(name="livecodebench")
    samples = bench.load(lcb_dir)
    assert [s.id for s in samples] == ["abc001_a", "lc-two-max"]  # K2's window drops the 2023 problem
    assert all("input" not in json.dumps(s.reference) for s in samples)  # tests are not held in memory
    assert samples[1].reference["mode"] == "call" and samples[0].reference["mode"] == "stdio"
    assert "starter code" in samples[1].messages[1]["content"] and "stdin" in samples[0].messages[1]["content"]
    monkeypatch.setenv("OPENK2_LCB_WINDOW", "all")
    assert len(bench.load(lcb_dir)) == 3
    monkeypatch.setenv("OPENK2_LCB_WINDOW", "2024-09-14:2024-09-14")
    assert [s.id for s in bench.load(lcb_dir)] == ["abc001_a"]
    bench.options = {"lcb_window": "all"}  # what the harness hands over from a CLI flag wins over the variable
    assert len(bench.load(lcb_dir)) == 3
    assert parse_window("all") == (None, None)
    with pytest.raises(ValueError, match="START:END"):
        parse_window("2024-08-01")


def test_lcb_scores_stdio_and_call_based(lcb_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENK2_LCB_WINDOW", raising=False)
    bench = LiveCodeBench(name="livecodebench", timeout_s=2.0)
    stdio, call = bench.load(lcb_dir)
    good = bench.score(stdio, Completion(fenced(STDIO_SOLUTION)))
    assert good.value == 1.0 and good.details["passed"] == 7, good.details
    # Passes the public tests, fails a hidden one: pass@1 needs all.
    overfit = "a, b = map(int, input().split())\nprint(3 if (a, b) == (1, 2) else 6 if a == 10 else -1)\n"
    hidden_fail = bench.score(stdio, Completion(fenced(overfit)))
    assert hidden_fail.value == 0.0 and hidden_fail.details["first_failure"]["status"] == "wrong-answer"
    assert hidden_fail.details["passed"] == 2
    slow = bench.score(stdio, Completion(fenced("import time\ntime.sleep(30)\n")))
    assert slow.value == 0.0 and slow.details["first_failure"]["status"] == "timeout"
    assert bench.score(call, Completion(fenced(CALL_SOLUTION))).value == 1.0
    wrong_call = bench.score(call, Completion(fenced(CALL_SOLUTION.replace("nlargest", "nsmallest"))))
    assert wrong_call.value == 0.0


def test_lcb_output_comparison() -> None:
    assert lcb_outputs_match("3\n", "3")
    assert lcb_outputs_match("1.0 2\n", "1 2.00")
    assert lcb_outputs_match("a b  \n\n", "a b")
    assert not lcb_outputs_match("1 2", "1 3") and not lcb_outputs_match("1\n2", "1")


def test_lcb_missing_and_malformed_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENK2_LIVECODEBENCH_DIR", raising=False)
    bench = LiveCodeBench(name="livecodebench")
    with pytest.raises(BenchmarkDataError, match="code_generation_lite"):
        bench.load(tmp_path)
    folder = tmp_path / "livecodebench"
    folder.mkdir()
    (folder / "test.jsonl").write_text(_lcb_row(STDIO_PROBLEM, STDIO_TESTS, STDIO_HIDDEN) + "\n{not json\n")
    with pytest.raises(BenchmarkDataError, match=r"test\.jsonl:2: not valid JSON"):
        bench.load(tmp_path)
    (folder / "test.jsonl").write_text(json.dumps({"question_id": "x"}) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"test\.jsonl:1: missing field\(s\) question_content"):
        bench.load(tmp_path)
    (folder / "test.jsonl").write_text(_lcb_row(dict(STDIO_PROBLEM, contest_date="soon"), STDIO_TESTS, []) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"test\.jsonl:1: bad contest_date"):
        bench.load(tmp_path)
    (folder / "test.jsonl").write_text(_lcb_row(dict(CALL_PROBLEM, metadata="{}"), CALL_TESTS, []) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"test\.jsonl:1: functional tests but no metadata.func_name"):
        bench.load(tmp_path)
    # A corrupt hidden-test blob is found when scoring (lazily), still naming file and line.
    row = json.loads(_lcb_row(STDIO_PROBLEM, STDIO_TESTS, []))
    row["private_test_cases"] = "bm90IHpsaWI="
    (folder / "test.jsonl").write_text("\n" + json.dumps(row) + "\n")
    sample = bench.load(tmp_path)[0]
    with pytest.raises(BenchmarkDataError, match=r"test\.jsonl:2: undecodable tests"):
        bench.score(sample, Completion(STDIO_SOLUTION))
    monkeypatch.setenv("OPENK2_LIVECODEBENCH_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(BenchmarkDataError, match="elsewhere"):
        bench.load(tmp_path)


# --- OJBench ------------------------------------------------------------------------------------------------------

OJ_PROMPT = "Given n and n integers, print their maximum. Write the solution in {language}."
PY_MAX = "n = int(input())\nprint(max(map(int, input().split())))\n"
CPP_MAX = ("#include <cstdio>\nint main(){int n;scanf(\"%d\",&n);long long best=-1e18,x;"
           "for(int i=0;i<n;i++){scanf(\"%lld\",&x);if(x>best)best=x;}printf(\"%lld\\n\",best);}\n")
PY_HALF = "print(int(input()) / 2)\n"


@pytest.fixture
def oj_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ojbench"
    rows = []
    for language in ("python", "cpp"):
        rows.append({"id": 1001, "prompt": OJ_PROMPT.format(language=language), "dataset": "NOI",
                     "language": language, "difficulty": "easy"})
    rows.append({"id": "icpc2023_half", "prompt": "Print n / 2.", "dataset": "ICPC", "language": "python",
                 "difficulty": "hard"})
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "full.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # NOI problem in DMOJ layout: init.yml listing its cases.
    noi = root / "NOI" / "loj-1001"
    noi.mkdir(parents=True)
    cases = [("3\n1 5 2\n", "5\n"), ("1\n-7\n", "-7\n"), ("4\n9 9 9 10\n", "10\n")]
    for i, (test_in, test_out) in enumerate(cases, 1):
        (noi / f"{i}.in").write_text(test_in)
        (noi / f"{i}.out").write_text(test_out)
    (noi / "init.yml").write_text("test_cases:\n" + "".join(f"- {{in: {i}.in, out: {i}.out, points: 1}}\n"
                                                             for i in range(1, 4)))
    # ICPC problem: no init.yml, *.in / *.ans pairs; float answers checked with the floats checker when configured.
    icpc = root / "ICPC" / "icpc2023_half"
    icpc.mkdir(parents=True)
    for i, n in enumerate((3, 10), 1):
        (icpc / f"{i}.in").write_text(f"{n}\n")
        (icpc / f"{i}.ans").write_text(f"{n / 2}\n")
    return tmp_path


def test_ojbench_python_and_cpp(oj_dir: Path) -> None:
    bench = OJBench(name="ojbench", timeout_s=2.0)
    samples = {s.id: s for s in bench.load(oj_dir)}
    expected = {"loj-1001:python", "icpc2023_half:python"} | ({"loj-1001:cpp"} if shutil.which("g++") else set())
    assert set(samples) == expected
    assert bench.score(samples["loj-1001:python"], Completion(fenced(PY_MAX))).value == 1.0
    wrong = bench.score(samples["loj-1001:python"], Completion(fenced(PY_MAX.replace("max", "min"))))
    assert wrong.value == 0.0 and wrong.details["first_failure"]["status"] == "wrong-answer"
    assert bench.score(samples["icpc2023_half:python"], Completion(fenced(PY_HALF))).value == 1.0
    if "loj-1001:cpp" in samples:
        cpp = samples["loj-1001:cpp"]
        assert bench.score(cpp, Completion(fenced(PY_MAX) + "\n" + fenced(CPP_MAX, "cpp"))).value == 1.0
        broken = bench.score(cpp, Completion(fenced("int main( { }", "cpp")))
        assert broken.value == 0.0 and "error" in broken.details["compile_error"]


def test_ojbench_floats_checker_and_bad_data(oj_dir: Path) -> None:
    bench = OJBench(name="ojbench", timeout_s=2.0)
    problem = oj_dir / "ojbench" / "ICPC" / "icpc2023_half"
    (problem / "init.yml").write_text("checker: {name: floats, args: {precision: 3}}\n"
                                      "test_cases:\n- {in: 1.in, out: 1.ans}\n- {in: 2.in, out: 2.ans}\n")
    sample = next(s for s in bench.load(oj_dir) if s.id.startswith("icpc"))
    assert bench.score(sample, Completion(fenced('print(f"{int(input()) / 2:.4f}")\n'))).value == 1.0
    assert bench.score(sample, Completion(fenced("print(int(input()) // 2)\n"))).value == 0.0
    (problem / "init.yml").write_text("checker: custom.py\ntest_cases:\n- {in: 1.in, out: 1.ans}\n")
    with pytest.raises(BenchmarkDataError, match=r"init\.yml: checker 'custom.py' is not supported"):
        bench.score(sample, Completion(PY_HALF))
    (problem / "init.yml").write_text("checker: {name: standard}\ntest_cases:\n- {in: 1.in, out: 1.ans}\n")
    assert bench.score(sample, Completion(PY_HALF)).value == 1.0
    (problem / "init.yml").write_text("checker: {name: bridged, args: {files: checker.cpp}}\ntest_cases: []\n")
    with pytest.raises(BenchmarkDataError, match=r"init\.yml: test_cases must list"):
        bench.score(sample, Completion(PY_HALF))
    shutil.rmtree(problem)
    with pytest.raises(BenchmarkDataError, match=r"full\.jsonl:3: problem directory .*icpc2023_half not found"):
        bench.load(oj_dir)
    with pytest.raises(BenchmarkDataError, match="OJBench_testdata"):
        bench.load(oj_dir / "nowhere")


def test_ojbench_tests_inside_an_archive(oj_dir: Path) -> None:
    import zipfile

    problem = oj_dir / "ojbench" / "NOI" / "loj-1001"
    with zipfile.ZipFile(problem / "data.zip", "w") as archive:
        archive.writestr("a.in", "2\n4 8\n")
        archive.writestr("a.out", "8\n")
    for name in ("1.in", "1.out", "2.in", "2.out", "3.in", "3.out"):
        (problem / name).unlink()
    (problem / "init.yml").write_text("archive: data.zip\ntest_cases:\n- batched:\n  - {in: a.in, out: a.out}\n")
    tests, precision = OJBench.tests_of(problem)
    assert tests == [("2\n4 8\n", "8\n")] and precision is None
    sample = next(s for s in OJBench(name="ojbench").load(oj_dir) if s.id == "loj-1001:python")
    assert OJBench(name="ojbench", timeout_s=2.0).score(sample, Completion(fenced(PY_MAX))).value == 1.0
