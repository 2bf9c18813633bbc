import time

import pytest

from openk2.data.world import (
    ATTRIBUTES,
    HELDOUT_STYLES,
    N_DEMO_PEOPLE,
    QA_PROMPTS,
    RECALL_PROMPTS,
    TRAIN_STYLES,
    City,
    World,
    answer_matches,
    chance_accuracy,
    probe_accuracy,
    probe_breakdown,
    qa_people,
    render_biography,
    world_documents,
    world_probes,
)


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(seed=7, n_people=60)


@pytest.fixture(scope="module")
def train_docs(world: World) -> list[str]:
    return world_documents(world, renderings_per_person=6)


def test_generation_is_deterministic_and_seeded() -> None:
    a, b, c = World.generate(3, 50), World.generate(3, 50), World.generate(4, 50)
    assert a == b
    assert a.people != c.people
    assert world_documents(a) == world_documents(b)
    assert world_probes(a) == world_probes(b)


def test_default_corpus_size_and_speed() -> None:
    t0 = time.perf_counter()
    world = World.generate()
    docs = world_documents(world)
    seconds = time.perf_counter() - t0
    chars = sum(map(len, docs))
    assert 2_000_000 <= chars <= 5_000_000
    assert seconds < 5.0


def test_json_round_trip(tmp_path, world: World) -> None:
    path = tmp_path / "world.json"
    world.save(path)
    loaded = World.load(path)
    assert loaded == world
    assert world_documents(loaded, renderings_per_person=3) == world_documents(world, renderings_per_person=3)
    with pytest.raises(ValueError, match="format"):
        World.from_dict({**world.to_dict(), "format": "other"})


def test_people_split_and_names(world: World, train_docs: list[str]) -> None:
    names = [p.name for p in world.people]
    assert len(set(names)) == len(names) == 60
    assert len(world.train_people) + len(world.heldout_people) == 60
    assert world.demo_people == world.heldout_people[:N_DEMO_PEOPLE]
    corpus = "\n".join(train_docs + world_documents(world, split="validation"))
    for p in world.heldout_people:
        assert p.name not in corpus  # surnames are shared between people, full names are not
    for p in world.train_people:
        assert p.name in corpus


def test_styles_split_between_train_and_validation(world: World, train_docs: list[str]) -> None:
    val_docs = world_documents(world, split="validation")
    assert len(val_docs) == len(world.train_people) * len(HELDOUT_STYLES)
    assert len(train_docs) == len(world.train_people) * 6 + len(world.cities) + len(world.companies)
    for marker in ("To whom it may concern", "Fun facts about"):  # openers of the held-out styles
        assert any(marker in d for d in val_docs)
        assert not any(marker in d for d in train_docs)
    assert "encyclopedic" in TRAIN_STYLES and not set(TRAIN_STYLES) & set(HELDOUT_STYLES)


def test_every_style_states_every_fact(world: World) -> None:
    import random

    p = world.train_people[0]
    for style in TRAIN_STYLES + HELDOUT_STYLES:
        for k in range(5):
            text = render_biography(world, p, style, random.Random(k))
            assert "{" not in text and "}" not in text
            for attr in ATTRIBUTES:
                value = p.answer(attr)
                if attr == "birth_date" and value not in text:  # some styles write "May 3 ... 1987"
                    month_day = value.split(" ")[1] + " " + value.split(" ")[0]
                    assert month_day in text and str(p.birth_date.year) in text, (style, text)
                else:
                    assert value in text, (style, attr, text)


def test_probes_answerable_from_training_docs(world: World, train_docs: list[str]) -> None:
    probes = world_probes(world)
    corpus = "\n".join(train_docs)
    seen = [p for p in probes if p.split == "seen"]
    unseen = [p for p in probes if p.split == "unseen"]
    assert len(seen) == len(world.train_people) * len(ATTRIBUTES) * 2
    assert len(unseen) == (len(world.heldout_people) - N_DEMO_PEOPLE) * len(ATTRIBUTES) * 2
    assert not {d.name for d in world.demo_people} & {p.person for p in probes}
    for p in seen:
        assert p.answer.startswith(" ")
        if p.kind == "recall":
            # The recall prompt continued by its answer is literally in the training documents.
            assert p.question + p.answer in corpus, p
        else:
            assert p.question not in corpus
            docs = [d for d in train_docs if p.person in d]
            assert any(p.answer.strip() in d for d in docs)
    assert "Q:" not in corpus  # so no QA template can occur in training text


