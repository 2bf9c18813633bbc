"""SWE-bench Verified and Multilingual: tasks from a user file, a patch-producing agent, scoring by the official
`swebench` Docker harness.

Data (not shipped): export the HF datasets `SWE-bench/SWE-bench_Verified` (500) or `SWE-bench/SWE-bench_Multilingual`
(300) to `<data-dir>/swe-bench/verified.jsonl` / `multilingual.jsonl` (`.json` and `.parquet` work too). Fields
used: instance_id, repo, base_commit, problem_statement, FAIL_TO_PASS, PASS_TO_PASS (hints_text, version optional).

Agent: `PatchAgent.solve(task, chat)` returns a `Completion` whose text is a unified diff. The default,
`PromptPatchAgent`, is a single call (problem statement in, ```diff``` out: an Agentless-style lower bound with
no repository access). Plug in your own with `--swe-agent module:Class` (any class with that `solve`).

Scoring: a task is resolved when all FAIL_TO_PASS and PASS_TO_PASS tests pass after the patch, as decided by
`python -m swebench.harness.run_evaluation` (one instance per call, in its Docker images). openk2 does not
re-implement those images: without the `swebench` package, the docker CLI or a running Docker daemon, loading
fails with a message that says which is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from openk2.eval.benchmarks.math import read_jsonl
from openk2.eval.task import (
    Benchmark,
    BenchmarkDataError,
    BenchmarkUnavailable,
    ChatFn,
    Completion,
    Sample,
    Score,
    ScoringInfrastructureError,
)

REQUIRED = ("instance_id", "repo", "base_commit", "problem_statement")
PROMPT = """You are fixing an issue in the repository {repo} at commit {base_commit}.

