"""The self-critique rubric reward: its logic with a scripted critic, its LLM path against a real
`openk2 serve` subprocess (random-weights tiny model: the plumbing is under test, not the verdicts)."""

import asyncio
import json
import re

import pytest

from openk2.rl.rewards import RubricCritic, bradley_terry, parse_verdict, score_group
from openk2.rl.types import Trajectory


def traj(text: str, reward: float | None = None, group: str = "q1") -> Trajectory:
    return Trajectory(group_id=group, prompt_ids=[1], response_ids=[2], loss_mask=[1], reward=reward,
                      metadata={"response_text": text})


class ScriptedCritic:
    """Prefers the response without opening praise, then the shorter one; `always` answers a fixed verdict."""

    def __init__(self, always: str | None = None):
        self.always, self.requests = always, []

    async def chat(self, messages, **params):
        self.requests.append((messages, params))
        if self.always is not None:
            return self.always
        a, b = re.search(r"Response A:\n(.*)\n\nResponse B:\n(.*)\n\nWhich", messages[-1]["content"], re.S).groups()

        def badness(x):
            return (x.startswith("Great question"), len(x))

        verdict = "tie" if badness(a) == badness(b) else ("A" if badness(a) < badness(b) else "B")
        return f"A is {'fine'}.\nVerdict: {verdict}"


GROUP = ["Great question! Paris.", "Paris.", "The capital of France is Paris.", "Paris."]


def test_pairwise_wins_become_scores_and_both_orders_cancel_position_bias():
    critic = RubricCritic(ScriptedCritic())
    scores = asyncio.run(critic.score_group([traj(t) for t in GROUP], {"prompt": "Capital of France?"}))
    win_rates = [s["score"] for s in scores]
    assert win_rates == pytest.approx([0.0, 5 / 6, 1 / 3, 5 / 6])  # praise loses everything; the two "Paris." tie
    assert all(s["comparisons"] == 3 and s["unparsed"] == 0 for s in scores)
    assert len(critic.client.requests) == 12  # 6 pairs × both orders
    prompt = critic.client.requests[0][0][-1]["content"]
    assert "Capital of France?" in prompt and "No initial praise" in prompt and "Clarity and relevance" in prompt

    biased = RubricCritic(ScriptedCritic(always="Verdict: A"))
    assert [s["score"] for s in asyncio.run(biased.score_group([traj(t) for t in GROUP], {}))] == [0.5] * 4

    bt = RubricCritic(ScriptedCritic(), score="bradley_terry")
    bt_scores = [s["score"] for s in asyncio.run(bt.score_group([traj(t) for t in GROUP], {}))]
    assert bt_scores[0] < bt_scores[2] < bt_scores[1] == pytest.approx(bt_scores[3])
    with pytest.raises(ValueError, match="valid: win_rate, bradley_terry"):
        RubricCritic(ScriptedCritic(), score="elo")


def test_unparseable_verdicts_are_ties_and_counted_and_task_rubrics_are_shown():
    critic = RubricCritic(ScriptedCritic(always="I cannot decide"), both_orders=False)
    scores = asyncio.run(critic.score_group([traj("a"), traj("b")], {"prompt": "p", "rubrics": ["Mention Paris."]}))
    assert [s["score"] for s in scores] == [0.5, 0.5] and scores[0]["unparsed"] == 1
    assert "Task rubrics:\n1. Mention Paris." in critic.client.requests[0][0][-1]["content"]
    assert parse_verdict("**Verdict:** B") == 0.0 and parse_verdict("verdict: tie.") == 0.5
    assert parse_verdict("A") == 1.0 and parse_verdict("") is None


def test_bradley_terry_recovers_the_order():
    wins = [[0, 3, 3], [1, 0, 3], [1, 1, 0]]
    s = bradley_terry(wins)
    assert s[0] > s[1] > s[2] and abs(s[0] * s[1] * s[2] - 1) < 1e-6


def test_calibration_against_verifiable_rewards_and_refresh(tmp_path):
    # Verified-better responses are the shorter ones here, so the scripted critic agrees every time.
    groups = [([traj("42", 1.0, "m1"), traj("it is 41 I think", 0.0, "m1"), traj("7", 1.0, "m1")], {"prompt": "q"})]
    log = tmp_path / "critic.jsonl"
    critic = RubricCritic(ScriptedCritic(), log_path=str(log))
    record = asyncio.run(critic.calibrate(groups))
    assert record == {"critic_version": 0, "pairs": 2, "agreement": 1.0, "unparsed": 0}
    seeds_before = {p["seed"] for _, p in critic.client.requests}

    pushed = []
    asyncio.run(critic.refresh(3, push_weights=lambda: pushed.append("weights"), client=ScriptedCritic("Verdict: A")))
    record = asyncio.run(critic.calibrate(groups))
    assert pushed == ["weights"] and record["critic_version"] == 3 and record["agreement"] == 0.5
    assert not seeds_before & {p["seed"] for _, p in critic.client.requests}  # a new version never hits a cache
    assert [json.loads(line)["agreement"] for line in log.read_text().splitlines()] == [1.0, 0.5]


def test_scores_are_deterministic_under_fixed_seeds():
    def scores(seed):
        critic = RubricCritic(ScriptedCritic(), max_pairs=3, seed=seed)  # 6 pairs, 3 sampled
        group = [traj(t) for t in GROUP]
        asyncio.run(score_group(group, {}, None, [(critic, 1.0)]))
        return [t.reward for t in group], [m[-1]["content"] for m, _ in critic.client.requests]

    assert scores(0) == scores(0)
    assert scores(0)[1] != scores(1)[1]  # another seed samples other pairs


@pytest.mark.slow
def test_critic_through_a_real_openk2_serve_subprocess(tmp_path):
    from openk2.model import build_model, get_preset
    from openk2.serve.testing import make_model_dir, serve_subprocess, toy_tokenizer

    tok = toy_tokenizer(vocab_size=300)
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=2048), seed=0)
    model_dir = make_model_dir(tmp_path / "critic", model, tok)
    with serve_subprocess(model_dir, "--threads", "1", "--max-len", "2048", "--device", "cpu",
                          log_path=tmp_path / "serve.log") as (url, _):

        async def go():
            critic = RubricCritic.from_spec(f"openai:{url}", model_name="critic", core_rubrics=["Be correct."],
                                            prescriptive_rubrics=["No praise."], max_tokens=4)
            try:
                group = [traj("Paris"), traj("Lyon"), traj("Paris!")]
                await score_group(group, {"prompt": "Capital of France?"}, None, [(critic, 1.0)])
                return group, critic.client.usage
            finally:
                await critic.aclose()

        group, usage = asyncio.run(go())
    infos = [t.reward_info["RubricCritic"] for t in group]
    assert all("group_reward_error" not in t.reward_info for t in group), group[0].reward_info
    assert all(0.0 <= t.reward <= 1.0 for t in group) and sum(t.reward for t in group) == pytest.approx(1.5)
    assert all(i["comparisons"] == 2 for i in infos)
    counters = usage.model("critic")
    assert counters.requests == 6 and counters.completion_tokens > 0  # 3 pairs × both orders, all answered
