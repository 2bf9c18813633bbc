"""Rewards: failure isolation (raise / hang / NaN), composition, math and sandboxed code verifiers (including
programs that try to cheat), tool-use via env state, budget and length shaping, determinism."""

import asyncio
import time

import pytest

from openk2.rl.rewards import (
    BudgetPenalty,
    CodeReward,
    CompositeReward,
    EnvReward,
    LengthPenalty,
    MathReward,
    SafeReward,
    VerifiableReward,
    k15_length_rewards,
    score_group,
)
from openk2.rl.types import Trajectory


def traj(text: str, n_tokens: int = 4, status: str = "completed", task_type: str = "math", group: str = "g",
         **metadata) -> Trajectory:
    return Trajectory(group_id=group, prompt_ids=[1], response_ids=list(range(n_tokens)), loss_mask=[1] * n_tokens,
                      status=status, task_type=task_type, metadata={"response_text": text, **metadata})


def run(coro):
    return asyncio.run(coro)


def test_a_reward_that_raises_hangs_or_returns_nan_scores_failed_with_the_reason():
    def raises(t, task):
        raise RuntimeError("verifier crashed")

    async def hangs(t, task):
        await asyncio.sleep(60)

    def blocks(t, task):  # sync code that never yields: runs in a worker thread, abandoned at the timeout
        time.sleep(1.5)
        return 1.0

    t = traj("x")
    got = run(SafeReward(raises, failure_score=-1.0)(t, {}))
    assert got["score"] == -1.0 and "RuntimeError: verifier crashed" in got["error"]
    t0 = time.monotonic()
    got = run(SafeReward(hangs, timeout_s=0.2, name="judge")(t, {}))
    assert got == {"score": 0.0, "error": "judge: timed out after 0.2 s"}
    assert run(SafeReward(blocks, timeout_s=0.2)(t, {}))["error"].endswith("timed out after 0.2 s")
    assert time.monotonic() - t0 < 3
    assert "non-finite" in run(SafeReward(lambda t, task: float("nan"))(t, {}))["error"]
    assert "expected a number" in run(SafeReward(lambda t, task: "1")(t, {}))["error"]
    assert "without 'score'" in run(SafeReward(lambda t, task: {"ok": 1})(t, {}))["error"]


def test_math_reward_uses_the_harness_scorer():
    reward = MathReward()
    assert run(reward(traj("so the answer is \\boxed{\\frac{1}{2}}"), {"answer": "0.5"}))["score"] == 1.0
    assert run(reward(traj("\\boxed{3}"), {"answer": "4"}))["score"] == 0.0
    # Off the main thread check_answer verifies in a child process (not the string shortcut: 1/2 vs 0.5).
    assert run(MathReward(in_thread=True)(traj("\\boxed{\\frac{1}{2}}"), {"answer": "0.5"}))["score"] == 1.0
    failed = run(SafeReward(reward)(traj("\\boxed{3}"), {"question": "?"}))
    assert failed["score"] == 0.0 and "no 'answer' field (keys: question)" in failed["error"]
    with pytest.raises(ValueError, match="give the reward a tokenizer"):
        run(reward(Trajectory(group_id="g", prompt_ids=[1], response_ids=[5]), {"answer": "1"}))


CALL_TASK = {"func_name": "add", "tests": [{"input": "1\n2", "output": "3"}, {"input": "5\n-7", "output": "-2"}]}
STDIO_TASK = {"tests": [{"input": "3 4\n", "output": "7\n"}, {"input": "10 -2\n", "output": "8\n"}]}
CHEATS = {
    "exit early": "import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b",
    "os._exit": "import os\nos._exit(0)",
    "always-equal object": "class Eq:\n    def __eq__(self, o): return True\ndef add(a, b):\n    return Eq()",
    "rewrite the tests": ("import glob\nfor p in glob.glob('tests/*'):\n    open(p, 'w').write('0\\n0')\n"
                          "open('judge_spec.json', 'w').write('{}')\ndef add(a, b):\n    return 0"),
    "patch json and assert": ("import json, builtins\njson.dumps = lambda *a, **k: '3'\n"
                              "json.loads = lambda *a, **k: 3\ndef add(a, b):\n    return None"),
    "endless loop": "def add(a, b):\n    while True: pass",
}


def test_code_reward_passes_a_correct_program_and_cannot_be_fooled():
    reward = CodeReward(timeout_s=1.0)

    def score(code, task=CALL_TASK):
        return run(reward(traj(f"Here:\n```python\n{code}\n```", task_type="code"), task))

    assert score("def add(a, b):\n    return a + b")["score"] == 1.0
    good_stdio = "a, b = map(int, input().split())\nprint(a + b)"
    assert score(good_stdio, STDIO_TASK)["score"] == 1.0
    assert score("import sys\nprint(7)\nsys.exit(0)", STDIO_TASK)["score"] == 0.0  # right on one test only
    for name, cheat in CHEATS.items():
        got = score(cheat)
        assert got["score"] == 0.0 and got["passed"] < 2, name
    partial = run(CodeReward(timeout_s=1.0, partial_credit=True)(
        traj("```python\nprint(7)\n```", task_type="code"), STDIO_TASK))
    assert partial["score"] == 0.5


