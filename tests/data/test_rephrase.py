"""openk2.data.rephrase: chunking, autoregressive context, fidelity checks, resume, bad input, world path."""

import asyncio
import json
import random

import pytest

from openk2.data.rephrase import (
    FidelityConfig,
    LLMRephraser,
    RephraseConfig,
    chunk_document,
    load_library,
    reassemble,
    run_rephrase,
    sentence_spans,
)
from openk2.data.rephrase.fidelity import check_dates, check_entities, check_length, check_numbers, parse_judge
from openk2.data.rephrase.prompts import FormatError
from openk2.data.rephrase.world_rephraser import WorldRephraser
from openk2.data.world import World, render_biography, world_documents
from openk2.llm import LLMClient, LLMError, ReplayBackend, chat_response

LONG = ("Dr. Ada Vell was born on 3 March 1990 in Trevane. She studied at the University of Kosk! Did she like it? "
        "Yes, e.g. the library.\n\nIn 2015 she joined Zorn Labs, a firm with 1,200 staff. J. R. Mott hired her.  "
        "She left in 2021.\n\n\nHer hobby is chess; she plays 3 games a week. The end")


def _echo_text(payload):
    """The chunk an LLM was asked to rewrite (the last paragraph block after the instruction)."""
    return payload["messages"][-1]["content"].split("\n\n", 1)[1] if "so far" not in payload["messages"][-1][
        "content"] else payload["messages"][-1]["content"].rsplit("keep every fact, name, number and date.\n\n", 1)[1]


@pytest.mark.parametrize("budget", [1, 5, 12, 30, 1000])
def test_chunking_respects_sentences_and_reassembles_losslessly(budget):
    doc = chunk_document(LONG, budget)
    sents = {LONG[s:e] for s, e in sentence_spans(LONG)}
    for c in doc.chunks:
        assert c.tokens <= budget or c.oversize
        # a chunk is a run of whole sentences: it starts and ends on sentence boundaries
        assert any(c.text.startswith(s) for s in sents) and any(c.text.endswith(s) for s in sents)
        assert LONG[c.start:c.end] == c.text
    assert reassemble(doc.lead, [(c.text, c.sep) for c in doc.chunks]) == LONG
    assert "Dr. Ada Vell was born on 3 March 1990 in Trevane." in sents and "J. R. Mott hired her." in sents


def _pipeline(tmp_path, docs, client_or_rephraser, styles=("wrap-medium",), inp=None, **kw):
    inp = inp or tmp_path / "in.jsonl"
    inp.write_bytes(b"".join(d if isinstance(d, bytes) else (json.dumps({"text": d}) + "\n").encode() for d in docs))
    lib = load_library()
    rephraser = client_or_rephraser if not isinstance(client_or_rephraser, LLMClient) else \
        LLMRephraser(client_or_rephraser)
    cfg = RephraseConfig(inputs=[inp], out=tmp_path / "out", styles=[lib[s] for s in styles], progress=False, **kw)
    summary = asyncio.run(run_rephrase(cfg, rephraser))
    acc = [json.loads(x) for x in (tmp_path / "out" / f"rephrased{cfg.suffix}.jsonl").read_text().splitlines()]
    rej = [json.loads(x) for x in (tmp_path / "out" / f"rejected{cfg.suffix}.jsonl").read_text().splitlines()]
    return summary, acc, rej


def test_echo_model_gives_the_document_back_and_context_carries_previous_rewrite(tmp_path):
    backend = ReplayBackend(responder=lambda ep, p: _echo_text(p))
    client = LLMClient(backend, model="echo")
    _, acc, rej = _pipeline(tmp_path, [LONG], client, chunk_tokens=12, fidelity=FidelityConfig(checks=("format",)))
    assert not rej and len(acc) == 1
    assert acc[0]["text"] == LONG.strip()
    assert len(acc[0]["chunks"]) > 3
    users = [p["messages"][-1]["content"] for _, p in backend.calls]
    assert "so far" not in users[0]
    for i in range(1, len(users)):  # chunk i's request quotes the rewrite of chunk i-1
        prev = _echo_text(backend.calls[i - 1][1])
        assert prev in users[i].split("Continue the rewrite")[0]
    rec = acc[0]
    for f in ("key", "source", "style", "prompt_version", "model", "seed", "rephrasing", "chunks", "fidelity"):
        assert f in rec
    assert rec["source"]["id"].endswith("in.jsonl:1") and rec["model"] == "echo"


def test_autoregressive_context_is_the_rewritten_text_not_the_source(tmp_path):
    backend = ReplayBackend(responder=lambda ep, p: "REWRITTEN " + _echo_text(p).upper())
    _, acc, _ = _pipeline(tmp_path, [LONG], LLMClient(backend, model="m"), chunk_tokens=12,
                          fidelity=FidelityConfig(checks=()))
    second = backend.calls[1][1]["messages"][-1]["content"]
    assert "REWRITTEN DR. ADA VELL" in second


