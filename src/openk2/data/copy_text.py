"""Copy documents: short texts whose made-up names occur in no other document and recur inside their own, so the
only way to predict a name's later mentions is to copy it from earlier in the context.

    docs = copy_documents(3000, seed=0, exclude={p.name for p in world.people})

Why. The world corpus (`openk2.data.world`) names ~90 people thousands of times each, so a model trained on it
predicts every name from memory and never needs to copy one from its context: the speedrun's nano model has no
induction behaviour at all (40 random tokens repeated: 16.0 nats/token on the first pass, 15.7 on the repeat,
docs/experiments.md, "Name copying: the model has no copy circuit"). The SFT stage then asks it to write a held-out
person's name from the user's request into a tool call, a copy of up to eight unfamiliar BPE pieces, which 72
SFT steps do not teach. These documents reward exactly that copy, in three shapes the tool-use format needs:
the next piece of a name already begun (induction), the first piece of a name after a different context (a name
mover: "... the record of" -> " Dagloun"), and a name inside a JSON string with the leading space that
`openk2.agentic.world_sft.copy_friendly` gives tool arguments (`{"name": " Dagloun Zeikaekesk"}`).

Names are drawn with the world's own syllable generator (`openk2.data.world._word`) from a seeded stream of their
own, so they look like the world's people but are fresh in every document; `exclude` keeps any given full name
(e.g. the pretraining world's held-out people, who must stay in no document) out.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection

from openk2.data.world import _word

_ATTRIBUTES = ("hobby", "employer", "birth_city", "university", "field", "birth_date")
_ROLES = ("clerk", "pilot", "teacher", "baker", "judge", "doctor", "captain", "weaver", "painter", "sailor")
_PLACES = ("the harbour", "the library", "the market", "the station", "the old mill", "the town hall")


def fresh_name(rng: random.Random) -> str:
    """A first and last name of the world's shape (`World.generate`: 2 and 2-3 syllables)."""
    return f"{_word(rng, 2, 2)} {_word(rng, 2, 3)}"


def _visitor_log(rng: random.Random, a: str, b: str) -> str:
    return (f"Visitor log. {a} arrived at {rng.choice(_PLACES)} in the morning. {b} came later. "
            f"The guard asked {a} to sign the book, and {a} signed it. Then {b} signed too. "
            f"Signed by: {a}; {b}.")


def _request(rng: random.Random, a: str, b: str) -> str:
    attribute = rng.choice(_ATTRIBUTES)
    return (f"Request: what is the {attribute.replace('_', ' ')} of {a}? The clerk opened the record of {a}. "
            f'Query: {json.dumps({"name": " " + a, "attribute": attribute})} '
            f"Answer: the record of {a} was found.")


def _pair(rng: random.Random, a: str, b: str) -> str:
    role_a, role_b = rng.sample(_ROLES, 2)
    return (f"In the square, {a} is a {role_a} and {b} is a {role_b}. "
            f"Who is the {role_a}? {a}. Who is the {role_b}? {b}. "
            f"The {role_b}, {b}, wrote a letter to the {role_a}, {a}.")


def _roster(rng: random.Random, a: str, b: str) -> str:
    c = fresh_name(rng)
    return (f"Roster: {a}, {b}, {c}. First on the list: {a}. Last on the list: {c}. "
            f'Entries: {json.dumps([{"name": " " + n} for n in (a, b, c)])}')


_TEMPLATES: tuple[Callable[[random.Random, str, str], str], ...] = (_visitor_log, _request, _pair, _roster)


def copy_documents(n: int, seed: int = 0, exclude: Collection[str] = ()) -> list[str]:
    """`n` copy documents (each one template filled with fresh names, ~60-110 tokens with the speedrun's
    tokenizer), deterministic in `seed`; no full name in `exclude` occurs in them."""
    rng = random.Random(f"openk2.copy_text:{seed}")
    excluded = set(exclude)

    def name() -> str:
        while (s := fresh_name(rng)) in excluded:
            pass
        return s

    docs: list[str] = []
    i = 0
    while len(docs) < n:
        a = name()
        b = name()
        while b == a:
            b = name()
        doc = _TEMPLATES[i % len(_TEMPLATES)](rng, a, b)
        i += 1
        if any(x in doc for x in excluded):  # a roster's third name or a name inside a longer one
            continue
        docs.append(doc)
    return docs


__all__ = ["copy_documents", "fresh_name"]
