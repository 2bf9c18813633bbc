"""Copy documents (openk2.data.copy_text): fresh names that recur within their document as identical tokens, no
excluded name, deterministic."""

import json
import re

from openk2.data.copy_text import copy_documents
from openk2.data.tokenizer import train_tokenizer
from openk2.data.world import World, world_documents

NAME = re.compile(r"[A-Z][a-z]+ [A-Z][a-z]+")
TEMPLATE_WORDS = {"Visitor", "Request", "Query", "Answer", "Roster", "Signed", "Entries", "First", "Last", "Who",
                  "The", "Then"}


def test_documents_are_deterministic_and_every_name_recurs():
    docs = copy_documents(40, seed=3)
    assert docs == copy_documents(40, seed=3) and docs != copy_documents(40, seed=4)
    assert len(docs) == 40
    for doc in docs:
        names = {n for n in NAME.findall(doc) if n.split()[0] not in TEMPLATE_WORDS}
        assert names and all(doc.count(n) >= 2 for n in names), doc


def test_names_are_fresh_per_document_and_exclusions_hold():
    world = World.generate(seed=0, n_people=100)
    excluded = {p.name for p in world.people}
    docs = copy_documents(400, exclude=excluded)
    assert not any(name in doc for doc in docs for name in excluded)
    firsts = [NAME.search(doc.split(". ", 1)[1] if doc.startswith("Visitor") else doc) for doc in docs[2::4]]
    pair_names = [m.group(0) for m in firsts if m]
    assert len(set(pair_names)) == len(pair_names) > 90  # a name is not reused across documents


def test_json_names_keep_the_leading_space_and_match_the_prose_tokens():
    world = World.generate(seed=0, n_people=60)
    tok = train_tokenizer(world_documents(world, renderings_per_person=2), 700, show_progress=False)
    doc = next(d for d in copy_documents(8, seed=1) if d.startswith("Request"))
    query = json.loads(doc.split("Query: ", 1)[1].split(" Answer:", 1)[0])
    name = query["name"]
    assert name.startswith(" ") and f"of{name}?" in doc
    name_ids = tok.encode(name)
    ids = tok.encode(doc)
    hits = [i for i in range(len(ids)) if ids[i:i + len(name_ids)] == name_ids]
    assert len(hits) == doc.count(name)  # the same tokens in the question, the prose and the JSON string
