"""Every shipped task's gold actions, replayed through the tool interface, score DB 1.0 and satisfy the task's
environment assertions; a wrong argument in one gold write action makes the DB reward 0."""

from __future__ import annotations

import asyncio

import pytest

from openk2.eval.tau2 import DOMAINS, load_tasks, make_env, replay
from openk2.eval.tau2.scoring import db_check, env_assertion_check, score_episode

TASKS = [(d, t) for d in DOMAINS for t in load_tasks(d)]
WRITE = {"book_reservation", "cancel_reservation", "update_reservation_flights", "update_reservation_baggages",
         "update_reservation_passengers", "send_certificate", "cancel_pending_order", "modify_pending_order_items",
         "modify_pending_order_address", "modify_pending_order_payment", "modify_user_address",
         "exchange_delivered_order_items", "return_delivered_order_items", "refuel_data", "enable_roaming",
         "resume_line", "send_payment_request"}


def test_task_counts():
    assert [len(load_tasks(d)) for d in DOMAINS] == [50, 114, 114]


@pytest.mark.parametrize("domain", DOMAINS)
def test_gold_replay_scores_one(domain):
    failures = []
    for d, task in TASKS:
        if d != domain:
            continue
        env = make_env(domain, task=task)
        replay(env, task.evaluation_criteria.actions or [])
        db = db_check(env)
        env_reward, checks = env_assertion_check(env)
        if db != 1.0 or env_reward != 1.0:
            failures.append((task.id, db, [c for c in checks if not c["met"]]))
    assert not failures


def _perturb(value):
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list) and value:
        return [_perturb(value[0]), *value[1:]]
    return value


@pytest.mark.parametrize("domain,index", [("airline", 0), ("airline", 1), ("retail", 0), ("retail", 2)])
def test_perturbed_gold_action_scores_zero(domain, index):
    tasks = [t for t in load_tasks(domain) if any(a.name in WRITE for a in t.evaluation_criteria.actions or [])]
    task = tasks[index]
    actions = [a.model_copy(deep=True) for a in task.evaluation_criteria.actions]
    target = next(a for a in actions if a.name in WRITE)
    key = next(k for k in ("payment_id", "payment_method_id", "reservation_id", "order_id", "user_id")
               if k in target.arguments)
    target.arguments[key] = _perturb(target.arguments[key])
    env = make_env(domain, task=task)
    replay(env, actions)
    assert db_check(env) == 0.0
    result = asyncio.run(score_episode(env, [], "user_stop"))
    assert result["reward"] == 0.0 and result["breakdown"]["DB"] == 0.0


def test_perturbed_telecom_refuel_fails_assertion():
    task = next(t for t in load_tasks("telecom") if any(a.name == "refuel_data"
                                                         for a in t.evaluation_criteria.actions or []))
    actions = [a.model_copy(deep=True) for a in task.evaluation_criteria.actions]
    refuel = next(a for a in actions if a.name == "refuel_data")
    refuel.arguments["gb_amount"] = refuel.arguments["gb_amount"] + 1
    env = make_env("telecom", task=task)
    replay(env, actions)
    assert env_assertion_check(env)[0] == 0.0


@pytest.mark.parametrize("domain", ["airline", "retail"])
def test_shared_pristine_database_is_never_changed(domain):
    """Environments share one pristine database copy-on-access: after every task's gold replay (the tests above
    ran them in this process) it still equals the shipped file, and the incremental hash equals a full one."""
    from openk2.eval.tau2.env import _db_text, _pristine
    from openk2.eval.tau2.tasks import domain_dir
    from openk2.eval.tau2.toolkit import model_hash

    root = str(domain_dir(domain))
    pristine = _pristine(domain, root)
    for task in load_tasks(domain)[:5]:
        replay(make_env(domain, task=task), task.evaluation_criteria.actions or [])
    assert model_hash(pristine) == model_hash(type(pristine).model_validate_json(_db_text(root + "/db.json")))
    # copy-on-access gives the same end state as a private full copy of the database
    task = next(t for t in load_tasks(domain) if len(t.evaluation_criteria.actions or []) > 3)
    shared = make_env(domain, task=task)
    replay(shared, task.evaluation_criteria.actions)
    private = make_env(domain, task=task)
    private.tools.db = type(pristine).model_validate_json(_db_text(root + "/db.json"))
    private.tools.pristine = None
    replay(private, task.evaluation_criteria.actions)
    assert shared.state() == private.state() != make_env(domain).state()
