"""`digits`: held-out problems of the RL stage's procedural verifiable family (`openk2.rl.envs.procedural`):
reverse / sort / add short digit strings, answer by exact match of the digits. Generated, so `--seed S` draws a
fresh held-out set; held-out problems are disjoint from every problem RL or SFT trains on.

    openk2 eval --model runs/nano/rl --bench digits --limit 200
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from openk2.eval.task import Benchmark, Completion, Sample, Score
from openk2.rl.envs.procedural import DigitTask, digit_tasks, digits_reward


@dataclass
class Digits(Benchmark):
    name: str = "digits"
    metric: str = "avg@k"
    data_source: str = "generated (openk2.rl.envs.procedural, held-out split)"
    max_tokens: int = 12
    categories: bool = True
    seeded: bool = True

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        return [Sample(id=t.id, messages=t.messages(), reference=t.to_dict(), category=t.kind)
                for t in digit_tasks("heldout", limit or 200, seed=seed)]

    def score(self, sample: Sample, completion: Completion) -> Score:
        task = DigitTask.from_dict(sample.reference)
        return Score(digits_reward(task, completion.text), extracted=completion.text.strip()[:40])


BENCHMARKS = [Digits()]

__all__ = ["BENCHMARKS", "Digits"]
