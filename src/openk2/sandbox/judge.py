"""Judge a program against many test inputs in one sandbox run (one process per sample, one child per test).

    outcome = judge(sandbox, Program("python", source), inputs=["1 2\\n", "3 4\\n"], mode="stdio", timeout_s=6)
    [t.output for t in outcome.tests]  # what the program printed for each input, compared by the caller

The runner (`_judge_runner.py`) compiles once (C++: g++), then forks a child per test with its own CPU and memory
limits and stops at the first crash or timeout. Expected outputs stay on the host: callers compare
`TestOutcome.output` with their checker, so nothing inside the sandbox can read the answers.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from openk2.sandbox.core import Limits, RunResult, Sandbox

_RUNNER_SOURCE = (Path(__file__).with_name("_judge_runner.py")).read_text(encoding="utf-8")
CPP_COMPILE = ["g++", "-std=c++17", "-O2", "-pipe", "-o", "solution", "solution.cpp"]


class JudgeInfrastructureError(RuntimeError):
    """The judge runner failed before any solution code ran (its interpreter missing or closed to the sandbox's
    uid, ...): a fault of the machine, not of the program being judged."""


@dataclass
class Program:
    language: str  # "python" or "cpp"
    source: str


@dataclass
class TestOutcome:
    index: int
    status: str  # "ok", "timeout", "runtime-error", "not-run"
    output: str | None = None  # stdout (stdio mode) or the JSON of the return value (call mode)
    time_s: float | None = None
    stderr: str | None = None


@dataclass
class JudgeOutcome:
    tests: list[TestOutcome] = field(default_factory=list)
    compile_error: str | None = None
    sandbox: RunResult | None = None  # the runner's own run (its stderr says what went wrong if it died)

    def first_failure(self) -> TestOutcome | None:
        return next((t for t in self.tests if t.status != "ok"), None)


def cpp_available() -> bool:
    return shutil.which("g++") is not None


def judge(
    sandbox: Sandbox,
    program: Program,
    inputs: Sequence[str],
    *,
    mode: str = "stdio",
    func_name: str | None = None,
    timeout_s: float = 6.0,
    memory_mb: int | None = None,
    stop_on_failure: bool = True,
    compile_timeout_s: float = 60.0,
) -> JudgeOutcome:
    """Run `program` on each of `inputs` (stdin text; in call mode one JSON argument per line) and return what it
    printed or returned per test. Tests after the first crash or timeout are "not-run" when `stop_on_failure`."""
    if mode not in ("stdio", "call"):
        raise ValueError(f"mode must be 'stdio' or 'call', not {mode!r}")
    if mode == "call" and (program.language != "python" or not func_name):
        raise ValueError("call mode needs a Python program and func_name")
    files: dict[str, str | bytes] = {f"tests/{i}.in": text for i, text in enumerate(inputs)}
    files["judge_runner.py"] = _RUNNER_SOURCE
    spec: dict[str, object] = {
        "mode": mode, "func_name": func_name, "timeout_s": timeout_s, "memory_mb": memory_mb,
        "n_tests": len(inputs), "stop_on_failure": stop_on_failure, "compile_timeout_s": compile_timeout_s,
    }  # fmt: skip
    if program.language == "python":
        files["solution.py"] = program.source
        spec.update(language="python", source="solution.py")
    elif program.language == "cpp":
        files["solution.cpp"] = program.source
        spec.update(language="exec", binary="./solution", compile=CPP_COMPILE)
    else:
        raise ValueError(f"unsupported language {program.language!r} (python, cpp)")
    files["judge_spec.json"] = json.dumps(spec)
    # The whole run: every test at its limit plus a second each, the compile, and start-up (LiveCodeBench's
    # process timeout has the same shape). Compilers need more address space than the tests get.
    base = sandbox.limits
    wall = (timeout_s + 1) * len(inputs) + 5 + (compile_timeout_s if program.language == "cpp" else 0)
    limits = Limits(
        wall_s=wall, cpu_s=math.ceil(wall), memory_mb=max(base.memory_mb, (memory_mb or 0) + 512, 2048),
        max_procs=base.max_procs, output_mb=max(base.output_mb, 256), open_files=base.open_files,
    )  # fmt: skip
    run = sandbox.run([sandbox.python, "-I", "-B", "judge_runner.py"], files=files, limits=limits)
    outcome = JudgeOutcome(sandbox=run)
    seen: dict[int, TestOutcome] = {}
    lines = run.stdout.splitlines()
    if not lines or lines[0] != '{"started": true}':
        # Deaths after that line may be the solution's doing (it can kill its runner) and score 0; before it, no
        # solution code had run, so the judge itself is broken.
        raise JudgeInfrastructureError(f"judge runner failed to start (exit {run.returncode}, "
                                       f"{run.killed_reason or 'no signal'}): {run.stderr[-1000:]}")
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a truncated last line when the runner was killed
        if not isinstance(record, dict):
            continue
        if "compile_error" in record:
            outcome.compile_error = str(record["compile_error"])
            break
        index = record.get("i")
        if isinstance(index, int) and 0 <= index < len(inputs):
            seen[index] = TestOutcome(index, str(record.get("status")), record.get("output"), record.get("time"),
                                      record.get("stderr"))
    for index in range(len(inputs)):
        if index in seen:
            outcome.tests.append(seen[index])
        else:
            status = "not-run"
            if outcome.compile_error is None and not any(t.status != "ok" for t in seen.values()):
                # The runner itself died or ran out of time before reaching this test.
                status = "timeout" if run.timed_out else "runtime-error"
            outcome.tests.append(TestOutcome(index, status, stderr=run.stderr[-2000:] or None))
    return outcome
