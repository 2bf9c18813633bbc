"""τ²-bench scoring: DB, ENV_ASSERTION, COMMUNICATE, ACTION and NL_ASSERTION, combined as the reference does
(reward = product over the components the task's reward basis names), plus pass^k and avg@k.

- DB: the task's gold actions (agent and user side) are replayed on a fresh environment; the agent database
  hash and the user database hash must both equal the episode's (gold actions that raise are meant to: their
  partial effects stay, as in the reference). The gold hashes are cached per task.
- ENV_ASSERTION: the task's assertions run on the episode's final environment.
- COMMUNICATE: each `communicate_info` string must appear (case-insensitive) in some assistant text with commas
  removed.
- ACTION: every gold action must match some tool call of the episode (name and `compare_args`).
- NL_ASSERTION: an LLM judge (`ChatFn`) grades each assertion against the transcript, with the reference's
  prompt and JSON answer format.
An episode that ended by too many errors or the step limit scores 0, as in the reference.
"""

from __future__ import annotations

import json
from functools import cache
from math import comb
from typing import Any

from openk2.eval.task import ChatFn, Message
from openk2.eval.tau2.env import Tau2Env, make_env, replay
from openk2.eval.tau2.tasks import Task

# Episodes that did not end by a stop signal score 0. v0.1.0's evaluator lists only the two limits; its later
# versions zero every reason but AGENT_STOP / USER_STOP, which also covers a user or agent model that failed
# (otherwise a task whose gold end state is "nothing changes" scores 1 for a conversation that never happened).
PREMATURE = {"too_many_errors", "max_steps", "agent_error", "user_error"}

JUDGE_SYSTEM = """
TASK
- You will be given a list of expected outcomes and a conversation that was collected during a test case run.
- The conversation is between an agent and a customer.
- Your job is to evaluate whether the agent satisfies each of the expected outcomes.
- Grade each expected outcome individually.

FORMAT
- Your response should be a JSON object with the following fields:
- `reasoning`: a short explanation for your classification
- `metExpectation`: `true` if the agent satisfies the expected outcomes, `false` otherwise
- `expectedOutcome`: repeat the expectation from the input that you are grading

Example response structure:
{
    "results": [
        {
            "expectedOutcome": "<one of the expected outcomes from the input>",
            "reasoning": "<reasoning trace>",
            "metExpectation": <false or true>,
        }
    ]
}
""".strip()


@cache
def _gold_hashes(domain: str, task_id: str, data_dir: str | None) -> tuple[str | None, str | None]:
    from pathlib import Path

    env = make_env(domain, task_id, data_dir=Path(data_dir) if data_dir else None)
    replay(env, (env.task.evaluation_criteria.actions or []) if env.task.evaluation_criteria else [])
    return env.db_hash(), env.user_db_hash()


def db_check(env: Tau2Env, data_dir: str | None = None) -> float:
    task = env.task
    gold = _gold_hashes(env.domain, task.id, data_dir)
    return 1.0 if gold == (env.db_hash(), env.user_db_hash()) else 0.0


def env_assertion_check(env: Tau2Env) -> tuple[float, list[dict[str, Any]]]:
    checks = []
    for assertion in env.task.evaluation_criteria.env_assertions or []:
        try:
            met = env.run_assertion(assertion)
        except Exception as e:  # an assertion that cannot run is not met
            met, _ = False, e
        checks.append({"func_name": assertion.func_name, "arguments": assertion.arguments, "met": met})
    return (1.0 if all(c["met"] for c in checks) else 0.0), checks


def communicate_check(task: Task, transcript: list[Message]) -> tuple[float, list[dict[str, Any]]]:
    texts = [m.get("content") for m in transcript if m.get("role") == "assistant" and m.get("content")]
    checks = []
    for info in task.evaluation_criteria.communicate_info or []:
        met = any(info.lower() in text.lower().replace(",", "") for text in texts)
        checks.append({"info": info, "met": met})
    return (1.0 if all(c["met"] for c in checks) else 0.0), checks


def tool_calls_of(transcript: list[Message]) -> list[tuple[str, dict[str, Any]]]:
    """(name, arguments) of every agent and user tool call in an OpenAI-format transcript."""
    calls = []
    for message in transcript:
        for call in message.get("tool_calls") or []:
            fn = call.get("function", call)
            args = fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    args = {}
            calls.append((fn.get("name", ""), args if isinstance(args, dict) else {}))
    return calls


def action_check(task: Task, transcript: list[Message]) -> tuple[float, list[dict[str, Any]]]:
    calls = tool_calls_of(transcript)
    checks = [{"action_id": a.action_id, "met": any(a.matches(n, args) for n, args in calls)}
              for a in task.evaluation_criteria.actions or []]
    return (1.0 if all(c["met"] for c in checks) else 0.0), checks


