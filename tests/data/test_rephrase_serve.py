"""`openk2 rephrase` (a subprocess) against a real `openk2 serve` subprocess: the LLM path's plumbing (a random
tiny model: output quality is irrelevant), resume through the response cache, provenance and accounting."""

import json
import os
import subprocess
import sys

import pytest

from openk2.serve.testing import serve_tiny_random


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serve_tiny_random(tmp_path_factory.mktemp("rephrase-serve"), max_position_embeddings=1024,
                           max_batch=4) as url:
        yield url


def _rephrase(args):
    env = {**os.environ, "OPENK2_TEST_KEY": "k"}
    return subprocess.run([sys.executable, "-m", "openk2", "rephrase", *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
def test_rephrase_against_openk2_serve_and_resume(served, tmp_path):
    inp = tmp_path / "in.jsonl"
    docs = ["Ada Vell was born on 3 March 1990. She works at Zorn Labs. She likes chess.",
            "Kel Varn studied botany at Oska College. He was born in 1971.", ""]
    inp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    args = [str(inp), str(out), "--model", f"openai:{served}", "--model-name", "tiny", "--api-key-env",
            "OPENK2_TEST_KEY", "--styles", "wrap-medium,k2-news", "--chunk-tokens", "12", "--concurrency", "2",
            "--checks", "none", "--max-tokens", "16", "--price", "1,2", "--no-progress", "--seed", "1"]
    r = _rephrase(args)
    assert r.returncode == 0, r.stdout + r.stderr
    acc = [json.loads(x) for x in (out / "rephrased.jsonl").read_text().splitlines()]
    rej = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(acc) + len(rej) == 6
    assert sum("empty document" in " ".join(x["reasons"]) for x in rej) == 2
    for rec in acc:
        assert rec["model"] == "tiny" and rec["style"] in ("wrap-medium", "k2-news") and rec["prompt_version"]
        assert len(rec["chunks"]) >= 2 and rec["chunks"][1]["context_tokens"] > 0
    for rec in rej:  # a random model may emit nothing usable or run out of tokens: recorded, with a reason
        assert rec["reasons"]
    usage = json.loads((out / "usage.json").read_text())
    assert usage["models"]["tiny"]["requests"] >= 4 and usage["models"]["tiny"]["cost_usd"] > 0
    # rerun: every record is done, nothing is asked again
    r2 = _rephrase(args)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["skipped_done"] == 6 and run["usage_total"]["requests"] == 0
    assert len((out / "rephrased.jsonl").read_text().splitlines()) == len(acc)
