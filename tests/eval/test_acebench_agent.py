"""ACEBench agent categories with a stand-in scenario package (same layout and interface as ACEBench's simulated
APIs, self-written): the multi-turn loop with a user simulator, the multi-step loop, end-state scoring, milestones."""

import asyncio
import dataclasses
import json
import textwrap

import pytest

from openk2.eval.benchmarks.acebench_agent import process_accuracy, state_errors
from openk2.eval.registry import get_benchmark
from openk2.eval.task import BenchmarkUnavailable

BASE = '''
class BaseApi:
    def __init__(self):
        self.wifi = False
        self.logged_in = True
    def _load_scenario(self, scenario, long_context=False):
        self.wifi = scenario.get("wifi", False)
        self.logged_in = scenario.get("logged_in", True)
    def turn_on_wifi(self):
        self.wifi = True
        return {"status": True}
'''
MESSAGE = '''
from model_inference.{kind}.scenariosen.phone_platform.base_api import BaseApi
class MessageApi(BaseApi):
    def __init__(self):
        super().__init__()
        self.inbox = {{1: {{"sender_id": "A", "message": "hi"}}}}
    def _load_scenario(self, scenario, long_context=False):
        super()._load_scenario(scenario)
    def send_message(self, sender_name, receiver_name, message):
        if not self.wifi:
            return {{"status": False, "message": "no wifi"}}
        self.inbox[len(self.inbox) + 1] = {{"sender_id": sender_name, "message": message}}
        return {{"status": True}}
'''


@pytest.fixture()
def repo(tmp_path):
    root = tmp_path / "ACEBench"
    (root / "model_inference").mkdir(parents=True)
    (root / "model_inference" / "prompt_en.py").write_text('BASE_PROMPT_EN = "Phone policy."\nTRAVEL_PROMPT_EN = ""\n')
    for kind in ("multi_turn", "multi_step"):
        pkg = root / "model_inference" / kind / "scenariosen" / "phone_platform"
        pkg.mkdir(parents=True)
        (pkg / "base_api.py").write_text(textwrap.dedent(BASE))
        (pkg / "message.py").write_text(textwrap.dedent(MESSAGE.format(kind=kind)))
    return root


def _item(kind, item_id):
    q = {"id": item_id, "question": "You are Ann. Send 'see you' to Bob.",
         "initial_config": {"BaseApi": {"wifi": False}}, "involved_classes": ["BaseApi", "MessageApi"],
         "function": [{"name": "send_message"}]}
    gold = [{"BaseApi": {"wifi": True, "logged_in": True}},
            {"MessageApi": {"inbox": {"1": {"sender_id": "A", "message": "hi"},
                                      "2": {"sender_id": "Ann", "message": "see you"}}}}]
    return q, {"id": item_id, "ground_truth": gold,
               "mile_stone": ["[turn_on_wifi()]", "[send_message(sender_name='Ann', receiver_name='Bob', "
                              "message='see you')]"]}


def _bench(repo, user=True):
    return dataclasses.replace(get_benchmark("acebench-agent"),
                               options={"acebench_repo": str(repo), "has_user_model": user})


def _agent(script):
    replies = iter(script)
    prompts = []

    async def chat(messages, tools):
        prompts.append(messages)
        return {"role": "assistant", "content": next(replies)}

    return chat, prompts


GOOD = ["[turn_on_wifi()]", "[send_message(sender_name='Ann', receiver_name='Bob', message='see you')]",
        "Sent. finish conversation"]


def test_multi_turn_with_a_user_simulator(repo):
    bench = _bench(repo)
    sample = bench.sample_of("agent_multi_turn", *_item("multi_turn", "agent_multi_turn_0"))
    chat, agent_prompts = _agent(GOOD)
    user, user_prompts = _agent(["Please send 'see you' to Bob, I am Ann.", "finish conversation"])
    completion = asyncio.run(bench.rollout(sample, chat, user))
    score = bench.score(sample, completion)
    assert score.value == 1.0 and score.details["process_accuracy"] == 1.0, score.details
    assert "Phone policy." in agent_prompts[0][0]["content"]  # the policy prompt comes from the checkout
    assert "execution:[{'status': True}]" in agent_prompts[1][1]["content"]
    assert user_prompts[0][0]["content"].startswith("You are a user interacting with an agent.")


def test_multi_step_wrong_message_fails_with_partial_process(repo):
    bench = _bench(repo, user=False)
    sample = bench.sample_of("agent_multi_step", *_item("multi_step", "agent_multi_step_0"))
    chat, prompts = _agent(["[turn_on_wifi()]", "Which message?",
                            "[send_message(sender_name='Ann', receiver_name='Bob', message='bye')]",
                            "finish conversation"])
    completion = asyncio.run(bench.rollout(sample, chat, None))
    score = bench.score(sample, completion)
    assert score.value == 0.0 and score.details["process_accuracy"] == 0.5
    assert "Please do not ask me any questions" in prompts[2][1]["content"]
    assert any("inbox" in e for e in score.details["errors"])


def test_state_and_milestone_rules():
    gold = [{"C": {"d": {"1": 1}, "x": 2}}]
    assert state_errors([{"C": {"d": {"1": 1, "9": 9}, "x": 2}}], gold) == []  # extra keys inside dicts pass
    assert state_errors([{"C": {"d": {"1": 2}, "x": 2}}], gold)
    assert state_errors([], gold)
    made = [[{"f": {}}], [{"g": {"a": 1}}]]
    assert process_accuracy(made, ["[f()]", "[g(a=1)]"]) == 1.0
    assert process_accuracy(made, [["[g(a=1)]", "[f()]"], ["[f()]", "[h()]"]]) == 0.5


def test_requirements_are_named(repo, tmp_path):
    with pytest.raises(BenchmarkUnavailable, match="--acebench-repo"):
        dataclasses.replace(get_benchmark("acebench-agent"), options={}).load(tmp_path)
    with pytest.raises(BenchmarkUnavailable, match="--user-model"):
        _bench(repo, user=False).load(tmp_path)


def test_loads_the_shipped_agent_items(repo):
    from pathlib import Path

    data = Path(__file__).resolve().parents[3] / "shared" / "data"
    if not (data / "acebench").is_dir():
        pytest.skip("../shared/data not present")
    samples = _bench(repo).load(data)
    assert len(samples) == 38 and {s.category for s in samples} == {"agent_multi_turn", "agent_multi_step"}
    assert all(s.reference["mile_stone"] is not None for s in samples)
    json.dumps([s.reference for s in samples])
