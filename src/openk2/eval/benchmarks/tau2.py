"""τ²-bench airline / retail / telecom as `openk2 eval` benchmarks (K2-Instruct: retail 70.6, airline 56.5,
telecom 65.8, Avg@4).

Each sample is one task; `rollout` runs the whole conversation (agent = the harness's chat, user simulator =
`user`, the `--user-model` spec) and `score` rebuilds the end state by replaying the transcript's tool calls on a
fresh environment (as the reference does), so a resumed run scores from saved transcripts alone. No v0.1.0 task
has NL_ASSERTION in its reward basis, so the judge (`judge`, `--judge-model`) is optional: when set, rollout
also grades the tasks' NL assertions into the saved details. `openk2 eval --max-steps N` lowers the reference's
200-step limit (smoke runs of small models; an episode that hits it scores 0). The three domains form the
report's "tau2" group: its overall row is the task-weighted mean of the domains (K2: 66.1, its "micro Pass@1").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openk2.eval.task import Benchmark, ChatFn, Completion, Sample, Score
from openk2.eval.tau2.env import make_env
from openk2.eval.tau2.orchestrator import MAX_STEPS, agent_system_prompt, run_episode
from openk2.eval.tau2.scoring import aggregate, nl_assertion_check, replay_transcript, score_components
from openk2.eval.tau2.tasks import load_tasks


@dataclass
class Tau2Benchmark(Benchmark):
    domain: str = ""
    split: str = "base"  # all tasks, as K2 reports; "test" / "train" for the RL splits
    judge: ChatFn | None = field(default=None, repr=False)  # set by the harness from --judge-model

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        tasks = load_tasks(self.domain, data_dir, split=self.split)[:limit]
        env = make_env(self.domain, data_dir=data_dir)
        system = {"role": "system", "content": agent_system_prompt(env.policy)}
        return [Sample(id=task.id, messages=[system], tools=env.tool_schemas(),
                       reference={"domain": self.domain, "task_id": task.id, "data_dir": str(data_dir)},
                       category=self.domain, metadata={"domain": self.domain}) for task in tasks]

    async def rollout(self, sample: Sample, chat: ChatFn, user: ChatFn | None = None) -> Completion:
        if user is None:
            raise ValueError(f"{self.name} needs a user simulator (--user-model)")
        data_dir = Path(sample.reference["data_dir"])
        env = make_env(self.domain, sample.reference["task_id"], data_dir=data_dir)
        max_steps = int(self.options.get("max_steps") or MAX_STEPS)
        ep = await run_episode(env, chat, user, max_steps=max_steps, data_dir=data_dir)
        last = next((m.get("content") or "" for m in reversed(ep.transcript) if m["role"] == "assistant"), "")
        transcript = list(ep.transcript)
        extra: dict[str, Any] = {"termination": ep.termination, "steps": ep.steps, "errors": ep.errors,
                                 "error": ep.error}
        if self.judge is not None and env.task.evaluation_criteria and env.task.evaluation_criteria.nl_assertions:
            extra["nl_assertions"] = (await nl_assertion_check(env.task, transcript, self.judge))[1]
        transcript.append({"role": "tau2_episode", **extra})  # saved with the conversation; ignored by models
        return Completion(text=last, finish_reason=ep.termination, transcript=transcript)

    def score(self, sample: Sample, completion: Completion) -> Score:
        episode = next((m for m in completion.transcript if m.get("role") == "tau2_episode"), {})
        transcript = [m for m in completion.transcript if m.get("role") != "tau2_episode"]
        env = make_env(self.domain, sample.reference["task_id"], data_dir=Path(sample.reference["data_dir"]))
        replay_transcript(env, transcript)
        result = score_components(env, transcript, episode.get("termination") or completion.finish_reason,
                                  data_dir=sample.reference["data_dir"])
        if episode.get("error"):  # why a model failed (e.g. its context is too short) belongs beside the score
            result["error"] = episode["error"]
        return Score(value=float(result["reward"]), extracted=episode.get("termination"), details=result)

    def aggregate(self, scores: dict[str, list[float]]) -> float | None:
        return aggregate(scores).get("avg@k")


def _bench(domain: str, k2: float) -> Tau2Benchmark:
    return Tau2Benchmark(name=f"tau2-{domain}", metric="avg@k", data_source=f"tau2/domains/{domain}",
                         k2_score=k2, temperature=0.0, k=4, max_tokens=8192, categories=False, domain=domain,
                         group="tau2")


BENCHMARKS: list[Benchmark] = [_bench("retail", 70.6), _bench("airline", 56.5), _bench("telecom", 65.8)]

__all__ = ["BENCHMARKS", "Tau2Benchmark"]