def test_qa_prompt_has_solved_demos(world: World) -> None:
    probe = next(p for p in world_probes(world, kinds=("qa",)) if p.attribute == "employer")
    assert probe.prompt.endswith(probe.question)
    for d in world.demo_people:
        assert QA_PROMPTS["employer"].format(name=d.name) + " " + d.employer + "\n\n" in probe.prompt
    recall = world_probes(world, kinds=("recall",), attributes=("hobby",), max_people=2)
    assert len(recall) == 4
    assert recall[0].prompt == recall[0].question == RECALL_PROMPTS["hobby"].format(name=recall[0].person)


def test_answer_matching() -> None:
    assert answer_matches(" Trevane", " Trevane")
    assert answer_matches(" Trevane, a city in the Ossar region.", " Trevane")
    assert answer_matches(" trevane\nQ: next", "Trevane")
    assert not answer_matches(" Trevanex", " Trevane")
    assert not answer_matches(" Ossar", " Trevane")
    assert answer_matches("\n Trevane", " Trevane")  # leading blank lines are not the answer line
    assert not answer_matches(" The city of Trevane", " Trevane")


def test_probe_accuracy_and_breakdown(world: World) -> None:
    probes = world_probes(world)
    truth = {p.prompt: p.answer for p in probes}
    seen_people = {p.name for p in world.train_people}
    assert probe_accuracy(lambda s: truth[s] + ". More text", probes) == 1.0
    assert probe_accuracy(lambda s: " nobody", probes) == 0.0
    # An oracle that only knows the people in the documents: perfect on "seen", nothing on "unseen".
    by_prompt = {p.prompt: p for p in probes}
    report = probe_breakdown(lambda s: truth[s] if by_prompt[s].person in seen_people else " ?", probes)
    assert report["recall/seen"] == report["qa/seen"] == 1.0
    assert report["recall/unseen"] == report["qa/unseen"] == 0.0
    assert report["qa/seen/hobby"] == 1.0
    with pytest.raises(ValueError):
        probe_accuracy(lambda s: "", [])


def test_chance_accuracy_is_small(world: World) -> None:
    for attr in ATTRIBUTES:
        assert 0 < chance_accuracy(world, attr) < 0.35


def test_validate_rejects_ambiguous_values(world: World) -> None:
    bad = World.from_dict(world.to_dict())
    bad.cities = [*bad.cities, City(bad.cities[0].name + " Mere", bad.regions[0])]
    with pytest.raises(ValueError, match="prefix"):
        bad.validate()
    with pytest.raises(ValueError, match="no training people"):
        World.generate(0, n_people=4)


def test_qa_documents_for_some_people_and_qa_probes_about_the_others(world: World) -> None:
    trained = qa_people(world, 0.5)
    assert len(trained) == round(len(world.train_people) / 2) and trained == world.train_people[-len(trained):]
    docs = world_documents(world, renderings_per_person=10, qa_fraction=0.5)
    qa_docs = [d for d in docs if d.startswith("Q:")]
    assert len(qa_docs) == 2 * len(trained)  # as many as each of the 5 styles has renderings
    p = trained[0]
    for attr in ATTRIBUTES:
        assert QA_PROMPTS[attr].format(name=p.name) + " " + p.answer(attr) in "\n".join(qa_docs)
    # qa probes ask only about people whose questions are in no document; recall probes cover everyone.
    probes = world_probes(world, qa_fraction=0.5)
    corpus = "\n".join(docs)
    seen_qa = [q for q in probes if q.kind == "qa" and q.split == "seen"]
    assert len(seen_qa) == (len(world.train_people) - len(trained)) * len(ATTRIBUTES)
    assert all(q.question not in corpus for q in seen_qa)
    assert len([q for q in probes if q.kind == "recall" and q.split == "seen"]) == len(world.train_people) * 6
    assert world_documents(world, renderings_per_person=10) == [d for d in docs if not d.startswith("Q:")]
    with pytest.raises(ValueError, match="qa_fraction"):
        qa_people(world, 1.0)
