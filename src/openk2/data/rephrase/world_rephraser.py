"""The CPU path without a capable LLM: a programmatic rephraser over the world's structured facts.

`WorldRephraser(world)` goes through the same `Rephraser` interface as an LLM: for a chunk of a world document
it finds the person the document is about, finds which of that person's facts the chunk states, and renders
exactly those facts in another of the world's biography styles (`openk2.data.world`), with phrasing and order
drawn from the request seed. A library style maps to a world style by name (`world-conversational`, ...) or
by a stable hash of its name; prefix and Q/A styles get their required format, so the same post-processing and
fidelity checks run. Faithful by construction: it restates only facts it finds in the chunk. Chunks about no
known person (e.g. gazetteer text) come back unchanged.
"""

from __future__ import annotations

import hashlib
import random
import re

from openk2.data.rephrase.chunking import Chunk
from openk2.data.rephrase.pipeline import InputDoc, Rephraser, Reply
from openk2.data.rephrase.prompts import Style, approx_tokens
from openk2.data.world import _STYLES, ATTRIBUTES, TRAIN_STYLES, Person, World, _facts, format_date
from openk2.llm import Usage, UsageTracker

#: World styles a rephrasing may use (the raw corpus of the Table-1 experiment is encyclopedic).
REPHRASE_STYLES: tuple[str, ...] = tuple(s for s in TRAIN_STYLES if s != "encyclopedic")
_QA_QUESTIONS = {
    "birth_city": "Where was {name} born?", "birth_date": "When was {name} born?",
    "university": "Where did {name} go to university?", "field": "What subject did {name} study?",
    "employer": "Where does {name} work?", "hobby": "What does {name} do for fun?",
}


def world_style_for(style: Style, k_seed: int) -> str:
    """The world style a library style renders as: `world-<style>` names it, otherwise a stable hash of the
    style name and the seed picks one of `REPHRASE_STYLES`."""
    name = style.name.removeprefix("world-")
    if name in _STYLES:
        return name
    h = int(hashlib.sha256(f"{style.name}/{k_seed}".encode()).hexdigest()[:8], 16)
    return REPHRASE_STYLES[h % len(REPHRASE_STYLES)]


_NEUTRAL = frozenset({"name", "first", "last", "pron", "Pron", "obj", "pos", "Pos"})
# Facts about the entities a person fact names (region of the birth city, ...), restated when the source chunk
# states them and the style's sentence did not.
_DERIVED = {
    "birth_city": (("region", "{city} lies in the {region} region."),),
    "university": (("univ_city", "{univ} is in {univ_city}."),),
    "employer": (("employer_city", "{employer} is based in {employer_city}."),
                 ("industry", "{employer} is a {industry} company.")),
}


def render_facts(world: World, person: Person, style: str, attributes: list[str], rng: random.Random,
                 source: str = "") -> str:
    """A biography of `person` in `style` stating only `attributes` (in random order and phrasing), plus the
    facts about named entities that `source` states (region, university city, employer city and industry)."""
    st = _STYLES[style]
    facts = _facts(world, person)
    attrs = list(attributes)
    rng.shuffle(attrs)
    low = source.lower()

    def allowed(options: tuple[str, ...], fallback: str) -> str:
        # Only sentences whose every fact-bearing field is stated in the source: faithful, nothing added.
        ok = [t for t in options if all(facts[f].lower() in low for f in re.findall(r"\{(\w+)\}", t)
                                        if f not in _NEUTRAL)] if source else list(options)
        return rng.choice(ok) if ok else fallback

    sentences = [allowed(st.openers, "About {name}:")]
    sentences += [allowed(st.facts[a], st.facts[a][0]) for a in attrs]
    text = st.sep.join(sentences).format(**facts)
    extra = [t.format(**facts) for a in attrs for key, t in _DERIVED.get(a, ())
             if facts[key] in source and facts[key] not in text]
    return st.sep.join([text, *extra])


class WorldRephraser(Rephraser):
    name = "world-renderer"

    def __init__(self, world: World) -> None:
        self.world = world
        self.usage = UsageTracker()
        self._people = sorted(world.people, key=lambda p: -len(p.name))

    def person_in(self, text: str) -> Person | None:
        return next((p for p in self._people if p.name in text), None)

    def stated(self, person: Person, text: str) -> list[str]:
        """The attributes of `person` whose value the text states (a date in any of the world's forms)."""
        out = []
        for a in ATTRIBUTES:
            if a == "birth_date":
                d = person.birth_date
                if format_date(d) in text or (str(d.year) in text and f"{d.day}" in text):
                    out.append(a)
            elif person.answer(a) in text:
                out.append(a)
        return out

    async def rewrite(self, style: Style, chunk: Chunk, context: str, *, doc: InputDoc, seed: int) -> Reply:
        person = self.person_in(doc.text or "")
        rng = random.Random(f"{seed}/{style.name}/{doc.id}/{chunk.index}")
        attrs = self.stated(person, chunk.text) if person else []
        if not attrs:
            text = chunk.text
        elif any(s in style.postprocess_steps for s in ("require_qa", "parse_qa")):
            facts = _facts(self.world, person)
            pairs = [f"Question: {_QA_QUESTIONS[a].format(name=person.name)} Answer: {person.answer(a)}."
                     for a in attrs]
            pairs += [f"Question: What else is known? Answer: {t.format(**facts)}" for a in attrs
                      for key, t in _DERIVED.get(a, ()) if facts[key] in chunk.text]
            rng.shuffle(pairs)
            text = "\n".join(pairs)
        else:
            text = render_facts(self.world, person, world_style_for(style, seed), attrs, rng, chunk.text)
        if style.prefix:
            text = f"{style.prefix} {text}"
        usage = Usage(approx_tokens(chunk.text) + approx_tokens(context), approx_tokens(text))
        self.usage.record(self.name, usage, cached=False, latency_s=0.0)
        return Reply(text, "stop", usage)


def world_from_spec(spec: str) -> World:
    """`world` (the nano world: seed 0, 100 people), `world:PATH.json` (a saved World) or
    `world:seed=S,people=N`."""
    from pathlib import Path

    rest = spec.removeprefix("world").removeprefix(":")
    if not rest:
        return World.generate(seed=0, n_people=100)
    if "=" in rest:
        kv = dict(item.split("=", 1) for item in rest.split(","))
        return World.generate(seed=int(kv.get("seed", 0)), n_people=int(kv.get("people", 100)))
    return World.load(Path(rest))
