"""`openk2 rl` as a user runs it: a short run from a model directory, resume, `openk2 eval --model` on the result,
a SIGKILL mid-run that resumes to the same metrics as an uninterrupted run, and a bad key's error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .loop_helpers import tiny_digits_model_dir

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--set", "tasks.mix={digits = 1.0}", "--set", "eval.families=['digits']",
        "--set", "tasks.digits_kinds=['reverse']", "--set", "tasks.digits_levels=[1]", "--set", "tasks.train_pool=40",
        "--set", "rollout.group_size=4", "--set", "rollout.prompts_per_step=4", "--set", "eval.n_heldout={default = 8}",
        "--set", "eval.every=2", "--set", "run.tensorboard=false", "--set", "run.progress=false",
        "--set", "run.checkpoint_every=1", "--set", "train.lr=1e-3", "--set", "rollout.segment_tokens=4"]


def openk2(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openk2", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
                                         **(env or {})})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_digits_model_dir(tmp_path_factory.mktemp("rlcli") / "tiny")


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines() if line.strip()]


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def test_rl_cli_runs_resumes_and_its_output_is_a_model_dir(tiny_dir, tmp_path):
    out = tmp_path / "rl"
    r = openk2("rl", "-c", "recipes/rl-nano.toml", "--init", str(tiny_dir), "--out", str(out),
               "--set", "train.steps=2", *ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "digits held-out greedy pass@1" in r.stdout and "at step 2" in r.stdout
    assert [m["step"] for m in rows(out)] == [1, 2] and [e["step"] for e in rows(out, "eval.jsonl")] == [0, 2]
    assert (out / "checkpoints").is_dir() and (out / "tokenizer").is_dir()
    # two more steps: resumes from step 2
    r = openk2("rl", "-c", "recipes/rl-nano.toml", "--init", str(tiny_dir), "--out", str(out),
               "--set", "train.steps=4", *ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout and [m["step"] for m in rows(out)] == [1, 2, 3, 4]
    ev = openk2("eval", "--model", str(out), "--bench", "digits", "--limit", "4", "--out", str(tmp_path / "ev"),
                "--no-progress")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "digits" in ev.stdout


def test_kill_mid_run_resumes_to_the_same_metrics(tiny_dir, tmp_path):
    steps = ["--set", "train.steps=3", *ARGS]
    ref = openk2("rl", "--init", str(tiny_dir), "--out", str(tmp_path / "ref"), *steps)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = openk2("rl", "--init", str(tiny_dir), "--out", str(tmp_path / "run"), *steps,
                    env={"OPENK2_FAULT_KILL_AT_STEP": "2"})
    assert killed.returncode == -9
    resumed = openk2("rl", "--init", str(tiny_dir), "--out", str(tmp_path / "run"), *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = [comparable(r) for r in rows(tmp_path / "ref")], [comparable(r) for r in rows(tmp_path / "run")]
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    assert rows(tmp_path / "ref", "eval.jsonl") == rows(tmp_path / "run", "eval.jsonl")


def test_rl_cli_bad_key_lists_valid_keys(tmp_path):
    r = openk2("rl", "--init", str(tmp_path), "--out", str(tmp_path / "x"), "--set", "rollout.k=8")
    assert r.returncode == 2
    assert "unknown key 'rollout.k'" in r.stdout and "rollout.group_size" in r.stdout


def test_rl_cli_on_the_facts_family_and_eval_world_facts_score_alike(tiny_dir, tmp_path):
    out = tmp_path / "rl"
    r = openk2("rl", "--init", str(tiny_dir), "--out", str(out), *ARGS, "--set", "train.steps=1",  # later --set wins
               "--set", "tasks.mix={facts = 1.0}", "--set", "eval.families=['facts']",
               "--set", "tasks.facts_attributes=['hobby']")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "facts held-out greedy pass@1" in r.stdout
    ev = openk2("eval", "--model", str(out), "--bench", "world-facts", "--world", "recipes/nano.toml",
                "--limit", "4", "--out", str(tmp_path / "ev"), "--no-progress")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "world-facts" in ev.stdout


def test_rl_cli_trains_facts_paraphrase_and_evaluates_it_beside_facts(tiny_dir, tmp_path):
    out = tmp_path / "rl"
    r = openk2("rl", "--init", str(tiny_dir), "--out", str(out), *ARGS, "--set", "train.steps=1",
               "--set", "tasks.mix={facts_paraphrase = 1.0}", "--set", "eval.families=['facts_paraphrase', 'facts']",
               "--set", "tasks.facts_attributes=['hobby']")
    assert r.returncode == 0, r.stderr[-3000:]
    evals = rows(out, "eval.jsonl")
    assert {"eval/facts_paraphrase/pass@1", "eval/facts_paraphrase/hobby/pass@1", "eval/facts/hobby/pass@1"} <= set(
        evals[0])  # each family under its own keys: the same attribute's two wordings are not pooled
    assert rows(out)[0]["step"] == 1