def judge_messages(task: Task, transcript: list[Message]) -> list[Message]:
    conversation = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in transcript if m.get("role") != "system")
    user = f"conversation:\n{conversation}\n\nexpectedOutcomes:\n{task.evaluation_criteria.nl_assertions}"
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_judge(text: str, assertions: list[str]) -> list[dict[str, Any]]:
    """The judge's per-assertion verdicts; an unparsable answer fails every assertion."""
    start, end = text.find("{"), text.rfind("}")
    try:
        results = json.loads(text[start:end + 1]).get("results", [])
    except (json.JSONDecodeError, AttributeError, ValueError):
        return [{"assertion": a, "met": False, "reasoning": "judge answer not parsable"} for a in assertions]
    return [{"assertion": r.get("expectedOutcome"), "met": r.get("metExpectation") is True,
             "reasoning": r.get("reasoning")} for r in results if isinstance(r, dict)]


async def nl_assertion_check(task: Task, transcript: list[Message], judge: ChatFn | None
                             ) -> tuple[float, list[dict[str, Any]]]:
    assertions = task.evaluation_criteria.nl_assertions or []
    if not assertions:
        return 1.0, []
    if judge is None:
        raise ValueError(f"task {task.id} needs an NL-assertion judge (--judge-model)")
    answer = await judge(judge_messages(task, transcript), None)
    checks = parse_judge(answer.get("content") or "", assertions)
    return (1.0 if checks and all(c["met"] for c in checks) else 0.0), checks


def score_components(env: Tau2Env, transcript: list[Message], termination: str | None = None,
                     nl: tuple[float, list[dict[str, Any]]] | None = None, data_dir: str | None = None
                     ) -> dict[str, Any]:
    """The reward (0..1) of one finished episode and its per-component breakdown (JSON-ready); `nl` is the
    NL-assertion result when the task's reward basis needs it (no v0.1.0 task's does)."""
    task = env.task
    if termination in PREMATURE:
        return {"reward": 0.0, "note": f"terminated prematurely: {termination}", "breakdown": {}}
    if task.evaluation_criteria is None:
        return {"reward": 1.0, "note": "no evaluation criteria", "breakdown": {}}
    basis = set(task.evaluation_criteria.reward_basis)
    breakdown: dict[str, float] = {}
    details: dict[str, Any] = {}
    has_env_criteria = (task.evaluation_criteria.actions is not None
                        or task.evaluation_criteria.env_assertions is not None)
    if "DB" in basis:
        breakdown["DB"] = db_check(env, data_dir) if has_env_criteria else 1.0
    if "ENV_ASSERTION" in basis:
        breakdown["ENV_ASSERTION"], details["env_assertions"] = env_assertion_check(env)
    if "ACTION" in basis:
        breakdown["ACTION"], details["actions"] = action_check(task, transcript)
    if "COMMUNICATE" in basis:
        breakdown["COMMUNICATE"], details["communicate"] = communicate_check(task, transcript)
    if "NL_ASSERTION" in basis:
        if nl is None:
            raise ValueError(f"task {task.id} needs an NL-assertion judge (--judge-model)")
        breakdown["NL_ASSERTION"], details["nl_assertions"] = nl
    reward = 1.0
    for value in breakdown.values():
        reward *= value
    return {"reward": reward, "breakdown": breakdown, "details": details, "termination": termination}


async def score_episode(env: Tau2Env, transcript: list[Message], termination: str | None = None,
                        judge: ChatFn | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """`score_components`, asking the judge first when the reward basis includes NL_ASSERTION."""
    nl = None
    criteria = env.task.evaluation_criteria
    if criteria is not None and "NL_ASSERTION" in criteria.reward_basis and termination not in PREMATURE:
        nl = await nl_assertion_check(env.task, transcript, judge)
    return score_components(env, transcript, termination, nl, data_dir)


def replay_transcript(env: Tau2Env, transcript: list[Message]) -> None:
    """Re-run a saved transcript's tool calls (agent and user side, in order) on a fresh environment: how the
    reference rebuilds an episode's end state for scoring."""
    for message in transcript:
        if message.get("role") not in ("assistant", "user"):
            continue
        fn = env.user_call if message["role"] == "user" else env.call
        for name, args in tool_calls_of([message]):
            fn(name, args)


def pass_hat_k(successes: int, trials: int, k: int) -> float:
    """pass^k for one task: the chance that k trials drawn from n all succeed, C(c, k) / C(n, k)."""
    if trials < k:
        raise ValueError(f"pass^{k} needs at least {k} trials, got {trials}")
    return comb(successes, k) / comb(trials, k)


def aggregate(rewards: dict[str, list[float]], k: int | None = None) -> dict[str, float]:
    """avg@k (mean reward over all trials, 0-100) and pass^1..k (0-100) over tasks; a trial succeeds at
    reward 1 (within 1e-6), as in the reference."""
    if not rewards:
        return {}
    n = min(len(v) for v in rewards.values())
    k = k or n
    out = {"avg@k": 100.0 * sum(sum(v) / len(v) for v in rewards.values()) / len(rewards)}
    for j in range(1, min(k, n) + 1):
        out[f"pass^{j}"] = 100.0 * sum(pass_hat_k(sum(1 for r in v if abs(r - 1.0) < 1e-6), len(v), j)
                                       for v in rewards.values()) / len(rewards)
    return out
