"""SWE-bench: task loader from a user file, the patch agent interface, the harness call (with a fake runner), and
the message when Docker or swebench is missing."""

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from openk2.eval.benchmarks import swebench as sb
from openk2.eval.registry import get_benchmark
from openk2.eval.task import BenchmarkDataError, BenchmarkUnavailable, Completion, ScoringInfrastructureError

ROW = {"instance_id": "octo__demo-1", "repo": "octo/demo", "base_commit": "abc123", "problem_statement": "add() is off",
       "hints_text": "see add", "FAIL_TO_PASS": json.dumps(["tests/test_add.py::test_add"]), "PASS_TO_PASS": "[]",
       "version": "1.0"}
PATCH = "diff --git a/demo.py b/demo.py\n--- a/demo.py\n+++ b/demo.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n"


def _data(tmp_path: Path, stem="verified") -> Path:
    (tmp_path / "swe-bench").mkdir()
    (tmp_path / "swe-bench" / f"{stem}.jsonl").write_text(json.dumps(ROW) + "\n")
    return tmp_path


def test_loader_and_prompt_agent(tmp_path):
    bench = get_benchmark("swe-bench-verified")
    [s] = bench.load_tasks(_data(tmp_path))
    task = s.reference
    assert task.fail_to_pass == ["tests/test_add.py::test_add"] and task.pass_to_pass == []
    assert s.category == "octo/demo"

    async def chat(messages, tools):
        assert "add() is off" in messages[0]["content"] and "see add" in messages[0]["content"]
        return {"role": "assistant", "content": f"Here you go:\n```diff\n{PATCH}```\nDone."}

    completion = asyncio.run(bench.rollout(s, chat))
    assert completion.text == PATCH


def test_extract_patch_forms():
    assert sb.extract_patch(f"```diff\n{PATCH}```") == PATCH
    assert sb.extract_patch(f"text first\n{PATCH}") == PATCH
    assert sb.extract_patch("no patch here") == ""


def test_score_runs_the_official_harness_per_instance(tmp_path):
    bench = get_benchmark("swe-bench-verified")
    [s] = bench.load_tasks(_data(tmp_path))
    calls = []

    def fake_run(cmd, cwd, **kw):
        calls.append(cmd)
        assert cmd[1:3] == ["-m", "swebench.harness.run_evaluation"] and "--instance_ids" in cmd
        pred = json.loads(Path(cmd[cmd.index("--predictions_path") + 1]).read_text())
        report = Path(cwd) / "logs" / "run_evaluation" / "openk2" / "openk2" / "octo__demo-1" / "report.json"
        report.parent.mkdir(parents=True)
        report.write_text(json.dumps({"octo__demo-1": {"resolved": pred["model_patch"] == PATCH}}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    import dataclasses

    bench = dataclasses.replace(bench, options={"swe_runner": fake_run})
    assert bench.score(s, Completion(text=PATCH)).value == 1.0
    assert bench.score(s, Completion(text=PATCH.replace("x = 2", "x = 3"))).value == 0.0
    assert bench.score(s, Completion(text="")).value == 0.0 and len(calls) == 2  # no patch: no harness run

    broken = dataclasses.replace(bench, options={"swe_runner": lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "docker: cannot connect")})
    with pytest.raises(ScoringInfrastructureError, match="cannot connect"):
        broken.score(s, Completion(text=PATCH))


def test_missing_docker_or_swebench_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sb, "missing_requirements", lambda: ["the Python package swebench (pip install swebench)"])
    with pytest.raises(BenchmarkUnavailable, match="missing: the Python package swebench"):
        get_benchmark("swe-bench-multilingual").load(_data(tmp_path, "multilingual"))
    with pytest.raises(BenchmarkDataError, match="verified.jsonl: file not found"):
        get_benchmark("swe-bench-verified").load(tmp_path)
