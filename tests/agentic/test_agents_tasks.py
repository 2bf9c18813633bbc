"""Agents (distinct, coherent tool subsets) and LLM-written tasks with rubrics, checks and gold end states."""

from __future__ import annotations

import asyncio
import json

from openk2.agentic.agents import make_agents, synthesize_system_prompt
from openk2.agentic.examples import order_desk, order_desk_tasks
from openk2.agentic.tasks import attach_gold_state, generate_tasks
from openk2.llm import LLMClient, ReplayBackend

from .helpers import small_repository


def test_agents_are_distinct_coherent_and_deterministic():
    repo = small_repository()
    agents = make_agents(repo, 6, min_tools=2, max_tools=3, seed=1)
    assert len(agents) == 6 and agents == make_agents(repo, 6, min_tools=2, max_tools=3, seed=1)
    assert len({frozenset(a.tools) for a in agents}) == 6 and len({a.id for a in agents}) == 6
    for a in agents:
        assert 2 <= len(a.tools) <= 3
        assert {repo[t].domain.split("/")[0] for t in a.tools} == {a.domain.split("/")[0]}  # one category
        assert all(t in a.system_prompt for t in a.tools)
    # more agents than distinct subsets exist: fewer come back, none repeated
    assert len(make_agents(repo, 500, min_tools=2, max_tools=2, seed=0)) < 500


def test_llm_system_prompt_and_a_bad_reply():
    repo = small_repository()
    a, b = make_agents(repo, 2, seed=0)
    backend = ReplayBackend(script=['{"system_prompt": "You are the trading desk assistant of Acme Bank."}',
                                    "sure! here is a prompt"])
    client = LLMClient(backend, model="m")
    assert asyncio.run(synthesize_system_prompt(client, a, repo)) is None
    assert a.system_prompt.startswith("You are the trading desk assistant") and "Rules:" in a.system_prompt
    before = b.system_prompt
    rej = asyncio.run(synthesize_system_prompt(client, b, repo))
    assert rej is not None and "not valid JSON" in rej.reason and b.system_prompt == before


def test_generate_tasks_checks_and_rejections():
    repo = small_repository()
    agent = next(a for a in make_agents(repo, 8, seed=3) if "get_quote" in a.tools)
    good = {"instruction": "You want the price of ACME.", "persona": "terse trader", "user_facts": {"ticker": "ACME"},
            "rubric": {"success_criteria": ["price reported"], "expected_tools": ["get_quote"]},
            "gold_actions": [{"name": "get_quote", "arguments": {"ticker": "ACME"}}], "expected_outputs": ["ACME"]}
    unknown = {**good, "rubric": {"success_criteria": ["x"], "expected_tools": ["launch_rocket"]}}
    bad_args = {**good, "gold_actions": [{"name": "get_quote", "arguments": {"ticker": 5}}]}
    no_rubric = {**good, "rubric": {}}
    script = [json.dumps({"tasks": [good, unknown]}), "```json\n" + json.dumps([bad_args, no_rubric]) + "\n```",
              "I cannot do that."]
    backend = ReplayBackend(script=script)
    tasks, rejected = asyncio.run(generate_tasks(LLMClient(backend, model="m"), agent, agent.tool_specs(repo),
                                                 per_level=2))
    assert [t.difficulty for t in tasks] == ["simple"] and tasks[0].rubric.expected_tools == ["get_quote"]
    assert tasks[0].user_facts == {"ticker": "ACME"} and tasks[0].gold_actions[0]["name"] == "get_quote"
    reasons = [r.reason for r in rejected]
    assert "rubric expects unknown tool 'launch_rocket'" in reasons[0]
    assert "gold action 0 (get_quote): ticker: 5 is not of type 'string'" in reasons[1]
    assert "no success criteria" in reasons[2]
    assert rejected[3].item.endswith("/complex") and "not valid JSON" in reasons[3]
    assert "simple" in backend.calls[0][1]["messages"][0]["content"] and len(backend.calls) == 3


def test_gold_state_from_executed_gold_actions():
    layer = order_desk()
    cancel, status = order_desk_tasks()
    assert attach_gold_state(cancel, layer) is None
    assert cancel.expected_state["orders"]["B2"]["status"] == "cancelled"
    assert layer.state()["orders"]["B2"]["status"] == "pending"  # the layer is reset afterwards
    assert attach_gold_state(status, layer) is None and status.expected_state == layer.state()
    status.gold_actions = [{"name": "cancel_order", "arguments": {"order_id": "A1"}}]
    rej = attach_gold_state(status, layer)
    assert rej is not None and "only pending orders can be cancelled" in rej.reason
