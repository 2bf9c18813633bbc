"""`facts`: questions about the pretraining world's people asked as a chat (no tools), a verifiable task family
whose knowledge the model already holds from pretraining, so RL only has to elicit it.

    tasks = fact_tasks(world, qa_fraction=0.5, split="train")     # deterministic in (world, qa_fraction, split)
    env = FactsEnv(world); obs = await env.reset(tasks[0]); result = await env.step("Trevane")

A task asks one attribute (`openk2.data.world.ATTRIBUTES`) of one person in the training documents, in the words of
the world's Q/A templates ("In which city was Xyla Morven born?"). Splits are disjoint by person, by construction:

- "train": the people whose Q/A documents are in pretraining (`qa_people`): they tie question to answer there;
- "heldout": the other training people, whose facts the biographies state but whose questions occur in no
  document (the `world-qa` probes' people). Pass@1 here measures knowledge extraction transferred to new people.

Held-out people (in no document) are never asked: their answers are unknowable.
With `train_people="biography"` (`tasks.facts_train_people`) the splits are instead the two halves of the
biography-only people: "train" = every second one of them (`others[0::2]`), "heldout" = the rest (`others[1::2]`),
so RL trains on people whose facts pretraining stated in biographies only, as the held-out people's, and never on
a Q/A-document person; held-out pass@1 is then over ~half as many tasks (132 in the speedrun's world).

Two more families ask the same people in other ways (`fact_tasks(..., family=...)`, the same splits and reward):

- "facts_paraphrase": the same attributes in words that no document, SFT record or probe uses
  (`PARAPHRASE_QUESTIONS`, "When was Xyla Morven born?"): the knowledge is the model's, the reading of the
  question is what RL has to teach, and it transfers from the train people to the held-out people.
- "facts_linked": facts linked to the person through their birth city, university or employer (birth region,
  university city, employer city, industry: `LINKED_QUESTIONS`), which the biographies state next to the person but
  no question asks.

Reward (`fact_reward`): 1.0 iff the response names the right value and no other value of that attribute (any city
for birth_city, any date for birth_date, ...), case-insensitive, whole words: a response listing several
candidates earns nothing, and the wording around the value ("She was born in Trevane.") does not matter.
With `partial_credit` (training only; pass@1 stays exact), a wrong answer of the right kind, i.e. exactly one
value of the asked attribute and none of any other attribute ("Velmora" for a city question, not a date or a
company), earns `KIND_CREDIT`: the SFT model often answers a question with a value of another attribute, and that
skill (which kind of answer a question wants) is the part that transfers from the train people to the held-out
people, while the value itself is each person's own fact.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

from openk2.data.world import ATTRIBUTES, QA_PROMPTS, Person, World, qa_people
from openk2.rl.envs.procedural import ChatQuestionTask
from openk2.rl.types import Observation, StepResult

SPLITS: tuple[str, ...] = ("train", "heldout")
#: The families this module's tasks belong to (`openk2.rl.envs.make_family`): the Q/A documents' questions,
#: the same attributes in other words, and facts linked to the person through their city, university or employer.
FAMILIES: tuple[str, ...] = ("facts", "facts_paraphrase", "facts_linked")
#: Whom the "train" split asks about: the Q/A-document people, or half of the biography-only people.
TRAIN_PEOPLE: tuple[str, ...] = ("qa", "biography")
#: The system message of every question: asks for the bare value, so answers fit a short token budget.
SYSTEM_PROMPT = "Answer the question with the name, date or word only."
#: The reward of a wrong answer of the right kind under `partial_credit` (openk2 choice; < the 1.0 of a right one).
KIND_CREDIT = 0.25
#: The `facts_paraphrase` family's questions: the same attributes asked in words that no document, SFT record or
#: probe uses (openk2's wording). The SFT model answers the Q/A documents' questions about held-out people (72.6%
#: greedy on the demo's model at 567cf6c) but these ones mostly with a value of the wrong kind (16.7%): the
#: knowledge is there, the reading of the question is not (docs/experiments.md, "RL from today's SFT model").
PARAPHRASE_QUESTIONS: dict[str, str] = {
    "birth_city": "Where was {name} born?",
    "birth_date": "When was {name} born?",
    "university": "Where did {name} go to university?",
    "field": "What was the major of {name}?",
    "employer": "Who does {name} work for?",
    "hobby": "What does {name} do in their spare time?",
}
#: Linked facts (the `facts_linked` family): facts about a person's birth city, university or employer that the
#: biographies state next to the person ("works for Vel Works, a software company headquartered in Trevane") but
#: that no Q/A document, SFT record or probe asks; the question texts are openk2's.
LINKED_QUESTIONS: dict[str, str] = {
    "birth_region": "In which region was {name} born?",
    "university_city": "In which city is the university that {name} attended?",
    "employer_city": "In which city is the company that {name} works for headquartered?",
    "industry": "In which industry does {name} work?",
}
LINKED_ATTRIBUTES: tuple[str, ...] = tuple(LINKED_QUESTIONS)
_DATE = re.compile(r"\b\d{1,2} (?:January|February|March|April|May|June|July|August|September|October|November"
                   r"|December) \d{4}\b", re.IGNORECASE)


@dataclass
class FactTask(ChatQuestionTask):
    id: str
    person: str
    attribute: str
    question: str
    answer: str
    split: str
    family: str = "facts"
    metadata: dict[str, Any] = field(default_factory=dict)

    system_prompt: ClassVar[str] = SYSTEM_PROMPT

    @property
    def task_type(self) -> str:
        return f"{self.family}/{self.attribute}"


def question_text(attribute: str, name: str, family: str = "facts") -> str:
    """The chat question: the Q/A template's question without its "Q:" / "A:" scaffolding; a linked attribute's
    (`LINKED_QUESTIONS`); the `facts_paraphrase` family's (`PARAPHRASE_QUESTIONS`)."""
    if family == "facts_paraphrase":
        return PARAPHRASE_QUESTIONS[attribute].format(name=name)
    if attribute in LINKED_QUESTIONS:
        return LINKED_QUESTIONS[attribute].format(name=name)
    return QA_PROMPTS[attribute].format(name=name).removeprefix("Q: ").split("\n", 1)[0]


