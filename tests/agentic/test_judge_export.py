"""Filtering (rules, gold end state, a scripted LLM judge), the acceptance report, and the SFT export."""

from __future__ import annotations

import asyncio
import json

from openk2.agentic.examples import order_desk, order_desk_agent, order_desk_tasks
from openk2.agentic.export import export_sft
from openk2.agentic.judge import LLMJudge, acceptance_report, filter_trajectories, report_markdown, rule_checks
from openk2.agentic.simulate import ScriptedAgent, ScriptedUser, Trajectory, simulate
from openk2.agentic.tasks import attach_gold_state
from openk2.data.chat import render_chat
from openk2.llm import LLMClient, ReplayBackend

from .helpers import call


def _run(task, steps, turns):
    layer = order_desk()
    return asyncio.run(simulate(task, order_desk_agent(layer), ScriptedAgent(steps), ScriptedUser(turns), layer,
                                models={"agent": "scripted", "user": "scripted"}))


def _trajectories():
    layer = order_desk()
    cancel, status = order_desk_tasks()
    for t in (cancel, status):
        assert attach_gold_state(t, layer) is None
    good = _run(cancel, [{"role": "assistant", "content": None,
                          "tool_calls": [call("cancel_order", {"order_id": "B2"})]},
                         {"role": "assistant", "content": "Your order B2 is cancelled."}], ["Cancel B2 please."])
    wrong_state = _run(cancel, [{"role": "assistant", "content": None,
                                 "tool_calls": [call("cancel_order", {"order_id": "C3"})]},
                                {"role": "assistant", "content": "Order cancelled."}], ["Cancel my lamp."])
    wrong_state.id += "-a"
    bad_call = _run(status, [{"role": "assistant", "content": None,
                              "tool_calls": [call("get_order", {"order_id": 1}), call("teleport", {}, "c2")]},
                             {"role": "assistant", "content": "It shipped."}], ["Where is A1?"])
    judged_ok = _run(status, [{"role": "assistant", "content": None,
                               "tool_calls": [call("get_order", {"order_id": "A1"})]},
                              {"role": "assistant", "content": "A1 has shipped."}], ["Where is A1?"])
    judged_ok.id += "-b"
    judged_bad = _run(status, [{"role": "assistant", "content": None,
                                "tool_calls": [call("get_order", {"order_id": "A1"})]},
                               {"role": "assistant", "content": "It has shipped, I think."}], ["Where is A1?"])
    judged_bad.id += "-c"
    judge_garbage = _run(status, [{"role": "assistant", "content": None,
                                   "tool_calls": [call("get_order", {"order_id": "A1"})]},
                                  {"role": "assistant", "content": "Shipped!"}], ["Where is A1?"])
    judge_garbage.id += "-d"
    failed = Trajectory("traj-x", status.id, "agent-order-desk", [], [], status="error", error="LLMError: boom")
    return {t.id: t for t in (cancel, status)}, [good, wrong_state, bad_call, judged_ok, judged_bad, judge_garbage,
                                                 failed]


def test_judge_filtering_with_a_scripted_judge(tmp_path):
    tasks, trajs = _trajectories()

    def respond(endpoint, payload):
        prompt = payload["messages"][0]["content"]
        if "Shipped!" in prompt:
            return "The assistant did fine."  # not JSON
        if "I think" in prompt:
            return json.dumps({"criteria": [{"criterion": "no guessing", "met": False}], "score": 0.2,
                               "pass": False, "reason": "hedges instead of reporting the tool result"})
        return json.dumps({"criteria": [], "score": 0.9, "pass": True, "reason": "ok"})

    backend = ReplayBackend(responder=respond)
    judge = LLMJudge(LLMClient(backend, model="judge"), threshold=0.7)
    verdicts = asyncio.run(filter_trajectories(trajs, tasks, judge, concurrency=2))
    got = {v.trajectory_id: (v.kept, v.stage, v.reasons[:1]) for v in verdicts}
    good, wrong_state, bad_call, ok, bad, garbage, failed = trajs
    assert got[good.id] == (True, "judge", [])
    assert got[wrong_state.id][:2] == (False, "state")
    assert "end state differs from the gold state in ['orders']" in got[wrong_state.id][2][0]
    assert got[bad_call.id][:2] == (False, "rules")
    rules = rule_checks(bad_call, tasks[bad_call.task_id])
    assert "get_order: order_id: 1 is not of type 'string'" in rules and "call to unknown tool 'teleport'" in rules
    assert got[ok.id] == (True, "judge", [])
    assert got[bad.id][0] is False and "hedges" in got[bad.id][2][0]
    assert next(v for v in verdicts if v.trajectory_id == bad.id).reasons[1] == "judge: criterion not met: no guessing"
    assert got[garbage.id][0] is False and "not valid JSON" in got[garbage.id][2][0]
    assert got[failed.id] == (False, "rules", ["simulation failed: LLMError: boom"])
    assert len(backend.calls) == 4  # only trajectories that pass rules and state reach the judge

    report = acceptance_report(verdicts, tasks)
    assert (report["trajectories"], report["kept"], report["rejected"]) == (7, 2, 5)
    assert report["rejected_by_stage"] == {"state": 1, "rules": 2, "judge": 2}
    assert report["by_difficulty"]["multi_step"] == {"total": 2, "kept": 1}
    assert report["top_rejection_reasons"]["judge: rubric not met"] == 1
    assert "acceptance 28.6%" in report_markdown(report, {"total": {"requests": 4}})


def test_export_renders_with_the_k2_template_and_has_provenance(tmp_path):
    tasks, trajs = _trajectories()
    good = trajs[0]
    broken = Trajectory("traj-broken", good.task_id, good.agent_id,
                        [{"role": "system", "content": "s"}, {"role": "tool", "tool_call_id": "zz", "content": "x"}],
                        good.tools)
    agent = order_desk_agent()
    n, rejected = export_sft(tmp_path / "sft.jsonl", [good, broken], tasks, {agent.id: agent},
                             pipeline={"version": 1})
    assert n == 1 and rejected[0].item == "traj-broken" and "cannot render" in rejected[0].reason
    rec = json.loads((tmp_path / "sft.jsonl").read_text().splitlines()[0])
    assert rec["tools"] == order_desk().tools()
    calls = [c for m in rec["messages"] for c in m.get("tool_calls", [])]
    assert calls[0]["id"] == "functions.cancel_order:0" and isinstance(calls[0]["function"]["arguments"], str)
    assert rec["messages"][3] == {"role": "tool", "content": "order B2 cancelled", "tool_call_id": calls[0]["id"]}
    assert rec["provenance"] | {"models": None} == {
        "trajectory": good.id, "task": "cancel-B2", "agent": "agent-order-desk", "domain": "retail/orders",
        "difficulty": "multi_step", "models": None, "seed": 11, "judge_score": None, "pipeline": {"version": 1}}
    text = render_chat(rec["messages"], rec["tools"])
    assert "<|tool_call_begin|>functions.cancel_order:0<|tool_call_argument_begin|>" in text
    assert "## Return of functions.cancel_order:0\norder B2 cancelled" in text