WORLD = World.generate(seed=3, n_people=20)
P = WORLD.train_people[0]
SRC = render_biography(WORLD, P, "encyclopedic", random.Random(0))
CLEAN = render_biography(WORLD, P, "encyclopedic", random.Random(1))
OTHER = WORLD.train_people[1]


@pytest.mark.parametrize("corrupt,check", [
    (lambda t: t.replace(str(P.birth_date.year), str(P.birth_date.year + 3)), check_numbers),
    (lambda t: t.replace(f" {P.birth_date.day} ", f" {P.birth_date.day % 28 + 1} "), check_numbers),
    (lambda t: t + f" {P.name} was born in 1931.", check_numbers),
    (lambda t: t.replace(format_month(P), "February" if format_month(P) != "February" else "July"), check_dates),
    (lambda t: t.replace(P.birth_city, OTHER.birth_city if OTHER.birth_city != P.birth_city else "Qxyloth"),
     check_entities),
    (lambda t: t.replace(P.last_name, "Vorquist"), check_entities),
    (lambda t: t.replace(P.employer, "Zyxx Foundry"), check_entities),
])
def test_each_deterministic_check_catches_its_corruption_and_passes_clean(corrupt, check):
    assert check(SRC, CLEAN).ok
    bad = corrupt(CLEAN)
    assert bad != CLEAN
    assert not check(SRC, bad).ok


def format_month(p):
    return p.birth_date.strftime("%B")


def test_length_and_judge_parsing():
    assert check_length(SRC, CLEAN, (0.5, 2.0)).ok
    assert not check_length(SRC, CLEAN.split(".")[0], (0.5, 2.0)).ok
    assert parse_judge('{"added": [], "dropped": [], "altered": []}').ok
    r = parse_judge('Sure! {"added": [], "dropped": ["the hobby"], "altered": []}')
    assert not r.ok and "dropped: the hobby" in r.reasons
    assert not parse_judge("looks fine to me").ok


def test_postprocessing_prefix_and_qa():
    lib = load_library()
    assert lib["nemotron-distill"].postprocess("Paraphrased Text: " + "word " * 60).startswith("word")
    with pytest.raises(FormatError):
        lib["nemotron-distill"].postprocess("Here you go: " + "word " * 60)
    out = lib["nemotron-knowledge-list"].postprocess("- a fact\n* b fact\n1. c fact")
    assert out == "a fact\nb fact\nc fact"
    with pytest.raises(FormatError):
        lib["wrap-qa"].postprocess("No pairs here.")


