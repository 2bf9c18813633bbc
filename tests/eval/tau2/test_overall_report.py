"""The report of `openk2 eval` over several τ²-bench domains: per-domain rows and a task-weighted overall row
beside K2's numbers, computed by `metrics.group_overalls` and written by the CLI."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from openk2.eval.harness import EvalSettings, run_eval
from openk2.eval.metrics import group_overalls
from openk2.eval.models import ModelHandle
from openk2.eval.report import write_report
from openk2.eval.tau2.tasks import DEFAULT_DATA_DIR
from openk2.llm import LLMClient, LLMError, ReplayBackend, ResponseCache, UsageTracker
from openk2.llm.replay import chat_response

BENCHES = "tau2-airline,tau2-retail,tau2-telecom"


def _entry(score, items, k2, stderr=0.0, group="tau2"):
    return {"score": score, "metric": "avg@k", "k2_score": k2, "group": group, "scored": items, "infra_errors": 0,
            "truncation_rate": 0.0, "settings": {"k": 1},
            "summary": {"items": items, "metrics": {"avg@k": {"stderr": stderr, "ci95": [0.0, 0.0]}}}}


def test_group_overall_weights_domains_by_tasks():
    benches = {"tau2-airline": _entry(50.0, 2, 56.5, stderr=10.0), "tau2-retail": _entry(20.0, 8, 70.6, stderr=5.0),
               "gsm8k": _entry(90.0, 100, 97.3, group=None)}
    g = group_overalls(benches)["tau2"]
    assert g["score"] == pytest.approx((2 * 50 + 8 * 20) / 10) and g["items"] == 10
    assert g["members"] == ["tau2-airline", "tau2-retail"]
    assert g["stderr"] == pytest.approx(((0.2 * 10) ** 2 + (0.8 * 5) ** 2) ** 0.5)
    assert g["k2_score"] == pytest.approx((2 * 56.5 + 8 * 70.6) / 10)
    # with every task (airline 50, retail 114, telecom 114) K2's weighted number is its published overall, 66.1
    full = {"a": _entry(0.0, 50, 56.5), "r": _entry(0.0, 114, 70.6), "t": _entry(0.0, 114, 65.8)}
    assert round(group_overalls(full)["tau2"]["k2_score"], 1) == 66.1
    assert group_overalls({"tau2-airline": _entry(50.0, 2, 56.5)}) == {}  # one domain: its own row says it all


def test_report_has_the_overall_row(tmp_path):
    benches = {"tau2-airline": _entry(50.0, 2, 56.5), "tau2-retail": _entry(20.0, 8, 70.6)}
    results = {"model": {"name": "m", "spec": "s", "kind": "replay"}, "data_dir": "d", "benchmarks": {},
               "groups": group_overalls(benches)}
    text = write_report(tmp_path, results).read_text()
    row = "| **tau2 overall** (task-weighted) | avg@1 | 26.0 | 0.0 | [26.0, 26.0] | 67.8 | 10 | 10 | 0.0% | 0 |"
    assert row in text


def _stop_at_once(endpoint, payload):
    return chat_response("###STOP###")


def _never(endpoint, payload):
    raise LLMError("the agent is not asked: the user stops at once", 500)


def test_cli_report_per_domain_and_overall(tmp_path):
    """Record a user simulator that stops at once (the agent is never asked) into a response cache, then run the
    CLI on it with replay: specs: a task whose gold end state is the initial one scores 1, the others 0."""
    cache = tmp_path / "recorded"
    handles = [ModelHandle(LLMClient(ReplayBackend(responder=fn), model="replay", cache=ResponseCache(cache),
                                     usage=UsageTracker()), f"replay:{cache}", "replay", "replay")
               for fn in (_never, _stop_at_once)]
    settings = EvalSettings(benches=BENCHES.split(","), data_dir=Path(DEFAULT_DATA_DIR), out_dir=tmp_path / "rec",
                            k=1, limit=3, max_steps=10, progress=False)
    recorded = asyncio.run(run_eval(settings, *handles))

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "openk2", "eval", "--model", f"replay:{cache}", "--user-model",
                        f"replay:{cache}", "--bench", BENCHES, "--data-dir", str(DEFAULT_DATA_DIR), "--limit", "3",
                        "--k", "1", "--max-steps", "10", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "results.json").read_text())
    scores = {n: b["score"] for n, b in res["benchmarks"].items()}
    assert scores == {n: b["score"] for n, b in recorded["benchmarks"].items()}
    assert all(b["infra_errors"] == 0 and b["summary"]["items"] == 3 for b in res["benchmarks"].values())
    assert all(b["settings"]["max_steps"] == 10 for b in res["benchmarks"].values())
    g = res["groups"]["tau2"]
    assert g["score"] == pytest.approx(sum(scores.values()) / 3) and g["items"] == 9
    assert g["k2_score"] == pytest.approx((56.5 + 70.6 + 65.8) / 3)
    report = (out / "report.md").read_text()
    for name, k2 in (("tau2-airline", "56.5"), ("tau2-retail", "70.6"), ("tau2-telecom", "65.8")):
        assert f"| {name} | avg@1 | {scores[name]:.1f} |" in report and f"| {k2} |" in report
    assert f"| **tau2 overall** (task-weighted) | avg@1 | {g['score']:.1f} |" in report
    assert "tau2 overall (task-weighted over tau2-airline, tau2-retail, tau2-telecom)" in r.stdout
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {row["extracted"] for row in rows} == {"user_stop"}
    assert 0.0 < g["score"] < 100.0  # some tasks need no change (refusals), most do


def test_cli_rejects_a_bad_step_limit():
    from typer.testing import CliRunner

    from openk2.cli import app

    r = CliRunner().invoke(app, ["eval", "--model", "replay:x", "--bench", "tau2-airline", "--max-steps", "0"])
    assert r.exit_code != 0 and "--max-steps must be >= 1, got 0" in r.output
