"""Any evaluation-harness benchmark as single-turn verifiable RL tasks: the benchmark's `Sample`s are the prompts
and its scorer is the reward (`openk2.eval.task.Benchmark.score`).

    env = BenchmarkEnv(get_benchmark("gsm8k"))
    obs = await env.reset(sample); result = await env.step(text)    # reward = bench.score(sample, Completion(text))

Train only on data meant for training: the evaluation sets under ../shared/data are for evaluation, so an RL run
uses procedurally generated benchmarks (`seeded`, e.g. the world probes) or a training split; `openk2 rl`
refuses a benchmark that is not generated unless it is only evaluated on.
"""

from __future__ import annotations

from openk2.eval.task import Benchmark, Completion, Sample
from openk2.rl.types import Observation, StepResult


class BenchmarkEnv:
    def __init__(self, bench: Benchmark) -> None:
        self.bench = bench
        self.task_type = f"bench:{bench.name}"
        self.sample: Sample | None = None

    async def reset(self, task: Sample, seed: int | None = None) -> Observation:
        self.sample = task
        if task.messages:
            return Observation(messages=list(task.messages), tools=task.tools, info={"task_id": task.id})
        return Observation(messages=[{"role": "user", "content": task.prompt or ""}], info={"task_id": task.id})

    async def step(self, action_text: str) -> StepResult:
        if self.sample is None:
            raise RuntimeError("call reset(sample) before step()")
        score = self.bench.score(self.sample, Completion(text=action_text))
        return StepResult(None, float(score.value), terminated=True, truncated=False,
                          info={"extracted": str(score.extracted)[:200], **score.details})

    async def close(self) -> None:
        self.sample = None


__all__ = ["BenchmarkEnv"]
