"""The embedded default corpus: a seeded, procedurally generated fictional world.

Why a fictional world: a ~20M-parameter model trained for ~10 minutes on 2 CPU cores learns little from
web text that a probe could measure, but it can memorise facts about a hundred people if each fact is
stated often enough in varied words (the "bioS" setting of Allen-Zhu & Li, *Physics of Language Models
3.1*; the same effect K2's knowledge rephrasing exploits, `k2-recipe.md` §4). Every name is built from
made-up syllables, so no real-world knowledge helps and a probe is answerable only from the corpus.

Size: `World.generate` defaults to 400 people; the speedrun (`recipes/nano.toml`) uses 100 people (90 in
documents) x 20 renderings plus Q/A documents for half of them: 2,060 documents, 0.64M characters, ~136k
tokens with a 1.5k-vocab byte-level BPE, generated in ~0.1 s. Few people, many renderings: memorising a fact
takes a few hundred exposures at this model size (`docs/experiments.md`). A small world supports few BPE
merges at min_frequency 2 (~1.8k for 100 people), so world-only tokenizers stay small.

The world
    `World.generate(seed, n_people)` draws regions, cities, universities (each in a city), companies
    (each headquartered in a city, with an industry) and people. A `Person` has a full name, pronoun,
    birth date, birth city, university, field of study, employer and hobby, each drawn independently and
    uniformly, so the best guess without knowing the person is the majority value (`chance_accuracy`).

Splits (who and what the model sees)
    * People: the last `n_heldout` people of `World.people` are *held out*: they appear in no document.
      Probes about them (split "unseen") measure guessing, i.e. the chance baseline. The first
      `N_DEMO_PEOPLE` held-out people are used only as few-shot demonstrations in QA prompts.
    * Styles: `TRAIN_STYLES` (encyclopedic, conversational, newspaper, fact sheet, first person) render the
      training documents; `HELDOUT_STYLES` (reference letter, trivia) render validation documents about the
      *seen* people only, so validation loss on them measures whether facts transfer to new phrasing.
    * Probe phrasing: "recall" probes are the opening of a sentence that literally occurs in the training
      documents (every encyclopedic rendering states every fact in the canonical form `RECALL_PROMPTS`);
      "qa" probes use the `QA_PROMPTS` question templates, preceded by `N_DEMO_PEOPLE` solved examples about
      held-out demo people so that a base model sees the answer format.
    * Q/A documents (`qa_fraction`, default 0): Allen-Zhu & Li find that a model trained on biographies alone
      stores facts but cannot *extract* them through a question phrasing it never saw, and that mixing Q/A
      pairs about some people into pretraining teaches extraction that transfers to the others. With
      `qa_fraction=f`, the last fraction f of the training people (`qa_people`) also get Q/A documents; "qa"
      probes are asked only about the other training people, whose questions occur in no document, so they
      measure transfer, not memorised answers. With f = 0 no document contains "Q:".

Typical use::

    world = World.generate(seed=0)
    train_docs = world_documents(world)                        # ~2.3M characters, 0.2 s
    val_docs = world_documents(world, split="validation")      # held-out styles
    probes = world_probes(world)
    acc = probe_accuracy(lambda prompt: my_greedy_generate(prompt, max_new_tokens=12), probes)

Later issues extend the world (rephrasing, tool use, verifiable tasks); keep new facts as `Person` fields
or new entity tables, new styles as `_Style` entries, and new probe kinds as extra `Probe.kind` values.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "openk2.world/1"

#: Attributes a probe can ask about (values of `Probe.attribute`), in a fixed order.
ATTRIBUTES: tuple[str, ...] = ("birth_city", "birth_date", "university", "field", "employer", "hobby")

#: Number of held-out people used as solved examples in QA prompts (never probed themselves).
N_DEMO_PEOPLE = 3

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip

# Real words on purpose: knowing what "botany" is gives no hint about who studied it.
FIELDS: tuple[str, ...] = (
    "mathematics", "marine biology", "linguistics", "chemistry", "architecture", "economics",
    "philosophy", "mechanical engineering", "history", "computer science", "geology", "music theory",
    "medicine", "botany", "psychology", "civil engineering",
)  # fmt: skip
HOBBIES: tuple[str, ...] = (
    "chess", "beekeeping", "rock climbing", "pottery", "sailing", "birdwatching", "fencing",
    "calligraphy", "gardening", "origami", "kayaking", "baking", "watercolour painting", "archery",
    "juggling", "knitting",
)  # fmt: skip
_INDUSTRIES = (
    "shipbuilding", "software", "pharmaceutical", "textile", "aerospace", "publishing", "agricultural",
    "energy", "banking", "logistics",
)  # fmt: skip
_COMPANY_SUFFIXES = ("Dynamics", "Labs", "Works", "Systems", "Foundry", "Analytics", "Robotics", "Holdings")
_CITY_SUFFIXES = ("", "", "", "mere", "holm", "vale", "wick", "stead")

_ONSETS = (
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
    "th", "br", "dr", "kr", "tr", "st", "vr", "sh", "ch", "gl", "q",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "y", "ae", "ei", "ou", "ia")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "x", "v", "nd", "rn", "sk")


# ---------------------------------------------------------------------------------------------------------
# Entities


@dataclass(frozen=True)
class City:
    name: str
    region: str


@dataclass(frozen=True)
class University:
    name: str
    city: str


@dataclass(frozen=True)
class Company:
    name: str
    city: str
    industry: str


@dataclass(frozen=True)
class Person:
    """One fictional person; every field is drawn independently and uniformly."""

    name: str  # "First Last", unique in the world
    pronoun: str  # "she" or "he"
    birth_date: dt.date
    birth_city: str
    university: str
    field: str
    employer: str
    hobby: str

    @property
    def first_name(self) -> str:
        return self.name.split(" ")[0]

    @property
    def last_name(self) -> str:
        return self.name.split(" ", 1)[1]

    def answer(self, attribute: str) -> str:
        """The probe answer for `attribute` (one of `ATTRIBUTES`), exactly as the documents write it."""
        if attribute == "birth_date":
            return format_date(self.birth_date)
        if attribute not in ATTRIBUTES:
            raise KeyError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")
        return getattr(self, attribute)


def format_date(d: dt.date) -> str:
    return f"{d.day} {_MONTHS[d.month - 1]} {d.year}"


@dataclass
class World:
    """A generated world. `people[-n_heldout:]` never appear in documents (see the module docstring)."""

    seed: int
    regions: list[str]
    cities: list[City]
    universities: list[University]
    companies: list[Company]
    fields: list[str]
    hobbies: list[str]
    people: list[Person]
    n_heldout: int

    # -- generation ---------------------------------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        seed: int = 0,
        n_people: int = 400,
        *,
        heldout_fraction: float = 0.1,
        n_regions: int = 8,
        n_cities: int = 40,
        n_universities: int = 24,
        n_companies: int = 40,
    ) -> World:
        """Draw a world deterministically from `seed` (same seed and knobs → identical world)."""
        n_heldout = max(N_DEMO_PEOPLE + 1, round(n_people * heldout_fraction))
        if n_people <= n_heldout:
            raise ValueError(f"n_people={n_people} leaves no training people ({n_heldout} are held out)")
        rng = random.Random(seed)
        used: set[str] = set()
        regions = [_unique(rng, used, lambda: _word(rng, 2, 3)) for _ in range(n_regions)]
        cities = [
            City(_unique(rng, used, lambda: _word(rng, 2, 2) + rng.choice(_CITY_SUFFIXES)), rng.choice(regions))
            for _ in range(n_cities)
        ]
        universities = []
        uni_patterns = ("University of {c}", "{c} Polytechnic", "{s} Institute of Technology", "{s} College")
        for _ in range(n_universities):
            city = rng.choice(cities)
            name = _unique(
                rng, used, lambda c=city: rng.choice(uni_patterns).format(c=c.name, s=_word(rng, 2, 3))
            )
            universities.append(University(name, city.name))
        companies = [
            Company(
                _unique(rng, used, lambda: f"{_word(rng, 2, 2)} {rng.choice(_COMPANY_SUFFIXES)}"),
                rng.choice(cities).name,
                rng.choice(_INDUSTRIES),
            )
            for _ in range(n_companies)
        ]
        first_names = [_unique(rng, used, lambda: _word(rng, 2, 2)) for _ in range(max(50, n_people // 3))]
        last_names = [_unique(rng, used, lambda: _word(rng, 2, 3)) for _ in range(max(50, n_people // 3))]
        people = []
        full_names: set[str] = set()
        for _ in range(n_people):
            name = _unique(rng, full_names, lambda: f"{rng.choice(first_names)} {rng.choice(last_names)}")
            people.append(
                Person(
                    name=name,
                    pronoun=rng.choice(("she", "he")),
                    birth_date=dt.date(rng.randint(1940, 2004), rng.randint(1, 12), rng.randint(1, 28)),
                    birth_city=rng.choice(cities).name,
                    university=rng.choice(universities).name,
                    field=rng.choice(FIELDS),
                    employer=rng.choice(companies).name,
                    hobby=rng.choice(HOBBIES),
                )
            )
        world = cls(seed, regions, cities, universities, companies, list(FIELDS), list(HOBBIES), people, n_heldout)
        world.validate()
        return world

    def validate(self) -> None:
        """Check invariants the probes rely on (raises ValueError)."""
        names = [p.name for p in self.people]
        if len(set(names)) != len(names):
            raise ValueError("person names are not unique")
        if not N_DEMO_PEOPLE < self.n_heldout < len(self.people):
            raise ValueError(f"n_heldout={self.n_heldout} must be in ({N_DEMO_PEOPLE}, {len(self.people)})")
        # A value that is a word-prefix of another ("Vel Works" / "Vel Works Labs") would make a wrong
        # completion score as correct, see `answer_matches`.
        for pool in ([c.name for c in self.cities], [u.name for u in self.universities],
                     [c.name for c in self.companies], self.fields, self.hobbies):  # fmt: skip
            for a in pool:
                for b in pool:
                    if a != b and answer_matches(b, a):
                        raise ValueError(f"{a!r} is a prefix of {b!r}; probe scoring would be ambiguous")

    # -- splits -------------------------------------------------------------------------------------------

    @property
    def train_people(self) -> list[Person]:
        """People whose biographies are in the documents."""
        return self.people[: len(self.people) - self.n_heldout]

    @property
    def heldout_people(self) -> list[Person]:
        """People in no document: probes about them measure the chance baseline."""
        return self.people[len(self.people) - self.n_heldout :]

    @property
    def demo_people(self) -> list[Person]:
        """Held-out people used only as solved examples in QA prompts."""
        return self.heldout_people[:N_DEMO_PEOPLE]

    def city(self, name: str) -> City:
        return self._by_name[name]

    def university(self, name: str) -> University:
        return self._by_name[name]

    def company(self, name: str) -> Company:
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict[str, Any]:
        # Entity names are globally unique (one `used` set at generation), so one index serves all tables.
        return {e.name: e for e in (*self.cities, *self.universities, *self.companies)}

    # -- persistence --------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for p in d["people"]:
            p["birth_date"] = p["birth_date"].isoformat()
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> World:
        if d.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} world (format={d.get('format')!r})")
        people = [Person(**{**p, "birth_date": dt.date.fromisoformat(p["birth_date"])}) for p in d["people"]]
        world = cls(
            seed=d["seed"],
            regions=list(d["regions"]),
            cities=[City(**c) for c in d["cities"]],
            universities=[University(**u) for u in d["universities"]],
            companies=[Company(**c) for c in d["companies"]],
            fields=list(d["fields"]),
            hobbies=list(d["hobbies"]),
            people=people,
            n_heldout=d["n_heldout"],
        )
        world.validate()
        return world

    def save(self, path: str | Path) -> None:
        """Write the world as JSON (atomically) so a run can reload exactly the same world."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> World:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _word(rng: random.Random, min_syllables: int, max_syllables: int) -> str:
    n = rng.randint(min_syllables, max_syllables)
    s = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
    return s.capitalize()


