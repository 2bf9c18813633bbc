"""RL task families behind one `Env` protocol (`openk2.rl.types.Env`), each with a deterministic train pool and
a disjoint held-out set:

    family = make_family("digits", cfg.tasks, chat_format)
    family.train_tasks(n, seed) / family.heldout_tasks(n, seed)   # lists of tasks
    env = family.make_env(); obs = await env.reset(task)          # one env per episode
    family.task_id(task), family.level(task), family.task_type(task)

- `digits` (procedural, `procedural.py`): reverse / sort / add with short answers; levels for the curriculum.
- `facts` (`facts.py`): chat questions about the pretraining world's people (no tools); held-out people are those
  whose Q/A documents were never in pretraining.
- `facts_paraphrase` (`facts.py`): the same questions in other words (no document or SFT record uses them).
- `facts_linked` (`facts.py`): the same people asked about facts linked to them (birth region, university city,
  employer city, industry) that the biographies state but no Q/A document, SFT record or probe asks.
- `world` (`world.py`): the world tool domain, multi-turn with real tools; held-out people for evaluation; train
  tasks about the world's training people and, with `tasks.world_registry_worlds`, about other worlds' people.
- `bench:<name>`: an evaluation-harness benchmark's samples + scorer as single-turn tasks (`bench.py`); only
  generated (`seeded`) benchmarks may be trained on, so no evaluation set leaks into training.
- `tau2:<domain>`: τ²-bench's train split through its gym env (`tau2.py`); needs `tasks.tau2_user_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from openk2.data.chat_format import ChatFormat
from openk2.rl.types import Env

FAMILIES = ("digits", "facts", "facts_paraphrase", "facts_linked", "world", "bench:<name>", "tau2:<domain>")


class TaskFamily(Protocol):
    name: str

    def train_tasks(self, n: int, seed: int) -> list[Any]: ...

    def heldout_tasks(self, n: int, seed: int) -> list[Any]: ...

    def make_env(self) -> Env: ...

    def task_id(self, task: Any) -> str: ...

    def level(self, task: Any) -> int: ...

    def task_type(self, task: Any) -> str: ...


def check_family(name: str) -> None:
    """ValueError unless `name` names a family (`FAMILIES`)."""
    kind, _, arg = name.partition(":")
    if name in ("digits", "facts", "facts_paraphrase", "facts_linked", "world") or (kind in ("bench", "tau2") and arg):
        return
    raise ValueError(f"unknown task family {name!r}; families: {', '.join(FAMILIES)}")


@dataclass
class DigitsFamily:
    kinds: tuple[str, ...]
    levels: tuple[int, ...]
    partial_credit: bool = False
    name: str = "digits"

    def train_tasks(self, n: int, seed: int) -> list[Any]:
        from openk2.rl.envs.procedural import digit_tasks

        return digit_tasks("train", n, seed=seed, kinds=self.kinds, levels=self.levels)

    def heldout_tasks(self, n: int, seed: int) -> list[Any]:
        from openk2.rl.envs.procedural import digit_tasks

        return digit_tasks("heldout", n, seed=seed, kinds=self.kinds, levels=self.levels)

    def make_env(self) -> Env:
        from openk2.rl.envs.procedural import DigitsEnv

        return DigitsEnv(partial=self.partial_credit)

    def task_id(self, task: Any) -> str:
        return task.id

    def level(self, task: Any) -> int:
        return task.level

    def task_type(self, task: Any) -> str:
        return task.task_type


@dataclass
class FactsFamily:
    world_seed: int
    world_people: int
    qa_fraction: float
    attributes: tuple[str, ...]
    partial_credit: bool = False
    train_people: str = "qa"
    name: str = "facts"

    def _world(self) -> Any:
        from openk2.eval.benchmarks.world_agent import _world

        return _world(self.world_seed, self.world_people)

    def train_tasks(self, n: int, seed: int) -> list[Any]:
        from openk2.rl.envs.facts import fact_tasks

        return fact_tasks(self._world(), self.qa_fraction, "train", n, seed=seed, attributes=self.attributes,
                          train_people=self.train_people, family=self.name)

    def heldout_tasks(self, n: int, seed: int) -> list[Any]:
        from openk2.rl.envs.facts import fact_tasks

        return fact_tasks(self._world(), self.qa_fraction, "heldout", n, seed=seed, attributes=self.attributes,
                          train_people=self.train_people, family=self.name)

    def make_env(self) -> Env:
        from openk2.rl.envs.facts import FactsEnv

        return FactsEnv(self._world(), self.partial_credit)

    def task_id(self, task: Any) -> str:
        return task.id

    def level(self, task: Any) -> int:
        return 1

    def task_type(self, task: Any) -> str:
        return task.task_type


@dataclass
class WorldFamily:
    world_seed: int
    world_people: int
    max_turns: int
    chat_format: ChatFormat | None
    registry_worlds: int = 0
    partial_credit: bool = False
    kinds: dict[str, float] | None = None
    name: str = "world"

    def _world(self) -> Any:
        from openk2.eval.benchmarks.world_agent import _world

        return _world(self.world_seed, self.world_people)

    def train_tasks(self, n: int, seed: int) -> list[Any]:
        from openk2.rl.envs.world import world_train_tasks

        return world_train_tasks(self._world(), n, seed=seed, registry_worlds=self.registry_worlds, kinds=self.kinds)

    def heldout_tasks(self, n: int, seed: int) -> list[Any]:
        from openk2.agentic.world_tasks import make_tasks

        return make_tasks(self._world(), "heldout", n, seed=seed)

    def make_env(self) -> Env:
        from openk2.rl.envs.world import WorldToolEnv

        return WorldToolEnv(self._world(), self.chat_format.tool_parser if self.chat_format else None,
                            max_turns=self.max_turns, partial_credit=self.partial_credit)

    def task_id(self, task: Any) -> str:
        return task.id

    def level(self, task: Any) -> int:
        from openk2.agentic.world_tasks import KINDS

        return 1 + KINDS.index(task.kind) // 2  # lookup/count: 1, company_city/update: 2, refuse: 3

    def task_type(self, task: Any) -> str:
        return f"world/{task.kind}"


@dataclass
class BenchFamily:
    bench_name: str
    data_dir: str
    name: str = "bench"

    def __post_init__(self) -> None:
        from openk2.eval.registry import get_benchmark

        self.bench = get_benchmark(self.bench_name)
        self.name = f"bench:{self.bench_name}"

    def train_tasks(self, n: int, seed: int) -> list[Any]:
        if not self.bench.seeded:
            raise ValueError(f"{self.name} is an evaluation set (not procedurally generated): RL must not train on "
                             "it; use it in eval.families only, or a generated benchmark")
        return self.bench.load(Path(self.data_dir), limit=n, seed=seed + 1_000_003)

    def heldout_tasks(self, n: int, seed: int) -> list[Any]:
        return self.bench.load(Path(self.data_dir), limit=n, seed=seed)

    def make_env(self) -> Env:
        from openk2.rl.envs.bench import BenchmarkEnv

        return BenchmarkEnv(self.bench)

    def task_id(self, task: Any) -> str:
        return task.id

    def level(self, task: Any) -> int:
        return 1

    def task_type(self, task: Any) -> str:
        return self.name


@dataclass
class Tau2Family:
    domain: str
    user_model: str
    chat_format: ChatFormat | None
    name: str = "tau2"

    def __post_init__(self) -> None:
        self.name = f"tau2:{self.domain}"

    def _user(self) -> Any:
        if not self.user_model:
            raise ValueError(f"{self.name} needs a user simulator: set tasks.tau2_user_model to an OpenAI-compatible "
                             "endpoint URL#model (e.g. http://127.0.0.1:8000/v1#nano of an `openk2 serve`)")
        from openk2.llm import LLMClient, OpenAIHTTPBackend

        url, _, model = self.user_model.partition("#")
        client = LLMClient(OpenAIHTTPBackend(url), model=model or "default")

        async def user(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> dict[str, Any]:
            return (await client.chat(messages, tools=tools, temperature=0.0)).message

        return user

    def train_tasks(self, n: int, seed: int) -> list[Any]:
        from openk2.eval.tau2.tasks import load_tasks

        ids = [t.id for t in load_tasks(self.domain, None, split="train")]
        return ids[:n]

    def heldout_tasks(self, n: int, seed: int) -> list[Any]:
        raise ValueError(f"{self.name}: evaluate τ²-bench with `openk2 eval --bench tau2-{self.domain}`, not inside "
                         "the RL run (its test split must not be seen during training)")

    def make_env(self) -> Env:
        from openk2.rl.envs.tau2 import Tau2ToolEnv

        return Tau2ToolEnv(self.domain, user=self._user(), tool_parser=self.chat_format.tool_parser
                           if self.chat_format else None)

    def task_id(self, task: Any) -> str:
        return str(task)

    def level(self, task: Any) -> int:
        return 1

    def task_type(self, task: Any) -> str:
        return self.name


def make_family(name: str, tasks_cfg: Any, chat_format: ChatFormat | None) -> TaskFamily:
    """The family `name` configured by the RL config's [tasks] section."""
    check_family(name)
    kind, _, arg = name.partition(":")
    if name == "digits":
        return DigitsFamily(tuple(tasks_cfg.digits_kinds), tuple(tasks_cfg.digits_levels),
                            tasks_cfg.digits_partial_credit)
    if name in ("facts", "facts_paraphrase", "facts_linked"):
        from openk2.rl.envs.facts import LINKED_ATTRIBUTES

        attributes = LINKED_ATTRIBUTES if name == "facts_linked" else tuple(tasks_cfg.facts_attributes)
        return FactsFamily(tasks_cfg.world_seed, tasks_cfg.world_people, tasks_cfg.world_qa_fraction, attributes,
                           tasks_cfg.facts_partial_credit, tasks_cfg.facts_train_people, name=name)
    if name == "world":
        return WorldFamily(tasks_cfg.world_seed, tasks_cfg.world_people, tasks_cfg.world_max_turns, chat_format,
                           tasks_cfg.world_registry_worlds, tasks_cfg.world_partial_credit,
                           dict(tasks_cfg.world_kinds))
    if kind == "bench":
        return BenchFamily(arg, tasks_cfg.bench_data_dir)
    return Tau2Family(arg, tasks_cfg.tau2_user_model, chat_format)


__all__ = ["FAMILIES", "BenchFamily", "DigitsFamily", "FactsFamily", "TaskFamily", "Tau2Family", "WorldFamily",
           "check_family", "make_family"]
