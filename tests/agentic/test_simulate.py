"""The tool layers (Python executor, stateful LLM tool simulator with seeded failure injection), the users, and
the agent <-> user <-> tools loop."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from openk2.agentic.examples import order_desk, order_desk_agent, order_desk_tasks
from openk2.agentic.simulate import (
    STOP,
    FailureRates,
    LLMToolSimulator,
    LLMUser,
    ScriptedAgent,
    ScriptedUser,
    ToolLayer,
    simulate,
)
from openk2.agentic.tools import validate_tool
from openk2.llm import LLMClient, ReplayBackend, chat_response

from .helpers import call, tool

NOTES = [validate_tool(tool("add_note", "Store a note under a title.", "notes", title="string", text="string")),
         validate_tool(tool("get_note", "Read a note by title.", "notes", title="string"))]


def notes_backend() -> ReplayBackend:
    """A scripted 'world model': keeps notes in the state it is shown and returns the updated state."""

    def respond(endpoint, payload):
        system = payload["messages"][0]["content"]
        state = json.loads(system.split("Current state of the backend (JSON): ")[1].split("\n")[0])
        request = json.loads(payload["messages"][-1]["content"].split("\nOutcome")[0])
        notes = state.setdefault("notes", {})
        if request["tool"] == "add_note":
            notes[request["arguments"]["title"]] = request["arguments"]["text"]
            result = {"ok": True}
        else:
            result = notes.get(request["arguments"]["title"], "no such note")
        return json.dumps({"result": result, "state": state})

    return ReplayBackend(responder=respond)


def test_python_layer_follows_the_contract():
    layer = order_desk()
    assert isinstance(layer, ToolLayer)
    assert layer.call("launch", {}).startswith("Error: unknown tool 'launch'")
    assert "'order_id' is a required property" in layer.call("get_order", {})
    assert layer.call("get_order", {"order_id": "Z9"}) == "Error: KeyError: \"no order 'Z9'\""
    assert json.loads(layer.call("get_order", {"order_id": "A1"}))["status"] == "shipped"
    assert layer.call("cancel_order", {"order_id": "C3"}) == "order C3 cancelled"
    assert layer.state()["orders"]["C3"]["status"] == "cancelled"
    layer.reset()
    assert layer.state()["orders"]["C3"]["status"] == "pending"


def test_tool_simulator_keeps_state_across_calls():
    backend = notes_backend()
    sim = LLMToolSimulator(LLMClient(backend, model="sim"), NOTES, seed=0, rates=FailureRates(0, 0, 0),
                           initial_state={"owner": "kim"})

    async def run():
        a = await sim.acall("add_note", {"title": "todo", "text": "buy milk"})
        b = await sim.acall("get_note", {"title": "todo"})
        c = await sim.acall("get_note", {"title": "other"})
        return a, b, c

    assert asyncio.run(run()) == ('{"ok": true}', "buy milk", "no such note")
    assert sim.state() == {"owner": "kim", "notes": {"todo": "buy milk"}}
    # the state and the call history travel in every request after the first
    last = backend.calls[-1][1]["messages"]
    assert '"notes": {"todo": "buy milk"}' in last[0]["content"] and len(last) == 1 + 2 * 2 + 1
    # unknown tools and schema violations are answered without the LLM
    n = len(backend.calls)
    assert asyncio.run(sim.acall("drop_table", {})).startswith("Error: unknown tool")
    assert "'title' is a required property" in asyncio.run(sim.acall("get_note", {}))
    assert len(backend.calls) == n and sim.outcomes[-2:] == ["invalid", "invalid"]
    sim.reset()
    assert sim.state() == {"owner": "kim"} and sim.history == []


def test_failure_injection_rates_under_a_fixed_seed():
    def draw(seed):
        backend = notes_backend()
        sim = LLMToolSimulator(LLMClient(backend, model="sim"), NOTES, seed=seed,
                               rates=FailureRates(partial=0.2, edge=0.1, error=0.3))

        async def run():
            return [await sim.acall("get_note", {"title": "x"}) for _ in range(300)]

        results = asyncio.run(run())
        return sim.outcomes, results, backend

    outcomes, results, backend = draw(seed=5)
    counts = Counter(outcomes)
    assert abs(counts["error"] / 300 - 0.3) < 0.08 and abs(counts["partial"] / 300 - 0.2) < 0.07
    assert abs(counts["edge"] / 300 - 0.1) < 0.06 and counts["success"] + sum(
        counts[k] for k in ("error", "partial", "edge")) == 300
    # transient errors never reach the LLM; other outcomes carry their instruction to it
    assert len(backend.calls) == 300 - counts["error"]
    assert all(r.startswith("Error") for r, o in zip(results, outcomes, strict=True) if o == "error")
    partial_prompts = [c[1]["messages"][-1]["content"] for c in backend.calls if "partially fails" in
                       c[1]["messages"][-1]["content"]]
    assert len(partial_prompts) == counts["partial"]
    again, _, _ = draw(seed=5)
    other, _, _ = draw(seed=6)
    assert again == outcomes and other != outcomes
    with pytest.raises(ValueError):
        FailureRates(partial=0.6, edge=0.3, error=0.2)


def test_full_dialog_with_an_executable_layer():
    layer = order_desk()
    agent = order_desk_agent(layer)
    task = order_desk_tasks()[0]
    policy = ScriptedAgent([
        {"role": "assistant", "content": "Which order?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_order", {"order_id": "B2"}, "c1")]},
        {"role": "assistant", "content": "It is your lamp; cancel it?"},
        {"role": "assistant", "content": None, "tool_calls": [call("cancel_order", {"order_id": "B2"}, "c2"),
                                                              call("nope", {}, "c3")]},
        {"role": "assistant", "content": "Order B2 is cancelled."},
    ])
    user = ScriptedUser(["I want to cancel my lamp.", "It is B2.", "Yes."])
    traj = asyncio.run(simulate(task, agent, policy, user, layer, models={"agent": "scripted"}))
    assert traj.status == "done" and traj.stop_reason == "user_stop"
    roles = [m["role"] for m in traj.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "tool", "assistant", "user", "assistant",
                     "tool", "tool", "assistant"]
    assert [c["name"] for c in traj.calls] == ["get_order", "cancel_order", "nope"]
    assert [c["error"] for c in traj.calls] == [False, False, True]
    assert traj.final_state["orders"]["B2"]["status"] == "cancelled"


def test_llm_user_gradual_disclosure_and_stop():
    task = order_desk_tasks()[0]
    backend = ReplayBackend(script=["Hi, I need to cancel an order.", "It's B2.", STOP])
    user = LLMUser(LLMClient(backend, model="user"), task)

    async def run():
        first = await user.reply([{"role": "system", "content": "agent prompt"}])
        dialog = [{"role": "system", "content": "agent prompt"}, {"role": "user", "content": first},
                  {"role": "assistant", "content": "Which order id?"}]
        second = await user.reply(dialog)
        third = await user.reply(dialog + [{"role": "user", "content": second},
                                           {"role": "assistant", "content": None, "tool_calls": [call("x", {})]},
                                           {"role": "tool", "tool_call_id": "call_1", "content": "r"},
                                           {"role": "assistant", "content": "Done."}])
        return first, second, third

    assert asyncio.run(run()) == ("Hi, I need to cancel an order.", "It's B2.", None)
    sent = backend.calls[1][1]["messages"]
    assert "order_id" in sent[0]["content"] and "only when the assistant asks" in sent[0]["content"]
    assert [m["role"] for m in sent] == ["system", "assistant", "user"]  # roles flipped, agent prompt dropped
    assert [m["content"] for m in backend.calls[2][1]["messages"]][-1] == "Done."  # tool traffic hidden


def test_a_broken_simulator_reply_ends_the_trajectory_with_its_reason():
    task = order_desk_tasks()[0]
    agent = order_desk_agent()
    backend = ReplayBackend(script=["not json at all"])
    sim = LLMToolSimulator(LLMClient(backend, model="sim"), NOTES, seed=0, rates=FailureRates(0, 0, 0))
    policy = ScriptedAgent([{"role": "assistant", "content": None,
                             "tool_calls": [call("get_note", {"title": "t"})]}])
    traj = asyncio.run(simulate(task, agent, policy, ScriptedUser(["hi"]), sim))
    assert traj.status == "error" and "not valid JSON" in traj.error and traj.messages[-1]["role"] == "assistant"
    assert asyncio.run(simulate(task, agent, policy, ScriptedUser([]), sim)).error.startswith("ReplyError")
    assert chat_response("x")["choices"][0]["message"]["content"] == "x"