def _unique(rng: random.Random, used: set[str], make: Callable[[], str]) -> str:
    # The name space is large (~10^5 two-syllable words), so a handful of retries always suffices.
    for _ in range(1000):
        s = make()
        if s not in used:
            used.add(s)
            return s
    raise RuntimeError("name space exhausted; reduce the number of entities")


# ---------------------------------------------------------------------------------------------------------
# Documents


@dataclass(frozen=True)
class _Style:
    """A biography style: an opener, one sentence per attribute (variants picked at random, order shuffled),
    optional combined sentences stating two attributes at once, and a closer."""

    openers: tuple[str, ...]
    facts: dict[str, tuple[str, ...]]
    combos: tuple[tuple[tuple[str, str], tuple[str, ...]], ...] = ()
    closers: tuple[str, ...] = ("",)
    sep: str = " "
    shuffle: bool = True


#: The canonical sentence openings; every encyclopedic rendering states every fact in exactly this form,
#: so each "recall" probe is a prefix of a sentence the model was trained on.
RECALL_PROMPTS: dict[str, str] = {
    "birth_city": "{name} was born in",
    "birth_date": "{name} was born on",
    "university": "{name} studied at",
    "field": "{name} majored in",
    "employer": "{name} works for",
    "hobby": "{name} enjoys",
}