def test_tool_use_reward_via_the_environment_and_routing_by_task_type():
    def database_matches(t, task):
        return {"score": float(t.metadata["final_db"] == task["goal_db"]), "db_checked": True}

    reward = VerifiableReward({"tool": EnvReward(check=database_matches), "env": EnvReward(), "math": MathReward()})
    ok = traj("done", task_type="tool", final_db={"order": "cancelled"})
    assert run(reward(ok, {"goal_db": {"order": "cancelled"}})) == {"score": 1.0, "db_checked": True}
    assert run(reward(traj("", task_type="env", env_reward=0.25), {})) == 0.25
    failed = run(SafeReward(reward)(traj("", task_type="env"), {}))
    assert "did not record the environment's reward" in failed["error"]
    unknown = run(SafeReward(reward)(traj("", task_type="poetry"), {}))
    assert "no verifier for task type 'poetry'; configured: env, math, tool" in unknown["error"]


def test_budget_penalty_and_composition():
    budget = BudgetPenalty({"math": 8, "chat": 4}, penalty=0.3)
    assert budget.max_new_tokens("chat") == 4
    with pytest.raises(KeyError, match="configured: chat, math"):
        budget.max_new_tokens("code")
    with pytest.raises(ValueError, match="positive integers"):
        BudgetPenalty({"math": 0})
    reward = CompositeReward([("math", MathReward(), 1.0), ("budget", budget, 1.0)])
    truncated = run(reward(traj("\\boxed{2}", n_tokens=8, status="truncated"), {"answer": "2"}))
    assert truncated["score"] == pytest.approx(0.7) and truncated["parts"] == {"math": 1.0, "budget": -0.3}
    assert truncated["over_budget"] and truncated["correct"]
    fine = run(reward(traj("\\boxed{2}", n_tokens=3), {"answer": "2"}))
    assert fine["score"] == 1.0 and not fine["over_budget"]
    assert run(budget(traj("", n_tokens=8, status="aborted"), {}))["score"] == 0.0  # resumes next iteration


def test_k15_length_penalty():
    # K1.5 §2.3.3: λ = 0.5 − (len − min)/(max − min); correct → λ, wrong → min(0, λ)
    assert k15_length_rewards([10, 20, 30], [True, True, False]) == [0.5, 0.0, -0.5]
    assert k15_length_rewards([10, 30], [False, False]) == [0.0, -0.5]
    assert k15_length_rewards([5, 5], [True, False]) == [0.0, 0.0]
    group = [traj("\\boxed{1}", n_tokens=n) for n in (2, 6, 10)]
    penalty = LengthPenalty(weight=0.2, warmup_steps=5)
    run(score_group(group, {"answer": "1"}, MathReward(), [(penalty, 1.0)]))
    assert [t.reward for t in group] == [1.0, 1.0, 1.0]  # still warming up
    penalty.step = 5
    run(score_group(group, {"answer": "1"}, MathReward(), [(penalty, 1.0)]))
    assert [t.reward for t in group] == pytest.approx([1.1, 1.0, 0.9])


def test_score_group_isolates_failures_and_is_deterministic():
    class BrokenGroupReward:
        async def score_group(self, trajectories, task):
            raise ValueError("critic endpoint down")

    def scored():
        group = [traj(f"\\boxed{{{i}}}", n_tokens=3 + i) for i in range(4)]
        run(score_group(group, {"answer": "2"}, CompositeReward([("m", MathReward(), 1.0)]),
                        [(BrokenGroupReward(), 1.0), (LengthPenalty(0.1), 1.0)]))
        return [(t.reward, t.reward_info) for t in group]

    first = scored()
    group = [traj("\\boxed{1}"), traj("\\boxed{2}")]
    run(score_group(group, {}, MathReward(), mark_failed=True))  # no "answer": every sample's reward fails
    assert [t.status for t in group] == ["failed", "failed"] and "no 'answer' field" in group[0].reward_info["error"]
    assert [r for r, _ in first] == pytest.approx([0.0, 0.0, 1.0 + 0.1 * (0.5 - 2 / 3), -0.05])
    assert all(info["group_reward_error"] == "BrokenGroupReward: ValueError: critic endpoint down" for _, info in first)
    assert scored() == first


def test_budget_penalty_is_the_controllers_shaping():
    from openk2.rl.config import RLConfigError, load_rl_config

    cfg = load_rl_config(None, ["rollout.max_new_tokens={digits = 12, 'digits/add' = 6}",
                                "rollout.truncation_penalty=0.25"])
    budget = cfg.budget_penalty()
    assert budget.max_new_tokens("digits/add") == 6 and budget.max_new_tokens("digits/sort") == 12
    assert budget.max_new_tokens("bench:gsm8k") == cfg.rollout.default_max_new_tokens
    cut = traj("1 2", n_tokens=12, status="truncated", task_type="digits/sort")
    cut.reward_info["truncated"] = "token budget"
    turns = traj("", n_tokens=40, status="truncated", task_type="world/lookup")
    turns.reward_info["truncated"] = "env"  # the environment's turn limit, not the token budget
    assert budget.score(cut) == -0.25 and budget.score(turns) == 0.0
    with pytest.raises(RLConfigError, match="positive integers"):
        load_rl_config(None, ["rollout.max_new_tokens={digits = 0}"])
