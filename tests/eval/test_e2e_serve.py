"""End to end: `openk2 eval` (a subprocess) against a real `openk2 serve` subprocess through the openai: backend."""

import json
import os
import subprocess
import sys

import pytest

from openk2.data.world import World
from openk2.serve.testing import free_port, serve_tiny_random


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A random-weight tiny model behind `openk2 serve` (scores are near zero; the plumbing is what is tested)."""
    root = tmp_path_factory.mktemp("e2e")
    with serve_tiny_random(root, max_position_embeddings=512, max_batch=8) as url:
        yield (url, root)


def _eval(args, env_extra=None):
    env = {**os.environ, "OPENK2_TEST_KEY": "k", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "openk2", "eval", *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
def test_eval_against_openk2_serve_and_resume(served, tmp_path):
    url, root = served
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "test.jsonl").write_text("".join(
        json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n" for i in range(3)))
    world = tmp_path / "world.json"
    World.generate(seed=1, n_people=20).save(world)
    out = tmp_path / "out"
    args = ["--model", f"openai:{url}", "--model-name", "tiny", "--api-key-env", "OPENK2_TEST_KEY",
            "--bench", "gsm8k,world-recall", "--data-dir", str(data), "--world", str(world), "--limit", "4",
            "--k", "2", "--max-tokens", "8", "--concurrency", "4", "--out", str(out), "--no-progress"]
    r = _eval(args)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "results.json").read_text())
    for name, items in (("gsm8k", 3), ("world-recall", 4)):
        b = res["benchmarks"][name]
        assert b["infra_errors"] == 0 and b["summary"]["items"] == items and b["scored"] == 2 * items
        assert 0.0 <= b["score"] <= 100.0 and b["settings"]["max_tokens"] == 8
    assert res["benchmarks"]["gsm8k"]["truncation_rate"] > 0.5  # 8 tokens of a random model: cut off
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 14 and all("response" in x and "score" in x for x in rows)
    assert any(isinstance(x["prompt"], str) for x in rows)  # the world probes went to /v1/completions
    assert res["usage"]["models"]["tiny"]["requests"] == 14
    assert "| gsm8k | avg@2 |" in (out / "report.md").read_text()

    r = _eval(args)  # resume: everything is done, nothing is asked again
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["usage"]["total"]["requests"] == 0 and res["benchmarks"]["gsm8k"]["resumed"] == 6


@pytest.mark.slow
def test_an_unreachable_endpoint_is_recorded_as_infrastructure_errors(tmp_path):
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    out = tmp_path / "out"
    r = _eval(["--model", f"openai:http://127.0.0.1:{free_port()}/v1", "--model-name", "x", "--bench", "gsm8k",
               "--data-dir", str(data), "--out", str(out), "--max-retries", "1", "--no-progress"])
    assert r.returncode == 0, r.stdout + r.stderr
    b = json.loads((out / "results.json").read_text())["benchmarks"]["gsm8k"]
    assert b["infra_errors"] == 1 and b["scored"] == 0
    assert "1 infrastructure errors" in r.stdout