#: Question templates for "qa" probes; "Q:" occurs in no document, so this phrasing is never trained on.
QA_PROMPTS: dict[str, str] = {
    "birth_city": "Q: In which city was {name} born?\nA:",
    "birth_date": "Q: What is the date of birth of {name}?\nA:",
    "university": "Q: Which university did {name} attend?\nA:",
    "field": "Q: What did {name} study?\nA:",
    "employer": "Q: Which company employs {name}?\nA:",
    "hobby": "Q: What is the hobby of {name}?\nA:",
}

_STYLES: dict[str, _Style] = {
    "encyclopedic": _Style(
        openers=("{name} is a {field} graduate from the {region} region.", "{name} is a person from {region}."),
        facts={
            "birth_city": ("{name} was born in {city}, a city in the {region} region.",),
            "birth_date": ("{name} was born on {date}.",),
            "university": ("{name} studied at {univ}, which is located in {univ_city}.",),
            "field": ("{name} majored in {field}.",),
            "employer": ("{name} works for {employer}, a {industry} company headquartered in {employer_city}.",),
            "hobby": ("{name} enjoys {hobby}.",),
        },
    ),
    "conversational": _Style(
        openers=("Have you ever met {name}?", "Let me tell you about my friend {name}.", "You might know {name}."),
        facts={
            "birth_city": (
                "{first} grew up in {city}, over in {region}.",
                "{Pron} is originally from {city}.",
                "{Pron} comes from {city}, a town in {region}.",
            ),
            "birth_date": (
                "{Pos} birthday is {month} {day}, and {pron} was born back in {year}.",
                "{Pron} came into the world on {date}.",
                "{first} turned up on {date}, or so {pron} tells everyone.",
            ),
            "university": (
                "{first} went to {univ} for university.",
                "{Pron} did {pos} degree at {univ}.",
                "{Pron} spent {pos} student years at {univ} in {univ_city}.",
            ),
            "field": (
                "{Pos} degree was in {field}.",
                "{first} has always loved {field}, so that's what {pron} studied.",
            ),
            "employer": (
                "These days {pron} works at {employer}.",
                "{first} has a job at {employer}, the {industry} company.",
                "{Pron} is employed by {employer} over in {employer_city}.",
            ),
            "hobby": (
                "In {pos} spare time {pron} loves {hobby}.",
                "Ask {obj} about {hobby} and {pron} will talk for hours.",
                "{first} is really into {hobby}.",
            ),
        },
        closers=("", "Nice person, honestly.", "That's {first} for you.", "You should meet {obj} sometime."),
    ),
    "newspaper": _Style(
        openers=(
            "{EMPLOYER_CITY} — {name} of {employer} spoke to reporters on Tuesday.",
            "{EMPLOYER_CITY} — Local {industry} worker {name} made headlines this week.",
        ),
        facts={
            "birth_city": ("{last} is a native of {city}.", "{last}, who hails from {city}, grew up in {region}."),
            "birth_date": ("{last} was born on {date}.", "Records show {last} was born on {date}."),
            "university": ("{last} is a graduate of {univ}.", "{last} attended {univ} in {univ_city}."),
            "field": ("{last} holds a degree in {field}.", "{Pron} trained in {field}."),
            "employer": (
                "{last} is employed at {employer}, a {industry} firm based in {employer_city}.",
                "{Pron} currently works at {employer}.",
            ),
            "hobby": ("{last} lists {hobby} among {pos} passions.", "Friends say {last} spends weekends on {hobby}."),
        },
        combos=(
            (("birth_city", "birth_date"), ("Born in {city} on {date}, {last} has lived in {region} ever since.",)),
            (("university", "field"), ("{last} studied {field} at {univ}.", "A {field} graduate of {univ}, {last} "
                                       "is well known locally.")),
        ),  # fmt: skip
    ),
    "fact_sheet": _Style(
        openers=("Profile: {name}", "Name: {name}", "PERSON RECORD — {name}"),
        facts={
            "birth_city": ("Birthplace: {city} ({region})", "Place of birth: {city}", "Hometown: {city}"),
            "birth_date": ("Born: {date}", "Date of birth: {date}"),
            "university": ("Education: {univ}", "Alma mater: {univ}"),
            "field": ("Field: {field}", "Degree subject: {field}", "Major: {field}"),
            "employer": ("Employer: {employer} ({industry}, {employer_city})", "Works at: {employer}"),
            "hobby": ("Hobby: {hobby}", "Interests: {hobby}", "Pastime: {hobby}"),
        },
        sep="\n",
    ),
    "first_person": _Style(
        openers=("Hi, I'm {name}.", "My name is {name}.", "Hello! {name} here."),
        facts={
            "birth_city": ("I was born and raised in {city}.", "My hometown is {city}, in {region}."),
            "birth_date": ("My birthday is {date}.", "I came into this world on {date}."),
            "university": ("I went to {univ}.", "I graduated from {univ}."),
            "field": ("I studied {field}.", "My degree is in {field}."),
            "employer": ("Right now I work for {employer}.", "I have a job at {employer} in {employer_city}."),
            "hobby": ("My favourite pastime is {hobby}.", "When I'm not working, you'll find me doing {hobby}."),
        },
        closers=("", "Nice to meet you!", "Thanks for reading."),
    ),
    # Held-out styles: validation documents only.
    "reference_letter": _Style(
        openers=("To whom it may concern,\n\nI am writing to recommend {name}.",),
        facts={
            "birth_city": ("{first} was born in {city} and still visits {region} often.",),
            "birth_date": ("{Pron} was born on {date}.",),
            "university": ("{Pron} earned {pos} degree at {univ}.",),
            "field": ("{Pos} training is in {field}.",),
            "employer": ("At present {pron} is employed by {employer}.",),
            "hobby": ("Outside of work, {first} is devoted to {hobby}.",),
        },
        closers=("\n\nSincerely,\nThe Admissions Office",),
    ),
    "trivia": _Style(
        openers=("Fun facts about {name}:",),
        facts={
            "birth_city": ("- {first}'s birthplace is {city}.",),
            "birth_date": ("- {first} celebrates a birthday every {month} {day}, having been born in {year}.",),
            "university": ("- {first} is a graduate of {univ}.",),
            "field": ("- {first}'s studies focused on {field}.",),
            "employer": ("- {first}'s employer is {employer}.",),
            "hobby": ("- {first}'s favourite hobby is {hobby}.",),
        },
        sep="\n",
    ),
}

