"""The gym interface (train split, oracle agent) and the Benchmark classes (rollout, score from the saved
transcript, aggregate)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from openk2.eval.benchmarks.tau2 import BENCHMARKS
from openk2.eval.tau2 import load_splits, load_tasks
from openk2.eval.tau2.gym import Tau2GymEnv
from openk2.eval.tau2.oracle import oracle_pair
from openk2.eval.tau2.scoring import aggregate, pass_hat_k
from openk2.eval.tau2.tasks import DEFAULT_DATA_DIR


def test_splits_partition_tasks():
    for domain in ("airline", "retail", "telecom"):
        splits = load_splits(domain)
        assert not set(splits["train"]) & set(splits["test"])
        assert set(splits["train"]) | set(splits["test"]) == {t.id for t in load_tasks(domain)}


def test_gym_oracle_episode_on_train_split():
    tasks = load_tasks("telecom", split="train")
    task = tasks[0]
    agent, user = oracle_pair(task)
    gym = Tau2GymEnv("telecom", user=user, split="train")
    assert len(gym.tasks) == 74
    obs = gym.reset(task.id)
    assert obs["messages"][0]["role"] == "system" and obs["tools"]
    for _ in range(100):
        action = asyncio.run(agent(obs["messages"], obs["tools"]))
        obs, reward, terminated, truncated, info = gym.step(action)
        if terminated or truncated:
            break
    assert terminated and not truncated and reward == 1.0, info


def test_benchmarks_rollout_and_score_from_transcript():
    names = {b.name: b for b in BENCHMARKS}
    assert set(names) == {"tau2-airline", "tau2-retail", "tau2-telecom"}
    assert [names[n].k2_score for n in ("tau2-retail", "tau2-airline", "tau2-telecom")] == [70.6, 56.5, 65.8]
    data_dir = Path(DEFAULT_DATA_DIR)
    for name, index in (("tau2-retail", 0), ("tau2-telecom", 3)):
        bench = names[name]
        sample = bench.load(data_dir, limit=index + 1)[index]
        task = load_tasks(bench.domain)[index]
        agent, user = oracle_pair(task)
        completion = asyncio.run(bench.rollout(sample, agent, user))
        score = bench.score(sample, completion)
        assert score.value == 1.0, score.details
        # a conversation that never acts fails the DB / assertion check
        agent2, user2 = oracle_pair(task.model_copy(update={"evaluation_criteria": None}))
        bad = asyncio.run(bench.rollout(sample, agent2, user2))
        assert bench.score(sample, bad).value == 0.0


def test_pass_hat_k_and_avg():
    assert pass_hat_k(4, 4, 4) == 1.0 and pass_hat_k(2, 4, 2) == 1 / 6
    agg = aggregate({"a": [1, 1, 0, 1], "b": [0, 0, 0, 0]}, k=4)
    assert agg["avg@k"] == 37.5 and agg["pass^1"] == 37.5 and agg["pass^4"] == 0.0
