import json

import pytest

from openk2.agentic.world_domain import SYSTEM_PROMPT, WorldEnv
from openk2.agentic.world_sft import REGISTRY_SEED, expert_dialog, sft_records
from openk2.agentic.world_tasks import WorldTask, make_tasks
from openk2.data.world import World


@pytest.fixture(scope="module")
def world():
    return World.generate(seed=0, n_people=60)


def test_dialog_serves_each_request_in_turn_on_one_database(world):
    tasks = [t for t in make_tasks(world, "train", 30, seed=3) if t.kind in ("update", "company_city")][:2]
    rec = expert_dialog(world, tasks)
    msgs = rec["messages"]
    assert msgs[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert [m["content"] for m in msgs if m["role"] == "user"] == [t.instruction for t in tasks]
    ids = [c["id"] for m in msgs for c in m.get("tool_calls") or []]
    assert ids == [f"functions.{i.split('.')[1].split(':')[0]}:{k}" for k, i in enumerate(ids)]  # K2 ids count on
    # Every tool result is what the real tools return when the calls are replayed in order.
    env = WorldEnv(world)
    results = [env.call(c["function"]["name"], c["function"]["arguments"])
               for m in msgs for c in m.get("tool_calls") or []]
    assert results == [m["content"] for m in msgs if m["role"] == "tool"]
    # An update that a later request contradicts is caught: its stored answer no longer holds.
    upd = next(t for t in make_tasks(world, "train", 40, seed=0) if t.kind == "update")
    attr = upd.params["attribute"]
    old = next(p for p in world.people if p.name == upd.person).answer(attr)
    again = WorldTask("again", "lookup", "train", f"What is the {attr} of {upd.person}?",
                      [{"name": "lookup", "arguments": {"name": upd.person, "attribute": attr}}], old, upd.person,
                      {"attribute": attr})
    assert expert_dialog(world, [upd, again]) is None


def test_sft_records_mix_worlds_and_never_mention_heldout_people(world):
    records = sft_records(world, 40, registry_worlds=2, tasks_per_dialog=2, own_fraction=0.5, seed=0)
    seeds = [r["metadata"]["world_seed"] for r in records]
    assert set(seeds) == {0, REGISTRY_SEED, REGISTRY_SEED + 1} and seeds.count(0) == 10
    assert all(len(r["metadata"]["tasks"]) == 2 for r in records)
    text = json.dumps(records)
    assert not any(p.name in text for p in world.heldout_people)
    assert sft_records(world, 40, registry_worlds=2, seed=0) == sft_records(world, 40, registry_worlds=2, seed=0)
    only_own = sft_records(world, 6, registry_worlds=0, tasks_per_dialog=1)
    assert len(only_own) == 6 and {r["metadata"]["world_seed"] for r in only_own} == {0}
    with pytest.raises(ValueError, match="tasks_per_dialog"):
        sft_records(world, 4, tasks_per_dialog=0)
