"""RL environments: deterministic under seeds, disjoint held-out splits, rewards from the real checkers, and the
episode driver's token bookkeeping (policy tokens verbatim, environment tokens loss-masked)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from openk2.agentic.world_tasks import ExpertAgent, make_tasks
from openk2.data.chat_format import ChatFormat
from openk2.data.toolcall import format_tool_call_id, render_tool_calls
from openk2.data.world import World
from openk2.eval.task import Benchmark, Completion, Sample, Score
from openk2.rl.envs import BenchFamily, check_family, make_family
from openk2.rl.envs.bench import BenchmarkEnv
from openk2.rl.envs.procedural import DigitsEnv, digit_tasks, digits_reward, sft_records
from openk2.rl.envs.world import WorldToolEnv
from openk2.rl.rollout import EpisodeBudget, run_episode
from openk2.rl.types import GenOut, SamplingParams


def run(coro):
    return asyncio.run(coro)


def as_text(message: dict, first_index: int = 0) -> str:
    """An assistant message as the K2 text a model would write (calls renamed to K2's functions.NAME:IDX)."""
    calls = [{**c, "id": format_tool_call_id(c["function"]["name"], first_index + i)}
             for i, c in enumerate(message.get("tool_calls") or [])]
    return (message.get("content") or "") + (render_tool_calls(calls) if calls else "")


def test_digit_tasks_are_deterministic_and_splits_disjoint():
    a, b = digit_tasks("train", 300, seed=3), digit_tasks("train", 300, seed=3)
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b]
    assert [t.question for t in digit_tasks("train", 300, seed=4)] != [t.question for t in a]
    held = digit_tasks("heldout", 300, seed=0)
    assert not {t.question for t in held} & {t.question for t in digit_tasks("train", 3000, seed=0)}
    sft = {r["messages"][1]["content"] for r in sft_records(500, seed=0)}
    assert not sft & {t.question for t in held}
    t = next(t for t in a if t.kind == "sort")
    assert t.answer.split() == sorted(t.question.split(":")[1].split())
    assert digits_reward(t, t.answer) == 1.0 and digits_reward(t, t.answer.replace(" ", "")) == 1.0
    assert digits_reward(t, "") == 0.0 and digits_reward(t, t.answer + " 1") == 0.0


def test_digit_tasks_bad_input():
    with pytest.raises(ValueError, match="split must be"):
        digit_tasks("test", 3)
    with pytest.raises(ValueError, match="kinds"):
        digit_tasks("train", 3, kinds=("multiply",))
    with pytest.raises(ValueError, match="distinct"):
        digit_tasks("train", 500, kinds=("add",), levels=(1,))  # only 100 one-digit sums exist
    with pytest.raises(ValueError, match="unknown task family"):
        check_family("chess")


def test_digits_env_single_turn():
    task = digit_tasks("heldout", 1, seed=0)[0]
    env = DigitsEnv()
    obs = run(env.reset(task))
    assert obs.messages[-1]["content"] == task.question and env.task_type == task.task_type
    right = run(env.step(task.answer))
    assert right.terminated and right.reward == 1.0
    run(env.reset(task))
    assert run(env.step("nope")).reward == 0.0


def _world():
    return World.generate(seed=0, n_people=100)


def test_world_env_with_expert_text_is_scored_by_the_checker():
    world = _world()
    from openk2.data.tool_parsers import get_tool_parser

    for task in make_tasks(world, "train", 6, seed=1):
        env = WorldToolEnv(world, get_tool_parser("kimi_k2"), max_turns=4)
        obs = run(env.reset(task))
        expert = ExpertAgent(task)
        messages = list(obs.messages)
        n_calls = 0
        for _ in range(4):
            reply = expert.act(messages)
            result = run(env.step(as_text(reply, n_calls)))
            n_calls += len(reply.get("tool_calls") or [])
            messages.append(reply)
            if result.terminated or result.truncated:
                break
            messages += result.observation.messages
        assert result.terminated and result.reward == 1.0, (task.kind, result.info)
    env = WorldToolEnv(world, get_tool_parser("kimi_k2"))
    run(env.reset(make_tasks(world, "heldout", 1, seed=0)[0]))
    assert run(env.step("I guess Paris.")).reward == 0.0