#: Styles of training documents; rendering r of a person uses TRAIN_STYLES[r % len(TRAIN_STYLES)].
TRAIN_STYLES: tuple[str, ...] = ("encyclopedic", "conversational", "newspaper", "fact_sheet", "first_person")
#: Styles that appear only in validation documents.
HELDOUT_STYLES: tuple[str, ...] = ("reference_letter", "trivia")


def _facts(world: World, p: Person) -> dict[str, str]:
    univ = world.university(p.university)
    company = world.company(p.employer)
    pron, obj, pos = ("she", "her", "her") if p.pronoun == "she" else ("he", "him", "his")
    return {
        "name": p.name, "first": p.first_name, "last": p.last_name,
        "pron": pron, "Pron": pron.capitalize(), "obj": obj, "pos": pos, "Pos": pos.capitalize(),
        "city": p.birth_city, "region": world.city(p.birth_city).region,
        "date": format_date(p.birth_date), "year": str(p.birth_date.year), "day": str(p.birth_date.day),
        "month": _MONTHS[p.birth_date.month - 1],
        "univ": p.university, "univ_city": univ.city, "field": p.field,
        "employer": p.employer, "industry": company.industry, "employer_city": company.city,
        "EMPLOYER_CITY": company.city.upper(), "hobby": p.hobby,
    }  # fmt: skip


