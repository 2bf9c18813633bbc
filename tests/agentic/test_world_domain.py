import asyncio
import json
from pathlib import Path

import pytest

from openk2.agentic.world_domain import POLICY, TOOL_NAMES, WorldEnv
from openk2.agentic.world_tasks import (
    KINDS,
    ExpertAgent,
    WorldTask,
    make_tasks,
    run_episode,
    score_episode,
    synthesize,
    tool_call_message,
)
from openk2.data.world import World, world_documents
from openk2.eval.benchmarks.world_agent import BENCHMARKS, WorldAgent, evaluate_chat


@pytest.fixture(scope="module")
def world():
    return World.generate(seed=0, n_people=60)


def test_env_contract_reads_writes_and_errors(world):
    env = WorldEnv(world)
    assert [t["function"]["name"] for t in env.tools()] == list(TOOL_NAMES)
    p = world.heldout_people[0]
    assert env.call("lookup", {"name": p.name, "attribute": "hobby"}) == p.hobby
    assert env.call("lookup", json.dumps({"name": p.name, "attribute": "birth_date"})) == p.answer("birth_date")
    n = sum(q.birth_city == p.birth_city for q in world.people)
    assert env.call("count_people", {"attribute": "birth_city", "value": p.birth_city}) == str(n)
    company = world.company(p.employer)
    assert env.call("company_info", {"company": p.employer}) == f"{company.industry} company in {company.city}"
    env.reset()  # forgets the lookups above: the policy's "look up before updating" starts over
    h0 = env.state_hash()
    json.dumps(env.state())  # JSON-ready
    # A model's bad calls are error texts, never exceptions, and change nothing.
    for tool, args in [("nope", {}), ("lookup", {"name": p.name}), ("lookup", "{not json"), ("lookup", [1]),
                       ("lookup", {"name": "Nobody Here", "attribute": "hobby"}),
                       ("lookup", {"name": p.name, "attribute": "shoe_size"}),
                       ("lookup", {"name": 3, "attribute": "hobby"}),
                       ("company_info", {"company": "Nope Inc"}),
                       ("update_record", {"name": p.name, "attribute": "birth_city", "value": "X"}),
                       ("update_record", {"name": p.name, "attribute": "hobby", "value": "chess"})]:
        assert env.call(tool, args).startswith("Error:"), (tool, args)
    assert env.state_hash() == h0
    assert "look up" in env.call("update_record", {"name": p.name, "attribute": "hobby", "value": "chess"})
    # Policy: look up first, then a valid value.
    env.call("lookup", {"name": p.name, "attribute": "hobby"})
    assert env.call("update_record", {"name": p.name, "attribute": "hobby", "value": "not a hobby"}).startswith("Error")
    other = next(h for h in world.hobbies if h != p.hobby)
    assert env.call("update_record", {"name": p.name, "attribute": "hobby", "value": other}).startswith("updated")
    assert env.state()["people"][p.name]["hobby"] == other and env.state_hash() != h0
    env.reset()
    assert env.state_hash() == h0 and env.log == []
    assert "permanent records" in POLICY


def test_tasks_are_deterministic_split_and_cover_every_kind(world):
    a, b = make_tasks(world, "heldout", 60, seed=1), make_tasks(world, "heldout", 60, seed=1)
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b]
    assert [t.id for t in make_tasks(world, "heldout", 60, seed=2)] != [t.id for t in a]
    assert {t.kind for t in a} == set(KINDS)
    heldout = {p.name for p in world.heldout_people}
    assert all(t.person in heldout for t in a if t.person)
    assert all(t.person not in heldout for t in make_tasks(world, "train", 60, seed=1) if t.person)
    # Held-out people appear in no pretraining document: only the tools can answer.
    docs = "\n".join(world_documents(world, renderings_per_person=1))
    assert not any(p.name in docs for p in world.heldout_people)
    assert WorldTask.from_dict(a[0].to_dict()) == a[0]