<issue>
{problem_statement}
</issue>
{hints}
Write a patch that resolves the issue. Answer with a single unified diff (as produced by `git diff`, paths relative
to the repository root, a/ and b/ prefixes) inside one ```diff code block, and nothing else."""


@dataclass
class SWETask:
    instance_id: str
    repo: str
    base_commit: str
    problem_statement: str
    hints: str = ""
    fail_to_pass: list[str] = field(default_factory=list)
    pass_to_pass: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


class PatchAgent(Protocol):
    async def solve(self, task: SWETask, chat: ChatFn) -> Completion: ...


def extract_patch(text: str) -> str:
    """The diff in a ```diff (or ```patch) block, else raw text from the first 'diff --git'/'--- a/'; '' if none."""
    blocks = re.findall(r"```(?:diff|patch)?\s*\n(.*?)```", text, re.S)
    for block in blocks:
        if re.search(r"^(diff --git|--- )", block, re.M):
            return block if block.endswith("\n") else block + "\n"
    m = re.search(r"^(diff --git|--- a/)", text, re.M)
    return text[m.start():].rstrip() + "\n" if m else ""


class PromptPatchAgent:
    """One model call: the issue in, a diff out."""

    async def solve(self, task: SWETask, chat: ChatFn) -> Completion:
        hints = f"\n<hints>\n{task.hints}\n</hints>\n" if task.hints.strip() else ""
        messages = [{"role": "user", "content": PROMPT.format(repo=task.repo, base_commit=task.base_commit,
                                                              problem_statement=task.problem_statement, hints=hints)}]
        reply = await chat(messages, None)
        text = reply.get("content") or ""
        return Completion(text=extract_patch(text), transcript=[*messages, reply])


def _tests(value: Any) -> list[str]:
    if isinstance(value, str):  # the HF export stores these as JSON strings
        try:
            value = json.loads(value) if value.strip() else []
        except ValueError:
            return [value]
    return list(value or [])


def read_tasks(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise BenchmarkDataError(f"{path}: not valid JSON ({e})") from None
    else:
        return read_jsonl(path, REQUIRED)
    for n, row in enumerate(rows, 1):
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise BenchmarkDataError(f"{path}: record {n}: missing field(s) {', '.join(missing)}")
    return rows


def missing_requirements() -> list[str]:
    """What the official harness needs that this machine lacks ([] when everything is there)."""
    missing = []
    if importlib.util.find_spec("swebench") is None:
        missing.append("the Python package swebench (pip install swebench)")
    if shutil.which("docker") is None:
        missing.append("the docker CLI on PATH")
    else:
        try:
            info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                                  text=True, timeout=20)
            if info.returncode != 0:
                missing.append(f"a running Docker daemon (docker info: {(info.stderr or info.stdout).strip()[:200]})")
        except (OSError, subprocess.TimeoutExpired) as e:
            missing.append(f"a running Docker daemon (docker info: {e})")
    return missing


def load_agent(spec: str | None) -> PatchAgent:
    if not spec:
        return PromptPatchAgent()
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)()
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--swe-agent {spec!r}: {e} (want module:Class)") from None


@dataclass
class SWEBench(Benchmark):
    file_stem: str = "verified"
    dataset_name: str = "SWE-bench/SWE-bench_Verified"

    def _path(self, data_dir: Path) -> Path:
        for ext in (".jsonl", ".json", ".parquet"):
            p = data_dir / "swe-bench" / f"{self.file_stem}{ext}"
            if p.is_file():
                return p
        raise BenchmarkDataError(f"{data_dir / 'swe-bench' / (self.file_stem + '.jsonl')}: file not found (export "
                                 f"{self.dataset_name} from the HF Hub there; see docs/evaluation.md)")

    def data_files(self, data_dir: Path) -> list[Path]:
        try:
            return [self._path(data_dir)]
        except BenchmarkDataError:
            return []

    def load_tasks(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        path = self._path(data_dir)
        samples = []
        for row in read_tasks(path)[:limit]:
            task = SWETask(instance_id=row["instance_id"], repo=row["repo"], base_commit=row["base_commit"],
                           problem_statement=row["problem_statement"], hints=row.get("hints_text") or "",
                           fail_to_pass=_tests(row.get("FAIL_TO_PASS")), pass_to_pass=_tests(row.get("PASS_TO_PASS")),
                           raw=row)
            samples.append(Sample(id=task.instance_id, messages=[], reference=task, category=task.repo,
                                  metadata={"data_file": str(path.resolve())}))
        return samples

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        samples = self.load_tasks(data_dir, limit)
        missing = missing_requirements()
        if missing:
            raise BenchmarkUnavailable(f"{self.name}: the official swebench harness cannot run here; missing: "
                                       + "; ".join(missing) + ". openk2 does not re-implement its Docker images.")
        return samples

    async def rollout(self, sample: Sample, chat: ChatFn, user: ChatFn | None = None) -> Completion:
        return await load_agent(self.options.get("swe_agent")).solve(sample.reference, chat)

    def score(self, sample: Sample, completion: Completion) -> Score:
        patch = completion.text
        if not patch.strip():
            return Score(0.0, extracted="", details={"error": "no patch"})
        return evaluate_patch(sample, patch, runner=self.options.get("swe_runner") or subprocess.run)


def evaluate_patch(sample: Sample, patch: str, runner: Any = subprocess.run, timeout_s: int = 3600) -> Score:
    """Run the official harness on one instance; resolved -> 1.0."""
    task: SWETask = sample.reference
    data_file = Path(sample.metadata["data_file"])
    with tempfile.TemporaryDirectory(prefix="openk2-swe-") as tmp:
        work = Path(tmp)
        if data_file.suffix == ".parquet":  # the harness reads local .json/.jsonl only
            import pyarrow.parquet as pq

            converted = work / "dataset.jsonl"
            converted.write_text("".join(json.dumps(r, default=str) + "\n" for r in pq.read_table(data_file)
                                         .to_pylist()))
            data_file = converted
        preds = work / "predictions.jsonl"
        preds.write_text(json.dumps({"instance_id": task.instance_id, "model_name_or_path": "openk2",
                                     "model_patch": patch}) + "\n")
        run_id = "openk2"
        cmd = [sys.executable, "-m", "swebench.harness.run_evaluation", "--dataset_name", str(data_file),
               "--split", "test", "--predictions_path", str(preds), "--instance_ids", task.instance_id,
               "--max_workers", "1", "--run_id", run_id]
        proc = runner(cmd, cwd=work, capture_output=True, text=True, timeout=timeout_s)
        report = work / "logs" / "run_evaluation" / run_id / "openk2" / task.instance_id / "report.json"
        if not report.is_file():
            tail = ((proc.stderr or "") + (proc.stdout or ""))[-1500:]
            raise ScoringInfrastructureError(f"swebench wrote no report for {task.instance_id} "
                                             f"(exit {proc.returncode}): {tail}")
        result = json.loads(report.read_text()).get(task.instance_id, {})
        return Score(float(bool(result.get("resolved"))), extracted=patch,
                     details={"tests_status": result.get("tests_status")})


BENCHMARKS: list[Benchmark] = [
    SWEBench(name="swe-bench-verified", metric="avg@k", k2_score=65.8, temperature=0.0, max_tokens=16384, k=1,
             data_source="user file swe-bench/verified.jsonl (SWE-bench Verified, 500); Docker", categories=True,
             file_stem="verified", dataset_name="SWE-bench/SWE-bench_Verified"),
    SWEBench(name="swe-bench-multilingual", metric="avg@k", k2_score=47.3, temperature=0.0, max_tokens=16384, k=1,
             data_source="user file swe-bench/multilingual.jsonl (SWE-bench Multilingual, 300); Docker",
             categories=True, file_stem="multilingual", dataset_name="SWE-bench/SWE-bench_Multilingual"),
]