def render_biography(world: World, person: Person, style: str, rng: random.Random) -> str:
    """One biography of `person` in `style` (a key of the style table), with random phrasing and order."""
    st = _STYLES[style]
    facts = _facts(world, person)
    groups: list[tuple[str, ...]] = [(a,) for a in ATTRIBUTES]
    for attrs, _ in st.combos:
        if rng.random() < 0.5:
            groups = [g for g in groups if g[0] not in attrs] + [attrs]
    if st.shuffle:
        rng.shuffle(groups)
    combos = dict(st.combos)
    sentences = [rng.choice(st.openers)]
    for g in groups:
        sentences.append(rng.choice(combos[g] if len(g) > 1 else st.facts[g[0]]))
    closer = rng.choice(st.closers)
    if closer.startswith("\n"):  # a closer with its own layout (letter signature) attaches as is
        sentences[-1] += closer
    elif closer:
        sentences.append(closer)
    text = st.sep.join(sentences)
    return text.format(**facts)


def _gazetteer(world: World) -> list[str]:
    # Facts about places and organisations, so later multi-hop probes ("in which region was the employer of X
    # founded?") have something to chain through.
    docs = []
    for c in world.cities:
        unis = [u.name for u in world.universities if u.city == c.name]
        hq = [co.name for co in world.companies if co.city == c.name]
        s = f"{c.name} is a city in the {c.region} region."
        if unis:
            s += f" It is home to {', '.join(unis)}."
        if hq:
            s += f" Companies headquartered in {c.name} include {', '.join(hq)}."
        docs.append(s)
    for co in world.companies:
        docs.append(f"{co.name} is a {co.industry} company. Its headquarters are in {co.city}.")
    return docs


