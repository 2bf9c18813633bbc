"""openk2.sandbox.judge: one sandbox run per sample, a child per test, outputs compared by the caller."""

from __future__ import annotations

import shutil

import pytest

from openk2.sandbox import Limits, Sandbox
from openk2.sandbox.judge import JudgeInfrastructureError, Program, judge

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(Limits(wall_s=10), parallel=2)


def test_stdio_outputs_and_stop_at_first_crash(sandbox: Sandbox) -> None:
    outcome = judge(sandbox, Program("python", ADD), ["1 2\n", "3 4\n", "x y\n", "5 6\n"], timeout_s=2)
    assert [t.status for t in outcome.tests] == ["ok", "ok", "runtime-error", "not-run"]
    assert [t.output for t in outcome.tests[:2]] == ["3\n", "7\n"]
    assert "ValueError" in (outcome.tests[2].stderr or "")
    assert outcome.first_failure() is outcome.tests[2]


@pytest.mark.parametrize("reader", [
    "a, b = map(int, input().split())\nprint(a + b)",
    "import sys\nprint(sum(map(int, sys.stdin.buffer.read().split())))",
    "print(sum(map(int, open(0).read().split())))\nexit(0)",
    "import sys\nsys.__stdout__.write(str(sum(map(int, sys.stdin.readline().split()))) + '\\n')",
])
def test_the_ways_solutions_read_and_write(sandbox: Sandbox, reader: str) -> None:
    outcome = judge(sandbox, Program("python", reader + "\n"), ["1 2\n", "30 4\n"], timeout_s=2)
    assert [t.output for t in outcome.tests] == ["3\n", "34\n"]


def test_call_mode_and_timeouts(sandbox: Sandbox) -> None:
    source = "class Solution:\n    def pair(self, a, b):\n        return (b, a)\n"
    outcome = judge(sandbox, Program("python", source), ["1\n[2]", '"x"\nnull'], mode="call", func_name="pair")
    assert [t.output for t in outcome.tests] == ['[[2], 1]', '[null, "x"]']
    slow = judge(sandbox, Program("python", "while True:\n    pass\n"), ["\n", "\n"], timeout_s=1)
    assert [t.status for t in slow.tests] == ["timeout", "not-run"]


def test_per_test_memory_limit(sandbox: Sandbox) -> None:
    hog = "x = bytearray(int(input()) << 20)\nprint(len(x) >> 20)\n"
    outcome = judge(sandbox, Program("python", hog), ["16\n", "3000\n"], memory_mb=256, stop_on_failure=False)
    assert outcome.tests[0].output == "16\n" and outcome.tests[1].status == "runtime-error"


def test_a_solution_that_kills_its_runner_scores_nothing(sandbox: Sandbox) -> None:
    source = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint(3)\n"
    outcome = judge(sandbox, Program("python", source), ["1 2\n", "3 4\n"], timeout_s=2)
    assert all(t.status != "ok" for t in outcome.tests)  # and no JudgeInfrastructureError: it is the solution's doing


def test_a_broken_runner_is_an_infrastructure_error() -> None:
    broken = Sandbox(Limits(wall_s=5), parallel=1, python="/nonexistent/python3")
    with pytest.raises(JudgeInfrastructureError, match="failed to start"):
        judge(broken, Program("python", ADD), ["1 2\n"])


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cpp_compile_run_and_crash(sandbox: Sandbox) -> None:
    source = ("#include <cstdio>\nint main(){int a,b;scanf(\"%d %d\",&a,&b);if(a<0){int*p=nullptr;*p=1;}"
              "printf(\"%d\\n\",a+b);}\n")
    outcome = judge(sandbox, Program("cpp", source), ["1 2\n", "-1 0\n"], timeout_s=2)
    assert outcome.compile_error is None
    assert outcome.tests[0].output == "3\n" and outcome.tests[1].status == "runtime-error"
    failed = judge(sandbox, Program("cpp", "int main( {"), ["1 2\n"])
    assert failed.compile_error and failed.tests[0].status == "not-run"