def fact_answer(world: World, person: Person, attribute: str) -> str:
    """The answer as the documents write it: `Person.answer`, or a linked attribute through the world's tables."""
    linked = {"birth_region": lambda: world.city(person.birth_city).region,
              "university_city": lambda: world.university(person.university).city,
              "employer_city": lambda: world.company(person.employer).city,
              "industry": lambda: world.company(person.employer).industry}
    return linked[attribute]() if attribute in linked else person.answer(attribute)


def split_people(world: World, qa_fraction: float, train_people: str = "qa") -> dict[str, list[str]]:
    """Names per split: "train" = the Q/A-document people, "heldout" = the other training people (the
    biography-only people); with `train_people="biography"`, the two halves of the biography-only people."""
    if train_people not in TRAIN_PEOPLE:
        raise ValueError(f"facts train people must be one of {TRAIN_PEOPLE}, got {train_people!r}")
    trained = [p.name for p in qa_people(world, qa_fraction)]
    if not trained:
        raise ValueError("the facts family needs a world pretrained with Q/A documents (world_qa_fraction > 0, "
                         f"got {qa_fraction}): its training people are the Q/A-document people")
    held = [p.name for p in world.train_people if p.name not in set(trained)]
    if train_people == "biography":
        return {"train": held[0::2], "heldout": held[1::2]}
    return {"train": trained, "heldout": held}