def qa_people(world: World, qa_fraction: float) -> list[Person]:
    """The training people whose Q/A pairs appear in the training documents: the last `qa_fraction` of them."""
    if not 0.0 <= qa_fraction < 1.0:
        raise ValueError(f"qa_fraction must be in [0, 1) so that some people are left for the qa probes, "
                         f"got {qa_fraction}")
    k = round(len(world.train_people) * qa_fraction)
    return world.train_people[len(world.train_people) - k :]


def render_qa(world: World, person: Person, rng: random.Random) -> str:
    """A Q/A document: every `QA_PROMPTS` question about `person` with its answer, in random order."""
    pairs = [QA_PROMPTS[a].format(name=person.name) + " " + person.answer(a) for a in ATTRIBUTES]
    rng.shuffle(pairs)
    return "\n\n".join(pairs)


def world_documents(
    world: World,
    split: str = "train",
    *,
    renderings_per_person: int = 20,
    include_gazetteer: bool = True,
    qa_fraction: float = 0.0,
) -> list[str]:
    """Biographies of `world.train_people` as plain-text documents (held-out people never appear).

    split="train": `renderings_per_person` renderings per person cycling through `TRAIN_STYLES` (rendering 0
    is always encyclopedic, so every recall probe's sentence is present), plus gazetteer documents about
    cities and companies, plus for each of `qa_people(world, qa_fraction)` as many Q/A documents as each
    style has renderings. split="validation": one rendering per person in each of `HELDOUT_STYLES`.
    Output is deterministic in (world, split, knobs); document i of a person does not depend on the others.
    """
    if split == "train":
        if renderings_per_person < 1:
            raise ValueError("renderings_per_person must be >= 1")
        styles = [TRAIN_STYLES[r % len(TRAIN_STYLES)] for r in range(renderings_per_person)]
    elif split == "validation":
        styles = list(HELDOUT_STYLES)
    else:
        raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
    docs = []
    for i, person in enumerate(world.train_people):
        for r, style in enumerate(styles):
            # String seeds hash with SHA-512 in `random.seed`, so this is stable across processes and runs.
            rng = random.Random(f"{world.seed}/{split}/{i}/{r}")
            docs.append(render_biography(world, person, style, rng))
    if split == "train":
        n_qa = max(1, renderings_per_person // len(TRAIN_STYLES))
        for i, person in enumerate(qa_people(world, qa_fraction)):
            docs.extend(render_qa(world, person, random.Random(f"{world.seed}/qa/{i}/{r}")) for r in range(n_qa))
    if split == "train" and include_gazetteer:
        docs.extend(_gazetteer(world))
    return docs


# ---------------------------------------------------------------------------------------------------------
# Probes


@dataclass(frozen=True)
class Probe:
    """A completion prompt with a known answer.

    `question` is the bare probe ("Q: In which city was Xyla Morven born?\\nA:" or "Xyla Morven was born
    in"); `prompt` is what to feed the model (for "qa", solved demo examples followed by `question`).
    `answer` starts with a space, as the model should generate it. `kind` is "recall" (phrasing seen in
    training) or "qa" (held-out phrasing); `split` is "seen" (person in the documents) or "unseen" (held-out
    person: chance baseline).
    """

    question: str
    answer: str
    person: str
    attribute: str
    kind: str = "qa"
    split: str = "seen"
    prompt: str = ""

    def __post_init__(self) -> None:
        if not self.prompt:
            object.__setattr__(self, "prompt", self.question)


def world_probes(
    world: World,
    *,
    kinds: Sequence[str] = ("recall", "qa"),
    attributes: Sequence[str] = ATTRIBUTES,
    max_people: int | None = None,
    qa_fraction: float = 0.0,
) -> list[Probe]:
    """Probes for every (person, attribute, kind): seen people first, then unseen (non-demo) people.

    `max_people` caps the number of people per split (taking the first ones) to bound evaluation cost.
    Pass the `qa_fraction` the documents were made with: "qa" probes skip `qa_people`, whose questions
    were trained on.
    """
    for k in kinds:
        if k not in ("recall", "qa"):
            raise ValueError(f"unknown probe kind {k!r}")
    splits = [("seen", world.train_people), ("unseen", world.heldout_people[N_DEMO_PEOPLE:])]
    qa_trained = {p.name for p in qa_people(world, qa_fraction)}
    probes = []
    for split, people in splits:
        for p in people[:max_people]:
            for attr in attributes:
                answer = " " + p.answer(attr)
                for kind in kinds:
                    if kind == "qa" and p.name in qa_trained:
                        continue
                    if kind == "recall":
                        q = RECALL_PROMPTS[attr].format(name=p.name)
                        probes.append(Probe(q, answer, p.name, attr, kind, split, prompt=q))
                    else:
                        q = QA_PROMPTS[attr].format(name=p.name)
                        probes.append(Probe(q, answer, p.name, attr, kind, split, prompt=_qa_demos(world, attr) + q))
    return probes


def _qa_demos(world: World, attribute: str) -> str:
    return "".join(
        QA_PROMPTS[attribute].format(name=d.name) + " " + d.answer(attribute) + "\n\n" for d in world.demo_people
    )


def answer_matches(completion: str, answer: str) -> bool:
    """True if the first line of `completion` is `answer`, possibly followed by punctuation or more words
    ("Trevane, a city in ..." matches "Trevane"; "Trevanex" does not). Case-insensitive."""
    line = completion.strip().split("\n", 1)[0].strip().casefold()
    ans = answer.strip().casefold()
    return line.startswith(ans) and (len(line) == len(ans) or not line[len(ans)].isalnum())


def probe_accuracy(generate_fn: Callable[[str], str], probes: Sequence[Probe]) -> float:
    """Fraction of probes whose completion `generate_fn(probe.prompt)` matches the answer.

    `generate_fn` maps a prompt to the model's (greedy) continuation, without the prompt; ~12 new tokens
    suffice for every answer.
    """
    if not probes:
        raise ValueError("no probes")
    return sum(answer_matches(generate_fn(p.prompt), p.answer) for p in probes) / len(probes)


def probe_breakdown(generate_fn: Callable[[str], str], probes: Sequence[Probe]) -> dict[str, float]:
    """Accuracy per "kind/split" and "kind/split/attribute" (e.g. "qa/seen", "recall/unseen/hobby"),
    generating each completion once. Compare "*/seen" against "*/unseen" (the chance baseline)."""
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for p in probes:
        ok = answer_matches(generate_fn(p.prompt), p.answer)
        for key in (f"{p.kind}/{p.split}", f"{p.kind}/{p.split}/{p.attribute}"):
            hits[key] += ok
            totals[key] += 1
    return {k: hits[k] / totals[k] for k in sorted(totals)}


def chance_accuracy(world: World, attribute: str) -> float:
    """Accuracy of always answering the most common value among training people (the no-knowledge baseline)."""
    counts = Counter(p.answer(attribute) for p in world.train_people)
    return counts.most_common(1)[0][1] / len(world.train_people)
