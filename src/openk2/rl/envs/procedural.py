"""`digits`: a procedural verifiable task family with short answers, the RL demo's workhorse (rl-design §7).

    tasks = digit_tasks("train", n=2000, seed=0)         # deterministic under (split, seed)
    env = DigitsEnv(); obs = await env.reset(tasks[0]); result = await env.step("1 2 5 9")

Kinds (`DIGIT_KINDS`), each with difficulty levels for the curriculum:
- `reverse`: "Reverse: 5 2 9 1" -> "1 9 2 5"           (level = number of digits - 2)
- `sort`:    "Sort: 5 2 9 1" -> "1 2 5 9"              (level = number of digits - 2)
- `add`:     "Add: 4 7 + 3 5" -> "8 2"                 (level = digits of the larger operand)

Digits are written space-separated, so every digit is one token with the world tokenizer (which merges some
digit pairs) and an answer is at most ~10 tokens. Splits are disjoint by construction: a problem belongs to
"heldout" iff a hash of its canonical text is 0 mod 5, so no held-out problem is ever trained on (SFT or RL).
The reward is exact match of the answer's digits (whitespace-insensitive), 1.0 or 0.0.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Self

from openk2.rl.types import Observation, StepResult

DIGIT_KINDS: tuple[str, ...] = ("reverse", "sort", "add")
SPLITS: tuple[str, ...] = ("train", "heldout")
#: The system message of every digits prompt: short, so a prompt is ~40 tokens.
SYSTEM_PROMPT = "Answer with the digits only."
MAX_LEVEL = 3


class ChatQuestionTask:
    """A single-turn task: its system prompt + `question` as chat messages, and dict round-trips."""

    system_prompt: ClassVar[str]
    question: str

    def messages(self) -> list[dict[str, Any]]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": self.question}]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        return cls(**d)


@dataclass
class DigitTask(ChatQuestionTask):
    id: str
    kind: str
    level: int
    question: str
    answer: str
    split: str
    metadata: dict[str, Any] = field(default_factory=dict)

    system_prompt: ClassVar[str] = SYSTEM_PROMPT

    @property
    def task_type(self) -> str:
        return f"digits/{self.kind}"


def _spaced(digits: list[int] | str) -> str:
    return " ".join(str(d) for d in digits)


def _split_of(question: str) -> str:
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:4], "big")
    return "heldout" if h % 5 == 0 else "train"


def _draw(rng: random.Random, kind: str, level: int) -> tuple[str, str]:
    if kind in ("reverse", "sort"):
        digits = [rng.randrange(10) for _ in range(level + 2)]
        answer = digits[::-1] if kind == "reverse" else sorted(digits)
        return f"{kind.capitalize()}: {_spaced(digits)}", _spaced(answer)
    if kind == "add":
        hi = 10 ** level
        a, b = rng.randrange(hi), rng.randrange(hi)
        return f"Add: {_spaced(str(a))} + {_spaced(str(b))}", _spaced(str(a + b))
    raise ValueError(f"unknown digits kind {kind!r}; kinds: {', '.join(DIGIT_KINDS)}")


def digit_tasks(split: str, n: int, seed: int = 0, kinds: tuple[str, ...] | list[str] = DIGIT_KINDS,
                levels: tuple[int, ...] | list[int] = (1, 2)) -> list[DigitTask]:
    """`n` distinct tasks of `split`, kinds and levels drawn uniformly with `random.Random(f"digits/{seed}/{split}")`.
    Raises ValueError for an unknown split/kind/level or when the space has fewer than `n` distinct problems."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    bad = [k for k in kinds if k not in DIGIT_KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown digits kinds {bad}; kinds: {', '.join(DIGIT_KINDS)}")
    if not levels or any(not 1 <= lv <= MAX_LEVEL for lv in levels):
        raise ValueError(f"digits levels must be in 1..{MAX_LEVEL}, got {list(levels)}")
    rng = random.Random(f"digits/{seed}/{split}")
    seen: set[str] = set()
    tasks: list[DigitTask] = []
    attempts = 0
    while len(tasks) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"only {len(tasks)} distinct {split} digits tasks exist for kinds {list(kinds)} and "
                             f"levels {list(levels)}; ask for fewer or allow more levels")
        kind, level = rng.choice(list(kinds)), rng.choice(list(levels))
        question, answer = _draw(rng, kind, level)
        if question in seen or _split_of(question) != split:
            continue
        seen.add(question)
        tasks.append(DigitTask(f"digits-{split}-{seed}-{len(tasks)}", kind, level, question, answer, split))
    return tasks


_NON_DIGIT = re.compile(r"[^0-9]")


def digits_reward(task: DigitTask, text: str, partial: bool = False) -> float:
    """1.0 iff the answer's digits (everything else ignored) equal the expected ones, else 0.0; with `partial`,
    a wrong answer earns the fraction of positions it got right, over the longer of the two digit strings,
    times 0.5 (a dense reward for small models, as digit-level rewards in small arithmetic RL demos)."""
    got, want = _NON_DIGIT.sub("", text), _NON_DIGIT.sub("", task.answer)
    if got == want and text.strip():
        return 1.0
    if not partial or not got:
        return 0.0
    return 0.5 * sum(a == b for a, b in zip(got, want, strict=False)) / max(len(got), len(want))


def sft_records(n: int, seed: int = 0, kinds: tuple[str, ...] | list[str] = DIGIT_KINDS,
                levels: tuple[int, ...] | list[int] = (1, 2), label_noise: float = 0.0) -> list[dict[str, Any]]:
    """Chat SFT records of `n` train tasks (a warm start before RL). `label_noise` replaces that fraction of the
    answers with a wrong answer of the same length (a weak, partly wrong teacher: RL then has room to improve)."""
    rng = random.Random(f"digits-sft/{seed}")
    records = []
    for task in digit_tasks("train", n, seed=seed + 10_000, kinds=kinds, levels=levels):
        answer = task.answer
        if label_noise > 0 and rng.random() < label_noise:
            answer = _spaced([rng.randrange(10) for _ in answer.split()])
        records.append({"messages": [*task.messages(), {"role": "assistant", "content": answer}],
                        "metadata": {"source": "digits", "kind": task.kind, "level": task.level}})
    return records


class DigitsEnv:
    """Single-turn: `reset` shows the question, the first `step` is the answer and ends the episode. `partial`:
    partial credit for wrong answers (`digits_reward`); `info["correct"]` is exact match either way."""

    def __init__(self, partial: bool = False) -> None:
        self.task: DigitTask | None = None
        self.task_type = "digits"
        self.partial = partial

    async def reset(self, task: DigitTask, seed: int | None = None) -> Observation:
        self.task = task
        self.task_type = task.task_type
        return Observation(messages=task.messages(), info={"task_id": task.id})

    async def step(self, action_text: str) -> StepResult:
        if self.task is None:
            raise RuntimeError("call reset(task) before step()")
        reward = digits_reward(self.task, action_text, self.partial)
        return StepResult(None, reward, terminated=True, truncated=False,
                          info={"correct": reward == 1.0, "expected": self.task.answer})

    async def close(self) -> None:
        self.task = None


__all__ = ["DIGIT_KINDS", "DigitTask", "DigitsEnv", "digit_tasks", "digits_reward", "sft_records"]
