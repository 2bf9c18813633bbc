"""The world benchmarks: the speedrun's knowledge probes as registered benchmarks (one code path for both).

    world-recall   "<Name> was born in" for people in the training documents (phrasing seen in training)
    world-qa       "Q: In which city was <Name> born?\\nA:" after solved demos, for people whose Q/A documents
                   were never trained on (held-out phrasing)
    world-unseen   both phrasings for held-out people: the chance baseline

Items are completion prompts (`Sample.prompt`): the harness sends them to the completions endpoint (`openk2
serve` and vLLM/SGLang have one; base models have nothing else), and `openk2.train.evaluation.probe_report` feeds
the same samples to the model in process during training. Both score with `score_probe` and break results down
with `probe_breakdown`.

The world comes from, in order: `--world PATH` (a run directory, its `train_config.json`, a TOML train config or
a `World.save` JSON file), the `--model` run directory, or the default config's world (`nano`'s). Seed 0 probes
the first `max_people` people per split, exactly as the speedrun does; any other `--seed` draws a fresh random
set of people, so a result can be checked on items nobody tuned on.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openk2.data.world import Probe, World, answer_matches, world_probes
from openk2.eval.task import Benchmark, BenchmarkDataError, Completion, Sample, Score

PROBE_PEOPLE = 60  # people per split (6 attributes x 2 phrasings each): the speedrun's probe budget


@dataclass
class WorldSource:
    world: World
    qa_fraction: float
    origin: str


def world_from_config(data: dict[str, Any], origin: str) -> WorldSource:
    from openk2.train.config import DataSection

    defaults = DataSection()
    seed, people = data.get("world_seed", defaults.world_seed), data.get("world_people", defaults.world_people)
    return WorldSource(World.generate(seed=seed, n_people=people),
                       data.get("world_qa_fraction", defaults.world_qa_fraction), origin)


def resolve_world(path: Path | None, qa_fraction: float | None = None) -> WorldSource:
    """The world to probe (see the module docstring for the forms of `path`)."""
    if path is None:
        return world_from_config({}, "default config")
    path = Path(path)
    if path.is_dir():
        path = path / "train_config.json"
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: no world here (want a run directory, train_config.json, a TOML config "
                                 "or a World.save JSON file)")
    if path.suffix == ".toml":
        from openk2.train.config import load_config

        return world_from_config(vars(load_config(path).data), str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise BenchmarkDataError(f"{path}: not valid JSON ({e})") from None
    if "people" in data:  # a World.save file
        return WorldSource(World.from_dict(data), 0.5 if qa_fraction is None else qa_fraction, str(path))
    if "data" in data:  # train_config.json
        return world_from_config(data["data"], str(path))
    raise BenchmarkDataError(f"{path}: neither a train config nor a World.save file")


def select_probes(world: World, *, qa_fraction: float, max_people: int | None = PROBE_PEOPLE,
                  seed: int = 0) -> list[Probe]:
    """Seed 0: the speedrun's probes (first `max_people` per split). Other seeds: a random `max_people` per split."""
    if seed == 0:
        return world_probes(world, max_people=max_people, qa_fraction=qa_fraction)
    probes = world_probes(world, qa_fraction=qa_fraction)
    rng = random.Random(seed)
    chosen: set[str] = set()
    for split in ("seen", "unseen"):
        people = sorted({p.person for p in probes if p.split == split})
        chosen.update(rng.sample(people, min(len(people), max_people or len(people))))
    return [p for p in probes if p.person in chosen]


def probe_sample(probe: Probe) -> Sample:
    return Sample(id=f"{probe.split}/{probe.kind}/{probe.person}/{probe.attribute}", messages=[],
                  prompt=probe.prompt, reference=probe.answer, category=probe.attribute,
                  metadata={"split": probe.split, "kind": probe.kind, "person": probe.person,
                            "question": probe.question})


def score_probe(sample: Sample, completion: Completion) -> Score:
    """1 if the completion's first line starts with the answer (`answer_matches`), else 0."""
    first_line = completion.text.strip().split("\n", 1)[0]
    return Score(float(answer_matches(completion.text, str(sample.reference))), extracted=first_line)


def probe_breakdown(samples: Sequence[Sample], values: Sequence[float]) -> dict[str, float]:
    """Accuracy per split/kind, per split, and per split/attribute (the speedrun report's keys)."""
    hits: dict[str, list[float]] = {}
    for s, v in zip(samples, values, strict=True):
        split, kind = s.metadata["split"], s.metadata["kind"]
        for key in (f"{split}/{kind}", split, f"{split}/{s.category}"):
            hits.setdefault(key, []).append(v)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


@dataclass
class WorldBenchmark(Benchmark):
    split: str = "seen"
    kinds: tuple[str, ...] = ("recall",)
    max_people: int = PROBE_PEOPLE

    def world(self) -> WorldSource:
        path = self.options.get("world") or self.options.get("run_dir")
        return resolve_world(Path(path) if path else None, self.options.get("world_qa_fraction"))

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        src = self.world()
        probes = select_probes(src.world, qa_fraction=src.qa_fraction, max_people=self.max_people, seed=seed)
        samples = [probe_sample(p) for p in probes if p.split == self.split and p.kind in self.kinds]
        return samples[:limit]

    def score(self, sample: Sample, completion: Completion) -> Score:
        return score_probe(sample, completion)


_COMMON: dict[str, Any] = dict(metric="avg@k", k2_score=None, temperature=0.0, max_tokens=12, k=1,
                               categories=True, seeded=True)
BENCHMARKS: list[Benchmark] = [
    WorldBenchmark(name="world-recall", data_source="generated (the run's world; --world, --seed)",
                   split="seen", kinds=("recall",), **_COMMON),
    WorldBenchmark(name="world-qa", data_source="generated (the run's world; --world, --seed)",
                   split="seen", kinds=("qa",), **_COMMON),
    WorldBenchmark(name="world-unseen", data_source="generated (the run's world; --world, --seed)",
                   split="unseen", kinds=("recall", "qa"), **_COMMON),
]
