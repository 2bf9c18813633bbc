"""The harness with a replay model: outputs, reasoning stripping, truncation, infra errors, resume, bad input."""

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from openk2.cli import app
from openk2.eval.harness import EvalSettings, read_rows, run_eval, strip_reasoning
from openk2.eval.models import ModelSpecError, open_model
from openk2.llm import LLMClient, LLMError, ReplayBackend, UsageTracker
from openk2.llm.replay import chat_response


def _data(tmp_path: Path, n: int = 6) -> Path:
    d = tmp_path / "data"
    (d / "gsm8k").mkdir(parents=True)
    rows = [{"question": f"What is {i} + {i}?", "answer": f"work\n#### {2 * i}"} for i in range(n)]
    (d / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


class Model:
    """Answers 'What is i + i?' with <think> and a boxed answer: right for even i, wrong for odd i; i == 5 fails
    (an endpoint error) while `broken`; i == 4 runs out of tokens."""

    def __init__(self) -> None:
        self.broken = True
        self.calls = 0

    def __call__(self, endpoint, payload):
        self.calls += 1
        q = payload["messages"][-1]["content"]
        i = int(q.split("What is ")[1].split(" ")[0])
        if i == 5 and self.broken:
            raise LLMError("upstream overloaded", 503)
        answer = 2 * i if i % 2 == 0 else 2 * i + 1
        if i == 4:
            return chat_response("<think>long thoughts that never", finish_reason="length")
        return chat_response(f"<think>{i} plus {i}</think>The answer is \\boxed{{{answer}}}.",
                             prompt_tokens=10, completion_tokens=5)


def _handle(tmp_path, model):
    from openk2.eval.models import ModelHandle

    client = LLMClient(ReplayBackend(responder=model), model="m", cache=None, usage=UsageTracker())
    return ModelHandle(client, "replay:test", "replay", "m")


def test_strip_reasoning_forms():
    assert strip_reasoning("<think>a</think> B") == ("B", "a")
    assert strip_reasoning("◁think▷x◁/think▷y") == ("y", "x")
    assert strip_reasoning("only thoughts</think>answer") == ("answer", "only thoughts")
    assert strip_reasoning("<think>cut off") == ("", "cut off")
    assert strip_reasoning(None) == ("", "")


def test_run_writes_outputs_counts_errors_and_resumes(tmp_path):
    data, out = _data(tmp_path), tmp_path / "out"
    model = Model()
    s = EvalSettings(benches=["gsm8k"], data_dir=data, out_dir=out, k=2, concurrency=4, progress=False)
    res = asyncio.run(run_eval(s, _handle(tmp_path, model)))
    b = res["benchmarks"]["gsm8k"]
    # items 0, 2 right; 1, 3 wrong; 4 truncated (wrong); 5 an infrastructure error (excluded).
    assert b["infra_errors"] == 2 and b["scored"] == 10 and b["summary"]["items"] == 5
    assert b["score"] == pytest.approx(40.0) and b["truncation_rate"] == pytest.approx(0.2)
    assert b["settings"]["k"] == 2 and b["settings"]["max_tokens"] == 8192 and len(b["data_sha256"]) == 1
    rows = read_rows(out / "samples.jsonl")
    ok = next(r for r in rows if r["id"] == "0" and r["draw"] == 0)
    assert ok["response"] == "The answer is \\boxed{0}." and ok["reasoning"] == "0 plus 0" and ok["score"] == 1.0
    assert ok["extracted"] == "0" and ok["prompt"][0]["role"] == "user"
    report = (out / "report.md").read_text()
    assert "| gsm8k | avg@2 | 40.0 |" in report and "infra errors" in report
    assert (out / "scores.png").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmarks"]["gsm8k"]["score"] == pytest.approx(40.0) and saved["model"]["spec"] == "replay:test"

    # Resume: nothing done is asked again; only the two failed draws are retried, and now succeed.
    calls = model.calls
    model.broken = False
    res = asyncio.run(run_eval(s, _handle(tmp_path, model)))
    b = res["benchmarks"]["gsm8k"]
    assert model.calls - calls == 2 and b["resumed"] == 10
    assert b["infra_errors"] == 0 and b["summary"]["items"] == 6 and b["score"] == pytest.approx(100 * 4 / 12)
    # Changed settings (k) do not reuse rows of other settings.
    s.k = 1
    asyncio.run(run_eval(s, _handle(tmp_path, model)))
    assert model.calls - calls == 2 + 6


def test_torn_last_line_is_ignored_on_resume(tmp_path):
    data, out = _data(tmp_path, n=2), tmp_path / "out"
    model = Model()
    s = EvalSettings(benches=["gsm8k"], data_dir=data, out_dir=out, progress=False)
    asyncio.run(run_eval(s, _handle(tmp_path, model)))
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"bench": "gsm8k", "id": "0", "dr')  # killed mid-write
    calls = model.calls
    res = asyncio.run(run_eval(s, _handle(tmp_path, model)))
    assert model.calls == calls and res["benchmarks"]["gsm8k"]["scored"] == 2


def test_bad_model_specs_list_the_valid_forms(tmp_path):
    for spec in ("nonsense", "openai:ftp://x", str(tmp_path / "missing")):
        with pytest.raises(ModelSpecError, match="valid forms|openai: needs|model-name|unknown model"):
            open_model(spec)
    with pytest.raises(ModelSpecError, match="--model-name"):
        open_model("openai:http://127.0.0.1:9/v1")


def test_cli_rejects_unknown_benchmarks_and_lists(tmp_path):
    r = CliRunner().invoke(app, ["eval", "--model", "replay:x", "--bench", "gsm8k,nope"])
    assert r.exit_code == 2 and "unknown benchmark(s) nope" in r.output and "math500" in r.output
    r = CliRunner().invoke(app, ["eval", "--model", "bogus-spec", "--bench", "gsm8k", "--data-dir",
                                 str(_data(tmp_path)), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "valid forms" in r.output
    r = CliRunner().invoke(app, ["eval", "--list"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "aime2025" in r.output and "49.5" in r.output and "world-qa" in r.output


def test_cli_with_a_replay_file(tmp_path):
    data = _data(tmp_path, n=2)
    replay = tmp_path / "replay.jsonl"
    from openk2.eval.benchmarks.math import PROMPT
    from openk2.llm.cache import request_key

    lines = []
    for i in range(2):
        payload = {"model": "rec", "temperature": 0.0, "top_p": 1.0, "max_tokens": 8192, "seed": 0,
                   "messages": [{"role": "user", "content": PROMPT.format(problem=f"What is {i} + {i}?")}]}
        lines.append({"key": request_key("chat/completions", payload), "endpoint": "chat/completions",
                      "request": payload, "response": chat_response(f"\\boxed{{{2 * i}}}", prompt_tokens=1000,
                                                                    completion_tokens=500)})
    replay.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["eval", "--model", f"replay:{replay}", "--model-name", "rec", "--bench", "gsm8k",
                                 "--data-dir", str(data), "--out", str(out), "--no-progress", "--price", "1,2"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["benchmarks"]["gsm8k"]["score"] == 100.0
    assert res["usage"]["total"]["cost_usd"] == pytest.approx(2 * (1000 * 1 + 500 * 2) / 1e6)
