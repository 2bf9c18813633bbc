"""The whole LLM path of `openk2 synth run` against a real `openk2 serve` subprocess on a tiny random model.

Output quality is irrelevant (the model writes noise): what is tested is that every role's request reaches
the server and comes back, that noise becomes recorded rejections with reasons rather than crashes, that
usage is accounted, and that a rerun is answered entirely from the response cache.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from typer.testing import CliRunner

from openk2.agentic.agents import Agent
from openk2.agentic.pipeline import read_jsonl
from openk2.agentic.simulate import FailureRates, LLMToolSimulator, LLMUser, ScriptedAgent, simulate
from openk2.agentic.tasks import Rubric, Task
from openk2.cli import app
from openk2.llm import LLMClient, OpenAIHTTPBackend, ResponseCache
from openk2.model import build_model, get_preset
from openk2.serve.testing import make_model_dir, serve_subprocess, toy_tokenizer

from .helpers import call, small_repository

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = toy_tokenizer()
        model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=8192), seed=0)
        root = tmp_path_factory.mktemp("synth")
        model_dir = make_model_dir(root / "toy", model, tok)
    finally:
        torch.set_num_threads(previous)
    with serve_subprocess(model_dir, "--api-key", "k", "--model-name", "toy", "--threads", "1", "--max-batch", "4",
                          "--max-len", "8192", "--device", "cpu", log_path=root / "server.log",
                          startup_s=180) as (url, _):
        yield url


LLM_ARGS = ["--api-key", "k", "--model", "toy", "--max-tokens", "12", "--temperature", "0.8", "--no-progress",
            "--concurrency", "2", "--max-turns", "1", "--max-steps", "1"]


def test_synth_run_against_openk2_serve(server, tmp_path):
    repo = small_repository()
    repo.save(tmp_path / "repository.jsonl")
    # 1. everything from the LLM, tasks included: noise in, recorded rejections out
    out1 = tmp_path / "llm-tasks"
    r = CliRunner().invoke(app, ["synth", "run", "--repository", str(tmp_path / "repository.jsonl"), "--out",
                                 str(out1), "--n-agents", "1", "--difficulties", "simple", "--base-url", server,
                                 "--price-in", "1.0", "--price-out", "2.0", *LLM_ARGS])
    assert r.exit_code == 0, r.output
    rejections = read_jsonl(out1 / "rejections.jsonl")
    assert rejections and all(x["stage"] == "tasks" and x["reason"] for x in rejections)
    usage = json.loads((out1 / "usage.json").read_text())
    toy = usage["models"]["toy"]
    assert toy["requests"] == 1 and toy["completion_tokens"] >= 1
    assert toy["cost_usd"] == pytest.approx((toy["prompt_tokens"] * 1.0 + toy["completion_tokens"] * 2.0) / 1e6)

    # 2. given agent and task: user simulator, agent (with tools) and judge all talk to the server
    agent = Agent("agent-q", "finance/trading", "You help with stock quotes.", ["get_quote", "place_order"], seed=3)
    task = Task("quote", "agent-q", "You want the price of ACME.", Rubric(["the price is reported"]),
                user_facts={"ticker": "ACME"}, seed=5)
    (tmp_path / "agents.jsonl").write_text(json.dumps(agent.to_dict()) + "\n")
    (tmp_path / "tasks.jsonl").write_text(json.dumps(task.to_dict()) + "\n")
    out2 = tmp_path / "given"
    args = ["synth", "run", "--repository", str(tmp_path / "repository.jsonl"), "--agents",
            str(tmp_path / "agents.jsonl"), "--tasks", str(tmp_path / "tasks.jsonl"), "--out", str(out2),
            "--base-url", server, *LLM_ARGS]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    (traj,) = read_jsonl(out2 / "trajectories.jsonl")
    assert traj["task_id"] == "quote" and traj["models"]["agent"] == "toy"
    verdicts = read_jsonl(out2 / "kept.jsonl") + read_jsonl(out2 / "rejected.jsonl")
    assert len(verdicts) == 1 and (verdicts[0]["verdict"]["kept"] or verdicts[0]["verdict"]["reasons"])
    first = json.loads((out2 / "usage.json").read_text())["total"]
    assert first["requests"] >= 2
    cached = [rec["request"] for rec in ResponseCache(out2 / "llm_cache").records()]
    assert any(req.get("tools") for req in cached)  # the agent's requests carry the tool schemas
    assert any(req["messages"][0]["content"].startswith("You play a user") for req in cached)

    # 3. a rerun is served from the response cache: no new requests
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    again = json.loads((out2 / "usage.json").read_text())["total"]
    assert again["requests"] == 0 and again["cached_requests"] >= 1


def test_synth_tools_evolution_against_openk2_serve(server, tmp_path):
    r = CliRunner().invoke(app, ["synth", "tools", "--out", str(tmp_path / "t"), "--evolve", "robot control",
                                 "--subdomains", "1", "--base-url", server, "--api-key", "k", "--model", "toy",
                                 "--max-tokens", "12"])
    assert r.exit_code == 0, r.output
    (rej,) = read_jsonl(tmp_path / "t" / "tool_rejections.jsonl")
    assert rej["stage"] == "evolve" and rej["item"] == "category:robot control" and rej["reason"]
    assert json.loads((tmp_path / "t" / "usage_tools.json").read_text())["total"]["requests"] == 1


def test_synth_world_with_an_llm_agent_against_openk2_serve(server, tmp_path):
    r = CliRunner().invoke(app, ["synth", "world", "--out", str(tmp_path / "w"), "--n-tasks", "2", "--n-people", "40",
                                 "--base-url", server, "--api-key", "k", "--model", "toy", "--max-tokens", "8",
                                 "--no-progress", "--judge"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["trajectories"] == 2 and summary["usage"]["requests"] >= 2
    for rec in read_jsonl(tmp_path / "w" / "rejected.jsonl"):
        assert rec["verdict"]["reasons"]  # noise from the tiny model: rejected, with reasons


def test_tool_simulator_and_user_against_openk2_serve(server, tmp_path):
    repo = small_repository()
    agent = Agent("agent-q", "finance/trading", "You help with stock quotes.", ["get_quote"], seed=3)
    task = Task("quote", "agent-q", "You want the price of ACME.", Rubric(["the price is reported"]), seed=5)

    async def run():
        async with LLMClient(OpenAIHTTPBackend(server, api_key="k", max_retries=0), model="toy",
                             cache=ResponseCache(tmp_path / "cache")) as client:
            sim = LLMToolSimulator(client, agent.tool_specs(repo), seed=1, rates=FailureRates(0, 0, 0),
                                   max_tokens=12)
            policy = ScriptedAgent([{"role": "assistant", "content": None,
                                     "tool_calls": [call("get_quote", {"ticker": "ACME"})]},
                                    {"role": "assistant", "content": "Done."}])
            traj = await simulate(task, agent, policy, LLMUser(client, task, max_tokens=12), sim, max_turns=1)
            return traj, client.usage.summary()["total"]

    traj, usage = asyncio.run(run())
    # the tool simulator's request went out; noise is recorded as the trajectory's error, not raised
    assert usage["requests"] >= 2
    assert traj.status == "done" or "JSON" in traj.error or "empty" in traj.error