def test_tau2_adapter_runs_a_train_task_with_the_oracle():
    from openk2.data.tool_parsers import get_tool_parser
    from openk2.eval.tau2 import load_tasks
    from openk2.eval.tau2.oracle import oracle_pair
    from openk2.rl.envs.tau2 import Tau2ToolEnv

    task = load_tasks("telecom", split="train")[0]
    agent, user = oracle_pair(task)
    env = Tau2ToolEnv("telecom", user=user, tool_parser=get_tool_parser("kimi_k2"))
    obs = run(env.reset(task.id))
    messages = list(obs.messages)
    n_calls = 0
    for _ in range(60):
        action = run(agent(messages, obs.tools))
        result = run(env.step(as_text(action, n_calls)))
        n_calls += len(action.get("tool_calls") or [])
        if result.terminated or result.truncated:
            break
        messages = [*messages, action, *result.observation.messages]
    assert result.terminated and result.reward == 1.0, result.info


@dataclass
class _Echo(Benchmark):
    """A generated benchmark for the adapter: answer with the sample's id."""

    name: str = "echo"
    seeded: bool = True

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        return [Sample(id=f"{seed}-{i}", messages=[{"role": "user", "content": f"say {seed}-{i}"}],
                       reference=f"{seed}-{i}") for i in range(limit or 3)]

    def score(self, sample: Sample, completion: Completion) -> Score:
        return Score(float(completion.text.strip() == sample.reference), extracted=completion.text)


def test_benchmark_env_scores_with_the_benchmark_and_refuses_eval_sets():
    bench = _Echo()
    sample = bench.load(Path("."), 1, seed=5)[0]
    env = BenchmarkEnv(bench)
    run(env.reset(sample))
    assert run(env.step("5-0")).reward == 1.0
    run(env.reset(sample))
    assert run(env.step("6-0")).reward == 0.0
    gsm8k = BenchFamily("gsm8k", "../shared/data")
    with pytest.raises(ValueError, match="must not train"):
        gsm8k.train_tasks(4, seed=0)


class _ScriptedEngine:
    """Returns fixed token lists in turn (a test double of the engine around the episode driver)."""

    def __init__(self, outputs: list[list[int]], stop: int) -> None:
        self.outputs, self.stop, self.version, self.prompts = list(outputs), stop, 7, []

    async def generate(self, prompt_ids, params: SamplingParams, request_id: str) -> GenOut:
        self.prompts.append(list(prompt_ids))
        ids = self.outputs.pop(0)[: params.max_new_tokens]
        return GenOut(ids, [-0.5] * len(ids), "stop" if ids and ids[-1] == self.stop else "length", self.version)


def test_episode_driver_masks_env_tokens_and_keeps_policy_tokens_verbatim():
    from openk2.data.tokenizer import IM_END
    from openk2.data.tool_parsers import get_tool_parser
    from openk2.serve.testing import toy_tokenizer

    tok = toy_tokenizer()
    fmt = ChatFormat.k2(tok)
    world = _world()
    task = next(t for t in make_tasks(world, "train", 20, seed=0) if t.kind == "lookup")
    expert = ExpertAgent(task)
    env = WorldToolEnv(world, get_tool_parser("kimi_k2"))
    obs = run(env.reset(task))
    call = expert.act(obs.messages)
    end = tok.token_id(IM_END)
    turn1 = tok.encode(render_tool_calls(call["tool_calls"])) + [end]
    turn2 = tok.encode(f"The answer is {task.answer}.") + [end]
    engine = _ScriptedEngine([turn1, turn2], end)
    traj = run(run_episode(env, task, engine, fmt, SamplingParams(), budget=EpisodeBudget(max_new_tokens=400),
                           group_id="g", request_id="g/0", task_type="world/lookup"))
    assert traj.status == "completed" and traj.reward == 1.0, traj.reward_info
    n1 = len(turn1)
    assert traj.response_ids[:n1] == turn1 and traj.loss_mask[:n1] == [1] * n1
    env_part = traj.loss_mask[n1:len(traj.response_ids) - len(turn2)]
    assert env_part and set(env_part) == {0}
    assert traj.response_ids[-len(turn2):] == turn2 and traj.loss_mask[-len(turn2):] == [1] * len(turn2)
    assert traj.versions[:n1] == [7] * n1 and set(traj.versions[n1:-len(turn2)]) == {-1}
    # the second request saw exactly prompt + first turn + the env's tokens (token-in/token-out)
    assert engine.prompts[1] == traj.prompt_ids + traj.response_ids[:-len(turn2)]