def test_expert_solves_every_task_and_wrong_paths_fail(world):
    env = WorldEnv(world)
    for task in make_tasks(world, "heldout", 40, seed=0) + make_tasks(world, "train", 40, seed=0):
        ep = asyncio.run(run_episode(env, task, ExpertAgent(task)))
        assert ep.error is None
        assert score_episode(world, task, ep.messages)[0] == 1.0, (task, ep.messages)
    upd = next(t for t in make_tasks(world, "heldout", 40, seed=0) if t.kind == "update")
    ep = asyncio.run(run_episode(env, upd, ExpertAgent(upd)))
    no_write = [m for m in ep.messages if not any(c["function"]["name"] == "update_record"
                                                  for c in m.get("tool_calls") or [])]
    score, details = score_episode(world, upd, no_write)
    assert score == 0.0 and not details["state_ok"]
    lookup = next(t for t in make_tasks(world, "heldout", 40, seed=0) if t.kind == "lookup")
    msgs = [{"role": "user", "content": lookup.instruction}, {"role": "assistant", "content": "No idea."}]
    assert score_episode(world, lookup, msgs) == (0.0, {"state_ok": True, "answer_ok": False, "tool_calls": 0,
                                                        "final_answer": "No idea."})
    # A spurious write fails a read-only task even with the right answer.
    p = next(q for q in world.people if q.name == lookup.person)
    hobby = next(h for h in world.hobbies if h != p.hobby)
    msgs = [{"role": "user", "content": lookup.instruction}]
    msgs.append(tool_call_message(msgs, "lookup", {"name": p.name, "attribute": "hobby"}))
    msgs.append(tool_call_message(msgs, "update_record", {"name": p.name, "attribute": "hobby", "value": hobby}))
    msgs.append({"role": "assistant", "content": lookup.answer})
    assert score_episode(world, lookup, msgs)[1]["state_ok"] is False


def test_synthesized_trajectories_are_sft_records(world, tmp_path):
    records = synthesize(world, "train", 30, seed=0)
    assert len(records) == 30
    r = records[0]
    assert set(r) == {"messages", "tools", "metadata"} and r["metadata"]["agent"] == "expert"
    assert r["messages"][0]["role"] == "system" and r["messages"][1]["role"] == "user"
    roles = {m["role"] for rec in records for m in rec["messages"]}
    assert roles == {"system", "user", "assistant", "tool"}
    json.dumps(records)
    from openk2.data.chat import render_chat

    assert "<|tool_calls_section_begin|>" in render_chat(r["messages"], r["tools"]) or r["metadata"]["kind"] == "refuse"


def test_world_agent_benchmark_seed_and_scoring(world):
    bench = WorldAgent(world_seed=0, world_people=60)
    assert BENCHMARKS[0].name == "world-agent"
    s1 = bench.load(Path("."), limit=12, seed=1)
    assert [s.id for s in s1] == [s.id for s in bench.load(Path("."), limit=12, seed=1)]
    assert [s.reference for s in s1] != [s.reference for s in bench.load(Path("."), limit=12, seed=2)]
    by_text = {s.messages[-1]["content"]: WorldTask.from_dict(s.reference) for s in s1}

    async def expert(messages, tools):
        assert tools and tools[0]["function"]["name"] == "lookup"
        return ExpertAgent(by_text[messages[1]["content"]]).act(messages)

    async def mute(messages, tools):
        return {"role": "assistant", "content": "hello"}

    assert asyncio.run(evaluate_chat(bench, s1, expert))["success"] == 1.0
    assert asyncio.run(evaluate_chat(bench, s1, mute))["success"] == 0.0

    async def loops(messages, tools):  # never answers: the episode stops at max_steps and scores 0
        return tool_call_message(messages, "lookup", {"name": "x", "attribute": "hobby"})

    out = asyncio.run(evaluate_chat(bench, s1[:2], loops))
    assert out["success"] == 0.0 and out["episodes"][0]["tool_calls"] == bench.max_steps
