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


def test_copy_friendly_dialogs_copy_whole_words_and_still_score(world):
    """Expert dialogs in the copy-friendly format: a free-text argument copied from the request keeps the request's
    leading space, a value copied from a tool result is quoted in the answer; the tools strip the space, so every
    one-request dialog still scores 1.0 (end state and answer) and the plain format differs only in that text."""
    from openk2.agentic.world_sft import COPIED_ARGUMENTS
    from openk2.agentic.world_tasks import score_episode

    tasks = make_tasks(world, "train", 60, seed=5)
    spaced = quoted = 0
    for task in tasks:
        rec, plain = expert_dialog(world, [task]), expert_dialog(world, [task], copy_format=False)
        assert score_episode(world, task, rec["messages"])[0] == 1.0
        request = rec["messages"][1]["content"]
        results = [m["content"] for m in rec["messages"] if m["role"] == "tool"]
        for m, p in zip(rec["messages"], plain["messages"], strict=True):
            for call, pcall in zip(m.get("tool_calls") or [], p.get("tool_calls") or [], strict=True):
                args, pargs = json.loads(call["function"]["arguments"]), json.loads(pcall["function"]["arguments"])
                for k, v in args.items():
                    assert v.strip() == pargs[k]
                    if k in COPIED_ARGUMENTS and f" {pargs[k]}" in request and pargs[k] not in results:
                        assert v == " " + pargs[k]
                        spaced += 1
                    else:
                        assert v == pargs[k]
        answer, plain_answer = rec["messages"][-1]["content"], plain["messages"][-1]["content"]
        assert answer.replace('"', "") == plain_answer.replace('"', "")
        quoted += any(f'"{r}"' in answer for r in results)
    assert spaced > 20 and quoted > 5