def test_episode_budget_truncates_and_segments_pause_then_resume():
    from openk2.data.tokenizer import IM_END
    from openk2.serve.testing import toy_tokenizer

    tok = toy_tokenizer()
    fmt = ChatFormat.k2(tok)
    task = digit_tasks("train", 1, seed=0, kinds=("reverse",), levels=(2,))[0]
    end = tok.token_id(IM_END)
    answer = tok.encode(task.answer) + [end]
    # budget 3 < the answer: truncated
    traj = run(run_episode(DigitsEnv(), task, _ScriptedEngine([answer], end), fmt, SamplingParams(),
                           budget=EpisodeBudget(max_new_tokens=3), group_id="g", request_id="r", task_type="d"))
    assert traj.status == "truncated" and traj.reward is None and traj.n_policy_tokens == 3
    # segments of 3 tokens: paused ("aborted"), then resumed until the answer is complete
    engine = _ScriptedEngine([answer[i:i + 3] for i in range(0, len(answer), 3)], end)
    budget = EpisodeBudget(max_new_tokens=40, segment_tokens=3)
    traj = run(run_episode(DigitsEnv(), task, engine, fmt, SamplingParams(), budget=budget, group_id="g",
                           request_id="r", task_type="d"))
    n_pauses = 0
    while traj.status == "aborted":
        n_pauses += 1
        traj = run(run_episode(DigitsEnv(), task, engine, fmt, SamplingParams(), budget=budget, group_id="g",
                               request_id="r", task_type="d", resume=traj))
    assert n_pauses >= 1 and traj.status == "completed" and traj.reward == 1.0
    assert traj.response_ids == answer and traj.n_segments == len(engine.prompts)


def test_failing_and_hanging_rewards_fail_the_sample_not_the_run():
    from openk2.data.tokenizer import IM_END
    from openk2.serve.testing import toy_tokenizer

    tok = toy_tokenizer()
    fmt = ChatFormat.k2(tok)
    end = tok.token_id(IM_END)
    task = digit_tasks("train", 1, seed=0)[0]

    class Raising(DigitsEnv):
        async def step(self, action_text):
            raise RuntimeError("scorer crashed")

    class Hanging(DigitsEnv):
        async def step(self, action_text):
            await asyncio.sleep(60)

    for env, reason in ((Raising(), "raised RuntimeError: scorer crashed"), (Hanging(), "timed out")):
        traj = run(run_episode(env, task, _ScriptedEngine([[5, end]], end), fmt, SamplingParams(),
                               budget=EpisodeBudget(max_new_tokens=8, step_timeout_s=0.2), group_id="g",
                               request_id="r", task_type="d"))
        assert traj.status == "failed" and traj.reward == 0.0 and reason in traj.reward_info["error"]


def test_families_from_config():
    from openk2.rl.config import TasksSection

    fam = make_family("digits", TasksSection(digits_kinds=["sort"], digits_levels=[2]), None)
    tasks = fam.train_tasks(10, seed=0)
    assert {fam.task_type(t) for t in tasks} == {"digits/sort"} and {fam.level(t) for t in tasks} == {2}
    world = make_family("world", TasksSection(), None)
    held = world.heldout_tasks(5, seed=0)
    assert all(t.split == "heldout" for t in held) and world.task_type(held[0]).startswith("world/")


