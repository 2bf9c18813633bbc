"""Tool specs: validation and its errors, deduplication, the repository and its map, and the three importers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import pytest

from openk2.agentic.mcp_import import import_mcp_server, load_schema_file, tool_from_callable, tools_from_callables
from openk2.agentic.repository import ToolRepository, plot_map
from openk2.agentic.tools import ToolSchemaError, dedupe, validate_arguments, validate_tool

HERE = Path(__file__).parent
GOOD = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


@pytest.mark.parametrize("bad, reason", [
    ("not a dict", "must be a JSON object"),
    ({"description": "x", "parameters": {"type": "object"}}, "missing tool name"),
    ({"name": "get-weather", "description": "x"}, "must match"),
    ({"name": "f", "description": " "}, "no description"),
    ({"name": "f", "description": "d", "parameters": {"type": "objekt"}}, "not a valid JSON Schema"),
    ({"name": "f", "description": "d", "parameters": {"type": "array"}}, "must be 'object'"),
    ({"name": "f", "description": "d", "parameters": {"type": "object", "properties": {"a": {"type": "string"}},
                                                      "required": ["b"]}}, "undeclared properties ['b']"),
    ({"name": "f", "description": "d", "parameters": {"type": "object", "properties": {"a": {"description": "?"}}}},
     "parameters.properties.a has no type"),
    ({"name": "f", "description": "d", "parameters": {"type": "object", "properties": {"a": {
        "type": "object", "properties": {"b": {"type": "integer"}}, "required": ["c"]}}}},
     "parameters.properties.a.required names undeclared"),
    ({"name": "f", "description": "d", "parameters": "object"}, "must be a JSON object schema"),
])
def test_schema_validation_errors(bad, reason):
    with pytest.raises(ToolSchemaError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        validate_tool(bad)


def test_formats_and_argument_validation():
    a = validate_tool(GOOD)
    b = validate_tool(GOOD["function"])
    c = validate_tool({"name": "get_weather", "description": "Weather for a city.",
                       "inputSchema": GOOD["function"]["parameters"]})
    assert a.to_openai() == b.to_openai() == c.to_openai() == GOOD
    assert validate_arguments(a, {"city": "Paris"}) == []
    assert validate_arguments(a, {}) == ["(root): 'city' is a required property"]
    assert validate_arguments(a, {"city": 3}) == ["city: 3 is not of type 'string'"]
    assert validate_arguments(a, "Paris") == ["arguments must be a JSON object, got str"]


def test_dedupe_exact_name_and_near_duplicates():
    base = validate_tool(GOOD, source="a")
    same = validate_tool(GOOD, source="b")
    clash = validate_tool({**GOOD["function"], "parameters": {"type": "object", "properties": {}}}, source="c")
    near = validate_tool({**GOOD["function"], "name": "get_weather_for_city"}, source="d")
    other = validate_tool({"name": "book_flight", "description": "Book a flight between two airports.",
                           "parameters": {"type": "object", "properties": {"origin": {"type": "string"}}}})
    kept, rejected = dedupe([base, same, clash, near, other], threshold=0.7)
    assert [t.name for t in kept] == ["get_weather", "book_flight"]
    reasons = [r.reason for r in rejected]
    assert reasons[0] == "exact duplicate" and "already taken" in reasons[1] and "near-duplicate" in reasons[2]


def test_repository_taxonomy_roundtrip_and_map(tmp_path):
    repo = ToolRepository()
    for i, (dom, word) in enumerate([("finance/trading", "stock"), ("finance/banking", "account"),
                                     ("robotics/arm", "joint"), ("finance/trading", "order")]):
        spec = validate_tool({"name": f"{word}_tool_{i}", "description": f"Manage the {word} number {i}.",
                              "parameters": {"type": "object", "properties": {word: {"type": "string"}}}},
                             domain=dom, source="synthetic:x" if i % 2 else "mcp:y")
        assert repo.add(spec) is None
    assert repo.add(repo["stock_tool_0"]) is not None and len(repo.rejections) == 1
    tax = repo.taxonomy()
    assert tax["count"] == 4 and tax["children"]["finance"]["count"] == 3
    assert tax["children"]["finance"]["children"]["trading"]["count"] == 2
    repo.save(tmp_path / "repo.jsonl")
    with open(tmp_path / "repo.jsonl", "a") as f:
        f.write('{"name": "broken"}\nnot json\n')
    again = ToolRepository.load(tmp_path / "repo.jsonl")
    assert [t.to_dict() for t in again] == [t.to_dict() for t in repo]
    assert [r.item.rsplit(":", 1)[1] for r in again.rejections] == ["5", "6"]
    png = plot_map(again, tmp_path / "map.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_schema_files(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps({"tools": [
        {"name": "a_tool", "description": "A.", "inputSchema": {"type": "object", "properties": {}}},
        {"name": "b tool", "description": "B."}]}))
    (tmp_path / "many.jsonl").write_text(json.dumps({**GOOD, "domain": "weather"}) + "\n{oops\n")
    (tmp_path / "bad.json").write_text("{")
    specs, rej = load_schema_file(tmp_path / "list.json", domain="misc")
    assert [s.name for s in specs] == ["a_tool"] and "must match" in rej[0].reason and specs[0].domain == "misc"
    specs, rej = load_schema_file(tmp_path / "many.jsonl")
    assert specs[0].domain == "weather" and rej[0].item.endswith("many.jsonl:2") and "not JSON" in rej[0].reason
    assert load_schema_file(tmp_path / "bad.json")[1][0].reason.startswith("not JSON")
    assert "cannot read" in load_schema_file(tmp_path / "missing.json")[1][0].reason


def test_python_callables_to_schema():
    def search_flights(origin: str, destination: str, max_stops: int | None = None,
                       cabin: Literal["economy", "business"] = "economy", tags: list[str] = (),  # noqa: B006
                       state: dict | None = None) -> list[dict]:
        """Search flights between two airports.

        Longer text that is not part of the summary.

        Args:
            origin: IATA code of the departure airport.
            destination: IATA code of the arrival
                airport.
            max_stops: At most this many stops.
        Returns:
            The flights.
        """
        return []

    spec = tool_from_callable(search_flights, domain="travel")
    assert spec.description == "Search flights between two airports."
    p = spec.parameters
    assert p["required"] == ["origin", "destination"] and "state" not in p["properties"]
    assert p["properties"]["destination"] == {"type": "string", "description": "IATA code of the arrival airport."}
    assert p["properties"]["max_stops"] == {"type": "integer", "description": "At most this many stops.",
                                            "default": None}
    assert p["properties"]["cabin"] == {"enum": ["economy", "business"], "default": "economy"}
    assert p["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    assert spec.source.endswith("search_flights") and spec.domain == "travel"

    def undocumented(x: int) -> int:
        return x

    specs, rej = tools_from_callables([search_flights, undocumented])
    assert len(specs) == 1 and "no description" in rej[0].reason


def test_import_from_a_real_mcp_server_subprocess():
    specs, rejected = import_mcp_server([sys.executable, str(HERE / "mcp_server.py")], domain="utilities",
                                        timeout=120)
    assert rejected == []
    by_name = {s.name: s for s in specs}
    assert set(by_name) == {"get_forecast", "convert_currency"}
    f = by_name["get_forecast"]
    assert f.description == "Weather forecast for a city." and f.domain == "utilities"
    assert f.source == "mcp:mcp_server.py" and f.parameters["required"] == ["city"]
    assert f.parameters["properties"]["units"]["enum"] == ["metric", "imperial"]
    assert validate_arguments(f, {"city": "Oslo", "days": "x"}) == ["days: 'x' is not of type 'integer'"]


def test_dead_mcp_server_is_a_rejection_not_a_crash(tmp_path):
    dies = [sys.executable, "-c", "import sys; sys.stdin.readline(); sys.stderr.write('db locked\\n'); sys.exit(3)"]
    specs, rejected = import_mcp_server(dies, timeout=60)
    assert specs == [] and len(rejected) == 1 and "failed" in rejected[0].reason
    assert rejected[0].reason.endswith("its stderr ends: db locked")
    hangs = [sys.executable, "-c", "import time; time.sleep(60)"]
    specs, rejected = import_mcp_server(hangs, timeout=1)
    assert specs == [] and "timed out" in rejected[0].reason
    specs, rejected = import_mcp_server([str(tmp_path / "no-such-binary")], timeout=10)
    assert specs == [] and "failed" in rejected[0].reason


def test_dedup_index_matches_pairwise_search():
    import random

    from openk2.agentic.tools import DedupIndex, near_duplicate

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)]
    specs = []
    for i in range(200):
        ws = rng.sample(vocab, rng.randint(2, 6))
        specs.append(validate_tool({"name": f"t{i % 180}", "description": " ".join(ws),
                                    "parameters": {"type": "object", "properties": {}}}))
    for threshold in (0.5, 0.8):
        index, seen = DedupIndex(threshold), []
        for s in specs:
            got, want = index.find(s), near_duplicate(s, seen, threshold)
            assert (got and (got[0].name, got[1])) == (want and (want[0].name, want[1]))
            if got is None:
                index.add(s)
                seen.append(s)


def test_tsne_map_separates_domains():
    import numpy as np

    from openk2.agentic.common import text_vector
    from openk2.agentic.repository import tsne_2d

    groups = [["stock", "order", "price", "trade", "market"], ["arm", "joint", "gripper", "motor", "sensor"]]
    rng = np.random.default_rng(0)
    x = np.array([text_vector(list(rng.choice(g, 3, replace=False))) for g in groups for _ in range(15)])
    y = tsne_2d(x)  # the default 500 iterations (300 left 4 of 30 points beside the other domain on numpy 2.4)
    d = np.linalg.norm(y[:, None] - y[None], axis=-1) + np.eye(30) * 1e9
    label = np.arange(30) >= 15
    assert (label[d.argmin(1)] == label).mean() >= 0.9  # nearest neighbours on the map share the domain
