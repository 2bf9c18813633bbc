"""The world domain through the synthesis pipeline: no LLM (expert agent, scripted user), gold end states
and expected answers checked, SFT export; a wrong agent is rejected with reasons."""

from __future__ import annotations

import asyncio

from openk2.agentic.pipeline import SynthConfig, read_jsonl, run_synthesis
from openk2.agentic.world_path import world_inputs
from openk2.data.chat import render_chat
from openk2.data.world import World
from openk2.train.sft_data import read_chat_jsonl


def test_world_domain_through_the_pipeline_without_an_llm(tmp_path):
    inputs = world_inputs(World.generate(0, 40), split="train", n=12, seed=0)
    assert len(inputs.tasks) == 12 and not inputs.rejections
    assert all(t.expected_state is not None for t in inputs.tasks)
    cfg = SynthConfig(out=str(tmp_path / "expert"), judge=False, progress=False)
    summary = asyncio.run(run_synthesis(cfg, None, **inputs.expert()))
    assert summary["trajectories"] == 12 and summary["kept"] == 12 and summary["errors"] == 0
    sft = read_jsonl(tmp_path / "expert" / "sft.jsonl")
    assert len(sft) == 12 and sft[0]["provenance"]["agent"] == "agent-world-registry"
    render_chat(sft[0]["messages"], sft[0]["tools"])
    convs, skipped = read_chat_jsonl([tmp_path / "expert" / "sft.jsonl"])  # what `openk2 sft` reads
    assert len(convs) == 12 and not skipped and convs[0].tools == sft[0]["tools"]

    class Lazy:  # answers without tools: rule checks (expected tools) and answer checks reject it
        async def act(self, messages, tools):
            return {"role": "assistant", "content": "I do not know."}

    kw = {**inputs.expert(), "policy_factory": lambda agent, task: Lazy()}
    lazy = asyncio.run(run_synthesis(SynthConfig(out=str(tmp_path / "lazy"), judge=False, progress=False), None,
                                     **kw))
    rejected = read_jsonl(tmp_path / "lazy" / "rejected.jsonl")
    refusals = [t for t in inputs.tasks if t.meta["world_task"]["kind"] == "refuse"]
    assert lazy["kept"] == 0 and len(rejected) == 12
    assert all(r["verdict"]["reasons"] for r in rejected)
    if refusals:  # a refusal needs no tool, so it fails on the expected answer
        assert any("lacks expected output 'cannot'" in r["verdict"]["reasons"][0] for r in rejected)


def test_synth_world_cli(tmp_path):
    import json

    from typer.testing import CliRunner

    from openk2.cli import app

    r = CliRunner().invoke(app, ["synth", "world", "--out", str(tmp_path / "w"), "--n-tasks", "6", "--n-people",
                                 "40", "--no-progress", "--shard", "1/2"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "w" / "shard-1-of-2" / "summary.json").read_text())
    assert summary["tasks"] == 3 and summary["kept"] == 3
    r = CliRunner().invoke(app, ["synth", "world", "--out", str(tmp_path / "w"), "--judge"])
    assert r.exit_code == 2 and "need --model" in r.output