def test_fact_tasks_are_deterministic_disjoint_by_person_and_rewarded_by_value():
    from openk2.data.world import qa_people
    from openk2.rl.envs.facts import FactsEnv, fact_reward, fact_tasks, sft_records

    world = _world()
    train, held = fact_tasks(world, 0.5, "train", seed=1), fact_tasks(world, 0.5, "heldout", seed=1)
    assert [t.to_dict() for t in train] == [t.to_dict() for t in fact_tasks(world, 0.5, "train", seed=1)]
    assert [t.id for t in fact_tasks(world, 0.5, "train", seed=2)] != [t.id for t in train]
    qa = {p.name for p in qa_people(world, 0.5)}
    assert {t.person for t in train} == qa and not {t.person for t in held} & qa
    assert {t.person for t in held} <= {p.name for p in world.train_people}  # never the people in no document
    assert len(train) == len(qa) * 6 and len(fact_tasks(world, 0.5, "heldout", 10)) == 10
    warm = sft_records(world, 0.5)
    assert {r["messages"][1]["content"] for r in warm} <= {t.question for t in train}
    assert not {r["messages"][1]["content"] for r in warm} & {t.question for t in held}
    city = next(t for t in held if t.attribute == "birth_city")
    other = next(c.name for c in world.cities if c.name != city.answer)
    assert fact_reward(world, city, city.answer) == 1.0
    assert fact_reward(world, city, f"{city.person.split()[0]} was born in {city.answer.lower()}.") == 1.0
    assert fact_reward(world, city, f"{city.answer} or {other}") == 0.0  # listing candidates earns nothing
    assert fact_reward(world, city, city.answer + "x") == 0.0 and fact_reward(world, city, "") == 0.0
    date = next(t for t in held if t.attribute == "birth_date")
    assert fact_reward(world, date, date.answer) == 1.0
    assert fact_reward(world, date, date.answer.replace(date.answer.split()[-1], "1900")) == 0.0
    env = FactsEnv(world)
    obs = run(env.reset(city))
    assert obs.messages[-1]["content"] == city.question and env.task_type == "facts/birth_city"
    assert run(env.step(city.answer)).reward == 1.0
    with pytest.raises(ValueError, match="Q/A documents"):
        fact_tasks(world, 0.0, "train")
    with pytest.raises(ValueError, match="attributes"):
        fact_tasks(world, 0.5, "train", attributes=("shoe_size",))