def fact_tasks(world: World, qa_fraction: float, split: str, n: int | None = None, seed: int = 0,
               attributes: tuple[str, ...] | list[str] = ATTRIBUTES, train_people: str = "qa", family: str = "facts"
               ) -> list[FactTask]:
    """Every (person, attribute) task of `split` (people as `split_people(world, qa_fraction, train_people)`),
    worded for `family` (`question_text`), shuffled with `random.Random(f"{family}/{seed}/{split}")`, the first `n`
    (all if None). Raises ValueError for an unknown split, attribute, family or `train_people`."""
    if family not in FAMILIES:
        raise ValueError(f"facts family must be one of {FAMILIES}, got {family!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    known = LINKED_ATTRIBUTES if family == "facts_linked" else ATTRIBUTES
    bad = [a for a in attributes if a not in known]
    if bad or not attributes:
        raise ValueError(f"unknown {family} attributes {bad}; attributes: {', '.join(known)}")
    people = {p.name: p for p in world.people}
    tasks = [FactTask(f"{family}-{split}-{hashlib.sha256(f'{name}/{a}'.encode()).hexdigest()[:10]}", name, a,
                      question_text(a, name, family), fact_answer(world, people[name], a), split, family)
             for name in split_people(world, qa_fraction, train_people)[split] for a in attributes]
    random.Random(f"{family}/{seed}/{split}").shuffle(tasks)
    return tasks[:n]


@lru_cache(maxsize=64)
def _value_patterns(values: frozenset[str]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(r"(?<!\w)" + re.escape(v) + r"(?!\w)", re.IGNORECASE)
                 for v in sorted(values, key=len, reverse=True))


def _attribute_values(world: World, attribute: str) -> list[str]:
    cities = [c.name for c in world.cities]
    tables = {"birth_city": cities, "university": [u.name for u in world.universities],
              "employer": [c.name for c in world.companies], "field": world.fields, "hobby": world.hobbies,
              "birth_region": world.regions, "university_city": cities, "employer_city": cities,
              "industry": sorted({c.industry for c in world.companies})}
    return tables[attribute]


def mentioned_values(world: World, attribute: str, text: str) -> set[str]:
    """The values of `attribute` that `text` names (casefolded): dates by pattern, others from the world's
    tables (longest first, so "Vel Works Labs" is not also read as "Vel Works")."""
    if attribute == "birth_date":
        return {" ".join(m.group(0).split()).casefold() for m in _DATE.finditer(text)}
    found, rest = set(), text
    for pattern in _value_patterns(frozenset(_attribute_values(world, attribute))):
        if pattern.search(rest):
            found.add(pattern.pattern)
            rest = pattern.sub(" ", rest)
    return found


def fact_reward(world: World, task: FactTask, text: str, partial_credit: bool = False) -> float:
    """1.0 iff `text` names `task.answer` and no other value of the attribute; with `partial_credit`, `KIND_CREDIT`
    for exactly one other value of the attribute and no value of any other attribute; else 0.0."""
    named = mentioned_values(world, task.attribute, text)
    want = mentioned_values(world, task.attribute, task.answer)
    if named and named == want:
        return 1.0
    if partial_credit and len(named) == 1 and not any(mentioned_values(world, a, _without(world, task.attribute, text))
                                                      for a in ATTRIBUTES if a != task.attribute):
        return KIND_CREDIT
    return 0.0


def _without(world: World, attribute: str, text: str) -> str:
    """`text` with the values of `attribute` blanked out ("University of Veipim" names the city Veipim inside a
    university's name, which is no second kind of answer)."""
    if attribute == "birth_date":
        return _DATE.sub(" ", text)
    for pattern in _value_patterns(frozenset(_attribute_values(world, attribute))):
        text = pattern.sub(" ", text)
    return text


def sft_records(world: World, qa_fraction: float, n: int | None = None, seed: int = 0,
                attributes: tuple[str, ...] | list[str] = ATTRIBUTES, per_person: bool = False
                ) -> list[dict[str, Any]]:
    """Chat SFT records (question -> bare answer) of the first `n` train tasks (all if None): a warm start that
    teaches the answer format on the train people only; held-out people are never in them, by construction.
    The answer starts with a space: the BPE glues a word to the space before it, and pretraining stored the value
    as the word after a space ("A: Treikraev" -> " Treikraev"), not as the start of a text ("T", "reikraev").
    `per_person`: one multi-turn record per person holding all of that person's questions (in the tasks' shuffled
    order) instead of one record per question: the same name asked for different attributes side by side, and
    half the tokens per trained answer (one system prompt per person)."""
    tasks = fact_tasks(world, qa_fraction, "train", n, seed=seed + 10_000, attributes=attributes)
    if not per_person:
        return [{"messages": [*t.messages(), {"role": "assistant", "content": " " + t.answer}],
                 "metadata": {"source": "facts", "attribute": t.attribute}} for t in tasks]
    by_person: dict[str, list[FactTask]] = {}
    for t in tasks:
        by_person.setdefault(t.person, []).append(t)
    return [{"messages": [ts[0].messages()[0], *(m for t in ts for m in (
                {"role": "user", "content": t.question}, {"role": "assistant", "content": " " + t.answer}))],
             "metadata": {"source": "facts", "attributes": [t.attribute for t in ts]}} for ts in by_person.values()]


class FactsEnv:
    """Single-turn: `reset` asks the question, the first `step` is the answer and ends the episode. `partial_credit`:
    `KIND_CREDIT` for a wrong answer of the right kind (`fact_reward`); `info["correct"]` is exact either way."""

    def __init__(self, world: World, partial_credit: bool = False) -> None:
        self.world = world
        self.partial_credit = partial_credit
        self.task: FactTask | None = None
        self.task_type = "facts"

    async def reset(self, task: FactTask, seed: int | None = None) -> Observation:
        self.task = task
        self.task_type = task.task_type
        return Observation(messages=task.messages(), info={"task_id": task.id})

    async def step(self, action_text: str) -> StepResult:
        if self.task is None:
            raise RuntimeError("call reset(task) before step()")
        reward = fact_reward(self.world, self.task, action_text, self.partial_credit)
        return StepResult(None, reward, terminated=True, truncated=False,
                          info={"correct": reward == 1.0, "expected": self.task.answer})

    async def close(self) -> None:
        self.task = None


__all__ = ["FAMILIES", "KIND_CREDIT", "LINKED_ATTRIBUTES", "LINKED_QUESTIONS", "PARAPHRASE_QUESTIONS", "TRAIN_PEOPLE",
           "FactTask", "FactsEnv", "fact_answer", "fact_reward", "fact_tasks", "mentioned_values", "question_text",
           "sft_records", "split_people"]
