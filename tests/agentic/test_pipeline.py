"""The pipeline end to end with a scripted LLM: outputs, resume through the response cache and the trajectory
log, shards, the executable-layer path, domain evolution, and the `openk2 synth` commands."""

from __future__ import annotations

import asyncio
import json
from functools import partial

from typer.testing import CliRunner

from openk2.agentic.evolve import evolve_tools
from openk2.agentic.examples import order_desk
from openk2.agentic.pipeline import SynthConfig, read_jsonl, run_synthesis
from openk2.cli import app
from openk2.llm import LLMClient, ReplayBackend, ResponseCache

from .helpers import fake_llm, small_repository


def _client(cache, **kw):
    backend = ReplayBackend(responder=partial(fake_llm, **kw))
    return LLMClient(backend, model="fake", cache=ResponseCache(cache)), backend


def test_pipeline_outputs_resume_and_shards(tmp_path):
    repo = small_repository()
    cfg = SynthConfig(out=str(tmp_path / "run"), n_agents=3, difficulties=("simple", "complex"), concurrency=2,
                      seed=1, progress=False)
    client, backend = _client(tmp_path / "cache", fail_user=True)  # the user simulator is down
    first = asyncio.run(run_synthesis(cfg, client, repo))
    assert first["tasks"] == 6 and first["errors"] == 6 and first["kept"] == 0
    rejected = read_jsonl(tmp_path / "run" / "rejected.jsonl")
    assert "simulation failed: RuntimeError: user simulator down" in rejected[0]["verdict"]["reasons"][0]

    client, backend = _client(tmp_path / "cache")  # resume: tasks come from the cache, failed dialogs rerun
    second = asyncio.run(run_synthesis(cfg, client, repo))
    assert second["simulated_now"] == 6 and second["errors"] == 0 and second["kept"] == 6
    assert client.usage.summary()["total"]["cached_requests"] >= 6  # the 6 task-writing requests
    sft = read_jsonl(tmp_path / "run" / "sft.jsonl")
    assert len(sft) == 6 and sft[0]["tools"] and sft[0]["provenance"]["models"]["judge"] == "fake"
    roles = [m["role"] for m in sft[0]["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    traj = read_jsonl(tmp_path / "run" / "trajectories.jsonl")[-1]
    assert traj["final_state"] == {"calls": 1}  # the tool simulator's state
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["acceptance_rate"] == 1.0 and (tmp_path / "run" / "report.md").exists()

    third = asyncio.run(run_synthesis(cfg, _client(tmp_path / "cache")[0], repo))
    assert third["simulated_now"] == 0 and third["kept"] == 6  # nothing left to simulate

    shards = []
    for i in range(2):
        c = SynthConfig(**{**cfg.__dict__, "shard": i, "num_shards": 2})
        shards.append(asyncio.run(run_synthesis(c, _client(tmp_path / "cache")[0], repo)))
        assert (tmp_path / "run" / f"shard-{i}-of-2" / "sft.jsonl").exists()
    agents = [{a["id"] for a in read_jsonl(tmp_path / "run" / f"shard-{i}-of-2" / "agents.jsonl")} for i in range(2)]
    assert not agents[0] & agents[1] and len(agents[0] | agents[1]) == 3
    assert sum(s["tasks"] for s in shards) == 6 and all(s["usage"]["requests"] == 0 for s in shards)
    r = CliRunner().invoke(app, ["synth", "merge", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    merged = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (merged["shards"], merged["missing_shards"], merged["kept"], merged["sft_records"]) == (2, [], 6, 6)
    assert len(read_jsonl(tmp_path / "run" / "sft.jsonl")) == 6
    assert json.loads((tmp_path / "run" / "usage.json").read_text())["total"]["cached_requests"] > 0


def test_pipeline_on_an_executable_layer_with_gold_states(tmp_path):
    cfg = SynthConfig(out=str(tmp_path / "run"), n_agents=2, difficulties=("simple",), progress=False)
    client, backend = _client(tmp_path / "cache")
    summary = asyncio.run(run_synthesis(cfg, client, None, layer_factory=lambda task, agent: order_desk()))
    tasks = read_jsonl(tmp_path / "run" / "tasks.jsonl")
    rejections = read_jsonl(tmp_path / "run" / "rejections.jsonl")
    # fake gold actions use order_id "x", which does not exist: executing them rejects the task
    for t in tasks:
        assert t["expected_state"] is not None
    assert all("gold action 0" in r["reason"] for r in rejections if r["stage"] == "tasks")
    assert summary["tasks"] + sum(r["stage"] == "tasks" for r in rejections) == 2
    assert not any(c[1]["messages"][0]["content"].startswith("You simulate") for c in backend.calls)


def test_domain_evolution_with_rule_checks():
    backend = ReplayBackend(responder=fake_llm)
    repo, rejected = asyncio.run(evolve_tools(LLMClient(backend, model="fake"), ["robot control", "banking"],
                                              subdomains=2, tools_per_domain=4))
    assert repo.domains() == ["banking/banking_desk", "robot_control/robot_control_desk"]
    assert sorted(t.name for t in repo) == ["banking_desk_lookup", "banking_desk_update",
                                            "robot_control_desk_lookup", "robot_control_desk_update"]
    reasons = sorted(r.reason for r in rejected)
    assert sum("duplicate domain name" in r for r in reasons) == 2
    assert sum("near-duplicate of" in r for r in reasons) == 2
    assert sum("undeclared properties" in r for r in reasons) == 2
    assert all(t.source == "synthetic:fake" for t in repo)


def test_synth_cli_tools_and_bad_input(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "get_weather", "description": "Weather.", "domain": "weather",
                                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
                                 {"name": "bad", "description": "x", "parameters": {"type": "objekt"}}]))
    r = CliRunner().invoke(app, ["synth", "tools", "--out", str(tmp_path / "o"), "--schema", str(tools),
                                 "--python", "openk2.agentic.examples:cancel_order", "--mcp", "x=/nonexistent/srv",
                                 "--mcp-timeout", "10"])
    assert r.exit_code == 0, r.output
    repo = read_jsonl(tmp_path / "o" / "repository.jsonl")
    assert sorted(t["name"] for t in repo) == ["cancel_order", "get_weather"]
    reasons = [x["reason"] for x in read_jsonl(tmp_path / "o" / "tool_rejections.jsonl")]
    assert any("MCP server" in x for x in reasons) and any("not a valid JSON Schema" in x for x in reasons)
    assert (tmp_path / "o" / "repository_map.png").exists()
    r = CliRunner().invoke(app, ["synth", "run", "--out", str(tmp_path / "o"), "--shard", "3/2"])
    assert r.exit_code == 2 and "0 <= i < N" in r.output
    r = CliRunner().invoke(app, ["synth", "run", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--repository or --executor" in r.output
