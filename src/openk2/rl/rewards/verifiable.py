"""Verifiable rewards: math answers (the harness's math-verify scorer), code run against tests in the sandbox,
and tool use judged by the environment's own state.

Code: the tests' expected outputs never enter the sandbox. The program runs once per test input through
`openk2.sandbox.judge` (each test in a fresh child process) and the host compares what it printed (stdio) or
returned (call mode) with the expected value. So a program that exits early (`sys.exit(0)`, `os._exit(0)`)
prints or returns nothing and fails; one that rewrites the test files, patches `assert`/`json`/`print`, or returns
an object whose `__eq__` is always true changes nothing the host compares. (Appending `assert` tests to the
program and trusting its exit status, as HumanEval's harness does, is open to all of these; the RL reward does
not do that.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from openk2.rl.rewards.base import call_reward, response_text
from openk2.rl.types import Trajectory


def _field(task: Any, key: str) -> Any:
    if isinstance(task, dict):
        if key not in task:
            raise KeyError(f"the task has no {key!r} field (keys: {', '.join(map(str, task)) or 'none'})")
        return task[key]
    if not hasattr(task, key):
        raise KeyError(f"the task ({type(task).__name__}) has no {key!r} attribute")
    return getattr(task, key)


@dataclass
class MathReward:
    """1.0 when the response's final answer (last \\boxed{}, else the last expression) equals `task[answer_key]`
    under math-verify, else 0.0 (`openk2.eval.benchmarks.math.check_answer`, the harness's scorer).

    By default the check runs on the event loop's thread (bounded by math-verify's signal timeouts, which need the
    main thread; a check blocks the loop for up to a few seconds). `in_thread=True` runs it in a worker thread,
    where `check_answer` switches to a child process with a wall-clock limit: slower per call, never blocks."""

    tokenizer: Any = None
    answer_key: str = "answer"
    in_thread: bool = False

    async def __call__(self, trajectory: Trajectory, task: Any) -> dict[str, Any]:
        from openk2.eval.benchmarks.math import check_answer

        gold = str(_field(task, self.answer_key))
        text = response_text(trajectory, self.tokenizer)
        if self.in_thread:
            correct, extracted = await asyncio.to_thread(check_answer, gold, text)
        else:
            correct, extracted = check_answer(gold, text)
        return {"score": float(correct), "correct": correct, "extracted": extracted}


@dataclass
class CodeReward:
    """Run the response's code (the last fenced block, as the code benchmarks extract it) on the task's tests in
    the sandbox. `task["tests"]`: `[{"input": stdin text, "output": expected stdout}]`, or with
    `task["func_name"]` (call mode) `[{"input": one JSON argument per line, "output": JSON of the return value}]`.
    Score: 1.0 when every test passes (`partial_credit`: the passing fraction)."""

    tokenizer: Any = None
    timeout_s: float = 6.0
    memory_mb: int | None = 512
    partial_credit: bool = False
    language: str = "python"

    def check(self, code: str, task: Any) -> dict[str, Any]:
        from openk2.eval.benchmarks.code import code_sandbox, lcb_outputs_match
        from openk2.sandbox.judge import Program, judge

        tests = _field(task, "tests")
        func_name = task.get("func_name") if isinstance(task, dict) else getattr(task, "func_name", None)
        if not tests:
            raise ValueError("the task has no tests")
        outcome = judge(code_sandbox(), Program(self.language, code), [t["input"] for t in tests],
                        mode="call" if func_name else "stdio", func_name=func_name, timeout_s=self.timeout_s,
                        memory_mb=self.memory_mb, stop_on_failure=not self.partial_credit)
        passed, first_failure = 0, None
        for test, result in zip(tests, outcome.tests, strict=True):
            ok = False
            if result.status == "ok" and result.output is not None:
                if func_name:
                    try:
                        ok = json.loads(result.output) == json.loads(test["output"])
                    except ValueError:
                        ok = False
                else:
                    ok = lcb_outputs_match(result.output, test["output"])
            passed += ok
            if not ok and first_failure is None:
                first_failure = {"test": result.index, "status": result.status if result.status != "ok"
                                 else "wrong-answer", "stderr": (result.stderr or "")[-500:]}
        score = passed / len(tests) if self.partial_credit else float(passed == len(tests))
        info: dict[str, Any] = {"score": score, "passed": passed, "tests": len(tests)}
        if outcome.compile_error:
            info["compile_error"] = outcome.compile_error[-1000:]
        if first_failure:
            info["first_failure"] = first_failure
        return info

    async def __call__(self, trajectory: Trajectory, task: Any) -> dict[str, Any]:
        from openk2.eval.benchmarks.code import extract_code

        code = extract_code(response_text(trajectory, self.tokenizer), self.language)
        return await asyncio.to_thread(self.check, code, task)  # the sandbox blocks for seconds


@dataclass
class EnvReward:
    """Tool use judged by the environment: `check(trajectory, task)` (sync or async; the env hands it over, e.g. a
    comparison of the database state with the task's goal state plus the required answers), else the final
    reward the env's `step` returned, which the rollout stores in `trajectory.metadata[key]`."""

    check: Callable[[Trajectory, Any], Any] | None = None
    key: str = "env_reward"

    async def __call__(self, trajectory: Trajectory, task: Any) -> Any:
        if self.check is not None:
            return await call_reward(self.check, trajectory, task)
        if self.key not in trajectory.metadata:
            raise KeyError(f"the trajectory has no metadata[{self.key!r}]: the rollout did not record the "
                           f"environment's reward (or pass EnvReward(check=...))")
        return trajectory.metadata[self.key]





@dataclass
class VerifiableReward:
    """Route each trajectory to the verifier of its `task_type` (e.g. {"math": MathReward(tok), "code":
    CodeReward(tok), "tool": EnvReward()}); `default` catches the rest when given."""

    by_task_type: dict[str, Callable[[Trajectory, Any], Any]]
    default: Callable[[Trajectory, Any], Any] | None = None

    async def __call__(self, trajectory: Trajectory, task: Any) -> Any:
        verifier = self.by_task_type.get(trajectory.task_type, self.default)
        if verifier is None:
            raise KeyError(f"no verifier for task type {trajectory.task_type!r}; configured: "
                           f"{', '.join(sorted(self.by_task_type))}")
        return await call_reward(verifier, trajectory, task)
__all__ = ["CodeReward", "EnvReward", "MathReward", "VerifiableReward"]
