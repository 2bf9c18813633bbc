"""`world-facts`: held-out tasks of the RL stage's `facts` family (`openk2.rl.envs.facts`): chat questions (no tools)
about the pretraining world's people whose Q/A documents were never trained on; an answer scores 1 iff it names
the right value and no other value of the attribute. The same tasks and scorer as the RL run's own evaluation, so

    openk2 eval --model runs/nano/rl --bench world-facts

reproduces `rl_stage.json`'s facts number. The world is the `--world` option's, else the `--model` run
directory's (its `train_config.json`), else the default config's (see `openk2.eval.benchmarks.world`). `--seed S`
shuffles the held-out tasks differently (with `--limit`, a different subset); the split itself is fixed by the
world: held-out people are never RL or SFT training people.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from openk2.eval.benchmarks.world import WorldSource, resolve_world
from openk2.eval.task import Benchmark, Completion, Sample, Score
from openk2.rl.envs.facts import FactTask, fact_reward, fact_tasks


@lru_cache(maxsize=8)
def _resolve(path: str | None, qa_fraction: float | None) -> WorldSource:
    return resolve_world(Path(path) if path else None, qa_fraction)  # once per run, not once per scored sample


@dataclass
class WorldFacts(Benchmark):
    name: str = "world-facts"
    metric: str = "avg@k"
    data_source: str = "generated (openk2.rl.envs.facts, held-out people of the run's world)"
    max_tokens: int = 16
    temperature: float = 0.0
    categories: bool = True
    seeded: bool = True

    def _world(self) -> WorldSource:
        path = self.options.get("world") or self.options.get("run_dir")
        return _resolve(str(path) if path else None, self.options.get("world_qa_fraction"))

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        src = self._world()
        return [Sample(id=t.id, messages=t.messages(), reference=t.to_dict(), category=t.attribute)
                for t in fact_tasks(src.world, src.qa_fraction, "heldout", limit, seed=seed)]

    def score(self, sample: Sample, completion: Completion) -> Score:
        task = FactTask.from_dict(sample.reference)
        return Score(fact_reward(self._world().world, task, completion.text), extracted=completion.text.strip()[:60])


BENCHMARKS = [WorldFacts()]

__all__ = ["BENCHMARKS", "WorldFacts"]
