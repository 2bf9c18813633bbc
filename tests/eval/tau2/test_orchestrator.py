"""The orchestrator end to end with an oracle agent and a scripted user, limits, stop signals and bad calls."""

from __future__ import annotations

import asyncio

import pytest

from openk2.eval.tau2 import load_tasks, make_env
from openk2.eval.tau2.oracle import oracle_pair, scripted_user, tool_call
from openk2.eval.tau2.orchestrator import run_episode
from openk2.eval.tau2.scoring import score_episode


def _judge_all_met():
    async def judge(messages, tools):
        return {"role": "assistant", "content": '{"results": [{"expectedOutcome": "x", "reasoning": "ok", '
                                                '"metExpectation": true}]}'}
    return judge


@pytest.mark.parametrize("domain,indices", [("retail", [0, 5]), ("airline", [1, 3]), ("telecom", [0, 40, 90])])
def test_oracle_episode_scores_one(domain, indices):
    for i in indices:
        task = load_tasks(domain)[i]
        env = make_env(domain, task=task)
        agent, user = oracle_pair(task)
        ep = asyncio.run(run_episode(env, agent, user))
        assert ep.termination == "user_stop", (task.id, ep.error)
        result = asyncio.run(score_episode(env, ep.transcript, ep.termination, judge=_judge_all_met()))
        assert result["reward"] == 1.0, (task.id, result)


def test_bad_tool_calls_return_reference_errors_and_hit_error_limit():
    env = make_env("retail", "0")
    assert env.call("no_such_tool", {}) == "Error: Tool 'no_such_tool' not found."
    assert env.call("get_user_details", {}) == \
        "Error: RetailTools.get_user_details() missing 1 required positional argument: 'user_id'"
    assert env.call("get_user_details", {"user_id": "x", "extra": 1}) == \
        "Error: RetailTools.get_user_details() got an unexpected keyword argument 'extra'"
    assert env.call("get_order_details", {"order_id": 5}) == "Error: Order not found"
    assert env.call("calculate", {"expression": "2 +"}) == "Error: invalid syntax (<string>, line 1)"
    assert env.call("calculate", {"expression": "2 ** 3 + 7 // 2 - -1"}) == "12.0"
    assert env.call("calculate", {"expression": "2 * x"}) == "Error: Invalid characters in expression"
    assert env.call("calculate", {"expression": "1/0"}) == "Error: division by zero"
    assert env.call("calculate", {"expression": "(2 + 3) * 4.5"}) == "22.5"

    async def bad_agent(messages, tools):
        return {"role": "assistant", "content": None,
                "tool_calls": [tool_call("no_such_tool", {}, "x"),
                               {"id": "y", "type": "function", "function": {"name": "calculate", "arguments": "{"}}]}

    ep = asyncio.run(run_episode(make_env("retail", "0"), bad_agent, scripted_user(["hi"])))
    assert ep.termination == "too_many_errors" and ep.errors == 10
    assert asyncio.run(score_episode(make_env("retail", "0"), ep.transcript, ep.termination))["reward"] == 0.0


def test_step_limit_and_stop_signals():
    async def chatty_agent(messages, tools):
        return {"role": "assistant", "content": "Could you tell me more?"}

    ep = asyncio.run(run_episode(make_env("airline", "0"), chatty_agent, scripted_user(["more"] * 500),
                                 max_steps=20))
    assert ep.termination == "max_steps" and ep.steps == 20
    ep = asyncio.run(run_episode(make_env("airline", "0"), chatty_agent, scripted_user(["###TRANSFER###"])))
    assert ep.termination == "user_stop" and len(ep.transcript) == 2

    async def empty(messages, tools):
        return {"role": "assistant", "content": ""}

    ep = asyncio.run(run_episode(make_env("airline", "0"), empty, scripted_user(["hello"])))
    assert ep.termination == "agent_error"


def test_user_tools_and_views():
    task = load_tasks("telecom")[0]
    env = make_env("telecom", task=task)
    assert env.user_call("check_status_bar", {}).startswith("Status Bar: ")
    assert make_env("retail", "0").user_call("check_status_bar", {}) == "Error: User tools not available"


def test_task_schema_error_names_task_and_field():
    from openk2.eval.task import BenchmarkDataError
    from openk2.eval.tau2.tasks import parse_task

    with pytest.raises(BenchmarkDataError, match=r"task 'bad'.*user_scenario"):
        parse_task({"id": "bad"}, "tasks.json")


def test_oracle_through_llm_client_serve_format():
    """The oracle agent answers through `openk2.llm` (ReplayBackend): the requests are plain OpenAI chat
    payloads (system/user/assistant/tool roles, tool schemas, no private keys) and the episode scores 1."""
    from openk2.eval.tau2.orchestrator import client_chat
    from openk2.llm.client import LLMClient
    from openk2.llm.replay import ReplayBackend, chat_response

    task = load_tasks("telecom")[7]
    agent, user = oracle_pair(task)

    def responder(endpoint, payload):
        coro = agent(payload["messages"], payload.get("tools"))
        try:
            coro.send(None)
        except StopIteration as done:
            msg = done.value
        return chat_response(msg.get("content"), msg.get("tool_calls"))

    backend = ReplayBackend(responder=responder)
    client = LLMClient(backend, model="oracle")
    env = make_env("telecom", task=task)
    ep = asyncio.run(run_episode(env, client_chat(client, temperature=0.0), user))
    assert ep.termination == "user_stop"
    assert asyncio.run(score_episode(env, ep.transcript, ep.termination))["reward"] == 1.0
    for _, payload in backend.calls:
        assert payload["tools"] and payload["temperature"] == 0.0
        assert {m["role"] for m in payload["messages"]} <= {"system", "user", "assistant", "tool"}
        assert not any({"requestor", "error"} & set(m) for m in payload["messages"])


def test_views_hide_the_other_sides_tool_traffic():
    from openk2.eval.tau2.orchestrator import agent_view, user_view

    transcript = [
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "help"},
        {"role": "assistant", "content": "checking", "tool_calls": [tool_call("get_x", {}, "a1")]},
        {"role": "tool", "tool_call_id": "a1", "name": "get_x", "content": "X"},
        {"role": "user", "content": None, "tool_calls": [tool_call("check_status_bar", {}, "u1")]},
        {"role": "tool", "tool_call_id": "u1", "name": "check_status_bar", "content": "bar", "requestor": "user"},
        {"role": "user", "content": "bar says ok"},
    ]
    agent = agent_view(transcript)
    assert [m["role"] for m in agent] == ["assistant", "user", "assistant", "tool", "user"]
    user = user_view(transcript)
    assert [m["role"] for m in user] == ["user", "assistant", "assistant", "tool", "assistant"]
    assert user[2]["tool_calls"][0]["function"]["name"] == "check_status_bar"