def test_user_prompt_file(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('[styles.pirate]\ntemplate = "Rewrite as a pirate: {text}"\npostprocess = ["strip_quotes"]\n')
    lib = load_library([f])
    assert "pirate" in lib and "wrap-easy" in lib
    assert lib["pirate"].messages("Hi.")[-1]["content"] == "Rewrite as a pirate: Hi."


def test_bad_input_and_bad_replies_are_recorded_rejections(tmp_path):
    def responder(ep, p):
        text = _echo_text(p)
        if "FAIL" in text:
            raise LLMError("boom", 500)
        if "TRUNC" in text:
            return chat_response("half", finish_reason="length")
        return "Here is a paraphrased version: " + text if "GOOD" in text else "I refuse."

    client = LLMClient(ReplayBackend(responder=responder), model="m")
    docs = ["GOOD one two three.", "", b"\xff\xfe not utf8\n", b"{broken json\n", "FAIL now.", "TRUNC here.",
            "Ignores format."]
    summary, acc, rej = _pipeline(tmp_path, docs, client, styles=("nemotron-paraphrase",),
                                  fidelity=FidelityConfig(checks=("format",)))
    lib = load_library()
    assert lib["nemotron-paraphrase"].min_output_tokens == 50  # "GOOD one two three." is too short: rejected too
    reasons = {r["source"]["id"].rsplit(":", 1)[1]: " | ".join(r["reasons"]) for r in rej}
    assert not acc and len(rej) == 7
    assert "shorter than 50" in reasons["1"] and "empty document" in reasons["2"]
    assert "UTF-8" in reasons["3"] and "invalid JSON" in reasons["4"]
    assert "endpoint failure" in reasons["5"] and "truncated" in reasons["6"] and "prefix" in reasons["7"]
    assert summary["counts"]["rejected"] == 7


def test_resume_after_kill_redoes_no_finished_record(tmp_path):
    docs = [f"Document number {i} says that Kel Varn{i} lives in Oska." for i in range(12)]
    calls = []

    def responder(ep, p):
        calls.append(1)
        return "Rewritten: " + _echo_text(p)

    client = LLMClient(ReplayBackend(responder=responder), model="m")
    _pipeline(tmp_path, docs[:7], client, fidelity=FidelityConfig(checks=()))
    out = tmp_path / "out" / "rephrased.jsonl"
    # a kill mid-write leaves a torn last line
    out.write_bytes(out.read_bytes() + b'{"text": "torn')
    n_first = len(calls)
    summary, acc, _ = _pipeline(tmp_path, docs, LLMClient(ReplayBackend(responder=responder), model="m"),
                                fidelity=FidelityConfig(checks=()))
    assert len(calls) - n_first == 5  # only the 5 new documents were asked for
    assert summary["counts"]["skipped_done"] == 7
    assert len(acc) == 12 and len({r["key"] for r in acc}) == 12


def test_shards_partition_the_corpus(tmp_path):
    docs = [f"Doc {i} about Tor{i}." for i in range(20)]
    keys = []
    for i in range(3):
        client = LLMClient(ReplayBackend(responder=lambda ep, p: "R: " + _echo_text(p)), model="m")
        _, acc, _ = _pipeline(tmp_path, docs, client, fidelity=FidelityConfig(checks=()), shard=(i, 3))
        keys += [r["source"]["id"].rsplit(":", 1)[1] for r in acc]
    assert sorted(keys, key=int) == [str(i) for i in range(1, 21)]


def test_near_duplicates_are_rejected(tmp_path):
    client = LLMClient(ReplayBackend(responder=lambda ep, p: "Same answer every time for this doc."), model="m")
    _, acc, rej = _pipeline(tmp_path, ["A doc about Ivo Dane."], client, n=3, fidelity=FidelityConfig(checks=()))
    assert len(acc) == 1 and len(rej) == 2 and all("near-duplicate" in r["reasons"][0] for r in rej)


def test_world_rephraser_is_faithful_and_diverse(tmp_path):
    docs = world_documents(WORLD, renderings_per_person=1, include_gazetteer=False)
    summary, acc, rej = _pipeline(tmp_path, docs, WorldRephraser(WORLD), styles=("wrap-medium", "k2-news"), n=3,
                                  fidelity=FidelityConfig(checks=("format", "numbers", "dates", "entities")))
    assert len(acc) >= 0.8 * 6 * len(docs), summary
    texts = {r["text"] for r in acc}
    assert len(texts) == len(acc)
    by_source = {}
    for r in acc:
        by_source.setdefault(r["source"]["id"], []).append(r["text"])
    rephraser = WorldRephraser(WORLD)
    for i, d in enumerate(docs):
        person = rephraser.person_in(d)
        for t in by_source.get(f"{tmp_path / 'in.jsonl'}:{i + 1}", []):
            assert rephraser.stated(person, t) == rephraser.stated(person, d)  # every fact, no other


def test_llm_judge_rejects_with_its_reasons(tmp_path):
    def responder(ep, p):
        content = p["messages"][-1]["content"]
        if content.startswith("You check a rewrite"):
            return '{"added": [], "dropped": ["the year"], "altered": []}' if "NOYEAR" in content else \
                '{"added": [], "dropped": [], "altered": []}'
        return "Rewritten: " + _echo_text(p).replace("1990", "NOYEAR" if "Ivo" in p["messages"][-1]["content"]
                                                       else "1990")

    client = LLMClient(ReplayBackend(responder=responder), model="m")
    _, acc, rej = _pipeline(tmp_path, ["Ivo Dane was born in 1990.", "Ada Vell was born in 1990."], client,
                            fidelity=FidelityConfig(checks=("judge",), judge=client))
    assert len(acc) == 1 and acc[0]["fidelity"][0]["judge"]["ok"]
    assert rej[0]["reasons"] == ["chunk 0: judge: dropped: the year"]


def test_cli_world_path(tmp_path):
    from typer.testing import CliRunner

    from openk2.cli import app

    inp = tmp_path / "bios.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in world_documents(WORLD, renderings_per_person=1,
                                                                                   include_gazetteer=False)[:5]))
    r = CliRunner().invoke(app, ["rephrase", str(inp), str(tmp_path / "out"), "--model", "world:seed=3,people=20",
                                 "--styles", "k2-lecture,wrap-qa", "--n", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["counts"]["tasks"] == 20 and run["counts"]["accepted"] >= 10 and run["model"] == "world-renderer"
    r = CliRunner().invoke(app, ["rephrase", str(inp), str(tmp_path / "out"), "--model", "world", "--styles", "nope"])
    assert r.exit_code == 2 and "unknown style" in r.output


def test_table1_rows_have_equal_epochs_and_distinct_rephrasings():
    from openk2.data.rephrase.experiment import row_documents

    raw = ["r0", "r1"]
    reph = [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    qa = ["q"]
    assert row_documents("raw", raw, reph, qa, 3) == [["r0", "r1", "q"]] * 3
    assert row_documents("one_rephrasing", raw, reph, qa, 3) == [["a0", "b0", "q"]] * 3
    assert row_documents("n_rephrasings", raw, reph, qa, 3) == [["a0", "b0", "q"], ["a1", "b1", "q"],
                                                                ["a2", "b2", "q"]]