def test_facts_warm_start_per_person_holds_every_train_question_once():
    from openk2.rl.envs.facts import SYSTEM_PROMPT, fact_tasks, sft_records

    world = _world()
    single, grouped = sft_records(world, 0.5), sft_records(world, 0.5, per_person=True)
    pairs = {(r["messages"][1]["content"], r["messages"][2]["content"]) for r in single}
    got = [(m["content"], r["messages"][2 * i + 2]["content"]) for r in grouped
           for i, m in enumerate(r["messages"][1::2])]
    assert len(got) == len(single) and set(got) == pairs  # the same question -> answer pairs, each once
    assert all(a.startswith(" ") for _, a in got)
    train = {t.question: t.person for t in fact_tasks(world, 0.5, "train")}
    for r in grouped:  # one person per record, every attribute, behind one system prompt
        assert r["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert [m["role"] for m in r["messages"][1:]] == ["user", "assistant"] * 6
        assert len({train[m["content"]] for m in r["messages"][1::2]}) == 1
    from openk2.train.rl_stage import warm_start_records

    assert warm_start_records(0, 100, 0.5) == grouped  # what the speedrun's SFT stage mixes in
    assert warm_start_records(0, 100, 0.5, per_person=False) == single


def test_facts_partial_credit_rewards_a_wrong_answer_of_the_right_kind_only():
    from openk2.rl.config import TasksSection
    from openk2.rl.envs.facts import KIND_CREDIT, FactsEnv, fact_reward, fact_tasks

    world = _world()
    held = fact_tasks(world, 0.5, "heldout")
    city = next(t for t in held if t.attribute == "birth_city")
    uni = next(t for t in held if t.attribute == "university")
    other_city = next(c.name for c in world.cities if c.name != city.answer)
    other_uni = next(u.name for u in world.universities if u.name != uni.answer and "University of" in u.name)
    date = next(t for t in held if t.attribute == "birth_date").answer
    assert fact_reward(world, city, other_city, partial_credit=True) == KIND_CREDIT < 1.0
    assert fact_reward(world, city, other_city) == 0.0  # exact reward unless asked for
    assert fact_reward(world, city, city.answer, partial_credit=True) == 1.0
    assert fact_reward(world, city, date, partial_credit=True) == 0.0  # a date for a city question
    assert fact_reward(world, city, f"{other_city} on {date}", partial_credit=True) == 0.0  # two kinds
    assert fact_reward(world, city, f"{other_city} or {city.answer}", partial_credit=True) == 0.0  # two cities
    assert fact_reward(world, city, "", partial_credit=True) == 0.0
    # a university named after a city is one answer of the university kind, not also a city
    assert fact_reward(world, uni, other_uni, partial_credit=True) == KIND_CREDIT
    env = make_family("facts", TasksSection(facts_partial_credit=True), None).make_env()
    run(env.reset(city))
    step = run(env.step(other_city))
    assert isinstance(env, FactsEnv) and step.reward == KIND_CREDIT and step.info["correct"] is False


def test_facts_biography_split_trains_on_half_the_biography_only_people_and_holds_out_the_rest():
    from openk2.data.world import qa_people
    from openk2.rl.config import TasksSection
    from openk2.rl.envs.facts import fact_tasks, split_people

    world = _world()
    qa = {p.name for p in qa_people(world, 0.5)}
    default, bio = split_people(world, 0.5), split_people(world, 0.5, "biography")
    assert set(bio["train"]) | set(bio["heldout"]) == set(default["heldout"])  # the biography-only people
    assert not set(bio["train"]) & set(bio["heldout"]) and not set(bio["train"]) & qa
    assert abs(len(bio["train"]) - len(bio["heldout"])) <= 1
    fam = make_family("facts", TasksSection(facts_train_people="biography"), None)
    train, held = fam.train_tasks(1000, seed=0), fam.heldout_tasks(1000, seed=0)
    assert {t.person for t in train} == set(bio["train"]) and {t.person for t in held} == set(bio["heldout"])
    assert [t.id for t in held] == [t.id for t in fact_tasks(world, 0.5, "heldout", train_people="biography")]
    with pytest.raises(ValueError, match="train people"):
        split_people(world, 0.5, "everyone")


def test_facts_family_from_config_matches_the_world_facts_benchmark():
    from openk2.eval.benchmarks.world_facts import WorldFacts
    from openk2.eval.task import Completion
    from openk2.rl.config import TasksSection

    fam = make_family("facts", TasksSection(facts_attributes=["hobby", "field"]), None)
    tasks = fam.train_tasks(1000, seed=0)
    assert len(tasks) == 90 and {fam.task_type(t) for t in tasks} == {"facts/hobby", "facts/field"}
    bench = WorldFacts()
    samples = bench.load(Path("."), seed=0)
    rl_held = make_family("facts", TasksSection(), None).heldout_tasks(1000, seed=0)
    assert [s.id for s in samples] == [t.id for t in rl_held]
    assert bench.score(samples[0], Completion(text=rl_held[0].answer)).value == 1.0
    from dataclasses import replace

    from openk2.eval.task import BenchmarkDataError

    with pytest.raises(BenchmarkDataError, match="no world here"):  # a model directory without a world
        replace(bench, options={"run_dir": str(Path(__file__).parent)}).load(Path("."))


def test_facts_paraphrase_and_linked_families_are_deterministic_disjoint_and_rewarded_by_value():
    from openk2.data.world import QA_PROMPTS, qa_people
    from openk2.rl.config import TasksSection
    from openk2.rl.envs.facts import KIND_CREDIT, LINKED_ATTRIBUTES, fact_reward, fact_tasks

    world = _world()
    qa = {p.name for p in qa_people(world, 0.5)}
    facts = {t.question for t in fact_tasks(world, 0.5, "heldout")}
    for name in ("facts_paraphrase", "facts_linked"):
        fam = make_family(name, TasksSection(facts_partial_credit=True), None)
        train, held = fam.train_tasks(1000, seed=0), fam.heldout_tasks(1000, seed=0)
        assert [t.to_dict() for t in train] == [t.to_dict() for t in fam.train_tasks(1000, seed=0)]
        assert [t.id for t in fam.train_tasks(1000, seed=1)] != [t.id for t in train]
        assert {t.person for t in train} == qa and not {t.person for t in held} & qa  # disjoint by person
        assert len(train) == len(qa) * (4 if name == "facts_linked" else 6)
        assert {fam.task_type(t).split("/")[0] for t in held} == {name}  # own evaluation keys and budget
        assert not {t.question for t in held} & facts  # no question of the Q/A documents' words
        assert not any(t.question in q for t in held for q in QA_PROMPTS.values())
        for task in held[:12]:
            env = fam.make_env()
            run(env.reset(task))
            assert run(env.step(task.answer)).reward == 1.0
            assert run(env.step("")).reward == 0.0
    linked = make_family("facts_linked", TasksSection(), None).heldout_tasks(1000, seed=0)
    assert {t.attribute for t in linked} == set(LINKED_ATTRIBUTES)
    people = {p.name: p for p in world.people}
    city = next(t for t in linked if t.attribute == "employer_city")
    assert city.answer == world.company(people[city.person].employer).city
    birth = people[city.person].birth_city
    if birth != city.answer:  # the person's birth city is a city, but the wrong one
        assert fact_reward(world, city, birth) == 0.0 and fact_reward(world, city, birth, True) == KIND_CREDIT
    region = next(t for t in linked if t.attribute == "birth_region")
    assert region.answer == world.city(people[region.person].birth_city).region
    assert fact_reward(world, region, next(r for r in world.regions if r != region.answer)) == 0.0
    with pytest.raises(ValueError, match="attributes"):
        fact_tasks(world, 0.5, "train", attributes=("birth_city",), family="facts_linked")
    with pytest.raises(ValueError, match="family"):
        fact_tasks(world, 0.5, "train", family="facts_elsewhere")


def test_world_train_tasks_mix_registry_worlds_and_run_on_their_own_tools():
    from openk2.data.tool_parsers import get_tool_parser
    from openk2.rl.envs.world import RegistryTask, world_train_tasks

    world = _world()
    tasks = world_train_tasks(world, 30, seed=0, registry_worlds=2)
    again = world_train_tasks(world, 30, seed=0, registry_worlds=2)
    assert [t.id for t in tasks] == [t.id for t in again] and len({t.id for t in tasks}) == 30
    assert [t.id for t in world_train_tasks(world, 5, seed=0)] == [t.id for t in make_tasks(world, "train", 5, 0)]
    assert {t.kind for t in world_train_tasks(world, 20, seed=0, registry_worlds=1, kinds={"count": 1.0})} == {"count"}
    others = [t for t in tasks if isinstance(t, RegistryTask)]
    assert {t.world.seed for t in others} == {2000, 2001} and len(others) == 20
    heldout = {p.name for p in world.heldout_people}
    assert not any(h in t.task.instruction for t in others for h in heldout)
    own_names = {p.name for p in world.people}
    rt = next(t for t in others if t.kind == "lookup" and t.task.person not in own_names)
    env = WorldToolEnv(world, get_tool_parser("kimi_k2"))
    obs = run(env.reset(rt))
    assert rt.task.person in obs.messages[-1]["content"]
    call = ExpertAgent(rt.task).act(obs.messages)
    result = run(env.step(as_text(call)))
    assert not result.observation.messages[0]["content"].startswith("Error"), result.observation.messages
    answer = {"role": "assistant", "content": f"It is {result.observation.messages[0]['content']}."}
    assert run(env.step(as_text(answer))).reward == 1.0
    # the same request on the pretraining world's tools fails: the person is not in its registry
    run(env.reset(rt.task))
    assert run(env.step(as_text(call))).observation.messages[0]["content"].startswith("Error")


def test_world_partial_credit_rewards_gold_calls_but_never_passes():
    from openk2.data.tool_parsers import get_tool_parser
    from openk2.rl.envs.world import gold_call_credit

    world = _world()
    task = next(t for t in make_tasks(world, "train", 40, seed=0) if t.kind == "update")
    parser = get_tool_parser("kimi_k2")
    expert = ExpertAgent(task)

    def play(partial: bool, answer: str, wrong_name: bool = False) -> float:
        env = WorldToolEnv(world, parser, partial_credit=partial)
        messages = list(run(env.reset(task)).messages)
        call = expert.act(messages)
        if wrong_name:
            call["tool_calls"][0]["function"]["arguments"] = call["tool_calls"][0]["function"]["arguments"].replace(
                task.person, "Nobody Atall")
        result = run(env.step(as_text(call)))
        return run(env.step(answer)).reward if not result.terminated else result.reward

    assert play(True, "Done.") == 0.25            # the gold lookup (1 of 2 gold calls, all its arguments), no update
    assert play(False, "Done.") == 0.0            # exact task success only
    assert play(True, "Done.", wrong_name=True) == 0.125  # the lookup's attribute (1 of its 2 arguments)
    assert gold_call_credit(task, [{"role": "assistant", "tool_calls": [
        {"function": {"name": a["name"], "arguments": a["arguments"]}} for a in task.gold_actions]}]) == 1.0
    garbled = [{"role": "assistant", "tool_calls": [{"function": {"name": "lookup", "arguments": "{oops"}}]}]
    assert gold_call_credit(task, garbled) == 0.0
    refuse = next(t for t in make_tasks(world, "train", 40, seed=0) if t.kind == "refuse")
    assert gold_call_credit(refuse, []) == 0.0
