"""K2's self-critique rubric reward (K2 §3.2.2, App. F; k2-recipe.md §7) for tasks without a verifier.

A critic (the policy itself behind an OpenAI-compatible endpoint, or any other model) compares the K responses
to one prompt **pairwise** against core rubrics, prescriptive (anti-reward-hacking) rubrics and the task's own
rubrics, and the pairwise verdicts become one scalar per response.

Choices K2 does not publish (rl-design §9, "not found in public sources"), each configurable:
- **Ranking → scalar**: `score="win_rate"` (default): (wins + ½·ties) / comparisons, in [0, 1], so a group's
  advantages are the differences in win rate; `score="bradley_terry"`: a Bradley–Terry fit (MM iterations, ties
  as half wins, one pseudo-comparison against an average player for stability) mapped to [0, 1] by
  strength/(strength + 1) with the geometric-mean strength at 1.
- **Position bias**: each pair is judged in both orders (`both_orders`) and the two verdicts averaged.
- **Pairs**: all K(K−1)/2 pairs up to `max_pairs`, else a seeded sample of `max_pairs`.
- **Unparseable verdicts** count as ties and are counted in the info (`unparsed`).
- **Closed loop** ("refined on verifiable tasks"): `calibrate()` asks the critic about pairs of responses whose
  verifiable rewards differ and records how often it prefers the verified-better one (`calibration_history`,
  optionally a JSON-lines log). `refresh()` follows the policy: a new endpoint/model, or a `push_weights`
  callable (e.g. a `WeightSync.send` of the policy into the critic's engine); when the critic *is* the policy's
  own rollout endpoint the weight sync of every RL step refreshes it already. The critic version is part of
  every request's seed, so a response cache never serves a stale critic's verdicts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openk2.rl.rewards.base import response_text
from openk2.rl.types import Trajectory

# Paraphrased from K2 App. F.1/F.2.
CORE_RUBRICS = (
    "Clarity and relevance: the response is concise, stays on topic and fully addresses the user's intent, "
    "without unnecessary detail.",
    "Conversational fluency and engagement: the response reads as natural, coherent dialogue and engages "
    "with the user appropriately.",
    "Objective and grounded interaction: the tone is objective and grounded; no meta-commentary about the "
    "response itself and no flattery.",
)
PRESCRIPTIVE_RUBRICS = (
    "No initial praise: the response does not open by complimenting the user or the question "
    "(e.g. \"Great question!\").",
    "No explicit justification: the response does not add sentences explaining why it is good or how it "
    "meets the request.",
)
CRITIC_SYSTEM = ("You are a strict critic. Compare two assistant responses to the same conversation against the "
                 "rubrics. Prescriptive rubrics are mandatory: a response that breaks one loses unless both do.")
CRITIC_TEMPLATE = ("Conversation:\n{prompt}\n\nCore rubrics:\n{core}\n\nPrescriptive rubrics:\n{prescriptive}\n"
                   "{task_rubrics}\nResponse A:\n{a}\n\nResponse B:\n{b}\n\nWhich response better satisfies the "
                   "rubrics? Reason briefly, then end with one line: \"Verdict: A\", \"Verdict: B\" or "
                   "\"Verdict: tie\".")
_VERDICT = re.compile(r"verdict\s*[:：]?\s*\**\s*(a|b|tie)\b", re.IGNORECASE)
SCORE_MODES = ("win_rate", "bradley_terry")


def parse_verdict(text: str | None) -> float | None:
    """1.0 (A wins), 0.0 (B wins), 0.5 (tie) or None (no verdict found)."""
    if not text:
        return None
    matches = _VERDICT.findall(text)
    word = matches[-1].lower() if matches else text.strip().strip(".*\"'").lower()
    return {"a": 1.0, "b": 0.0, "tie": 0.5}.get(word)


def bradley_terry(wins: list[list[float]], iterations: int = 200) -> list[float]:
    """Strengths from a matrix of (fractional) wins: wins[i][j] = how often i beat j. One pseudo-game against a
    strength-1 average player (half a win each way) keeps every strength finite."""
    n = len(wins)
    strength = [1.0] * n
    for _ in range(iterations):
        updated = []
        for i in range(n):
            won = sum(wins[i]) + 0.5
            denominator = 1.0 / (strength[i] + 1.0)  # the pseudo-game
            for j in range(n):
                games = wins[i][j] + wins[j][i]
                if j != i and games:
                    denominator += games / (strength[i] + strength[j])
            updated.append(won / denominator)
        geo = math.exp(sum(math.log(s) for s in updated) / n)
        strength = [s / geo for s in updated]
    return strength


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "big")


def _prompt_text(task: Any, trajectory: Trajectory) -> str:
    if isinstance(task, dict):
        if task.get("prompt"):
            return str(task["prompt"])
        if task.get("messages"):
            return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in task["messages"])
    return str(trajectory.metadata.get("prompt_text", "(not shown)"))


@dataclass
class RubricCritic:
    """A GroupReward. `client`: an `openk2.llm.LLMClient` (any OpenAI-compatible endpoint), or any object with
    the same async `chat(messages, **params)` (tests script one). `task["rubrics"]` adds task-specific rubrics."""

    client: Any
    model: str | None = None
    tokenizer: Any = None
    core_rubrics: Sequence[str] = CORE_RUBRICS
    prescriptive_rubrics: Sequence[str] = PRESCRIPTIVE_RUBRICS
    score: str = "win_rate"
    both_orders: bool = True
    max_pairs: int = 28           # all pairs of K = 8
    temperature: float = 0.0
    max_tokens: int = 256
    seed: int = 0
    critic_version: int = 0
    log_path: str | None = None   # calibration records (JSON lines)
    calibration_history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.score not in SCORE_MODES:
            raise ValueError(f"unknown critic score mode {self.score!r}; valid: {', '.join(SCORE_MODES)}")

    @classmethod
    def from_spec(cls, spec: str, model_name: str | None = None, **kwargs: Any) -> RubricCritic:
        """A critic behind any model spec `openk2 eval --model` accepts (`openai:URL` with `model_name`, a run or
        HF directory served in process, `replay:...`); close it with `aclose()`."""
        from openk2.eval.models import open_model

        handle = open_model(spec, model_name=model_name)
        return cls(handle.client, **kwargs)

    async def aclose(self) -> None:
        if hasattr(self.client, "aclose"):
            await self.client.aclose()

    # --- one comparison ---------------------------------------------------------------------------------------

    def messages(self, prompt: str, a: str, b: str, task_rubrics: Sequence[str] = ()) -> list[dict[str, str]]:
        numbered = lambda items: "\n".join(f"{i + 1}. {r}" for i, r in enumerate(items))  # noqa: E731
        extra = f"\nTask rubrics:\n{numbered(task_rubrics)}\n" if task_rubrics else ""
        user = CRITIC_TEMPLATE.format(prompt=prompt, core=numbered(self.core_rubrics),
                                      prescriptive=numbered(self.prescriptive_rubrics), task_rubrics=extra, a=a, b=b)
        return [{"role": "system", "content": CRITIC_SYSTEM}, {"role": "user", "content": user}]

    async def compare(self, prompt: str, a: str, b: str, task_rubrics: Sequence[str] = (),
                      seed: int = 0) -> tuple[float | None, str]:
        """(preference for A in [0, 1] or None if unparseable, the critic's raw reply)."""
        params: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens,
                                  "seed": _seed(self.seed, self.critic_version, seed)}
        if self.model is not None:
            params["model"] = self.model
        reply = await self.client.chat(self.messages(prompt, a, b, task_rubrics), **params)
        content = reply.content if hasattr(reply, "content") else str(reply)
        return parse_verdict(content), content or ""

    async def preference(self, prompt: str, a: str, b: str, task_rubrics: Sequence[str], seed: int
                         ) -> tuple[float, int]:
        """P(A ≻ B) averaged over the judged orders, and how many verdicts were unparseable (scored as ties)."""
        orders = [(a, b, False), (b, a, True)] if self.both_orders else [(a, b, False)]
        results = await asyncio.gather(*(self.compare(prompt, x, y, task_rubrics, _seed(seed, swapped))
                                         for x, y, swapped in orders))
        prefs, unparsed = [], 0
        for (verdict, _), (_, _, swapped) in zip(results, orders, strict=True):
            if verdict is None:
                unparsed += 1
                verdict = 0.5
            prefs.append(1.0 - verdict if swapped else verdict)
        return sum(prefs) / len(prefs), unparsed

    # --- a group ------------------------------------------------------------------------------------------------

    def pairs(self, k: int, group_key: str) -> list[tuple[int, int]]:
        every = [(i, j) for i in range(k) for j in range(i + 1, k)]
        if len(every) <= self.max_pairs:
            return every
        return sorted(random.Random(_seed(self.seed, group_key)).sample(every, self.max_pairs))

    async def score_group(self, trajectories: Sequence[Trajectory], task: Any) -> list[dict[str, Any]]:
        k = len(trajectories)
        if k < 2:
            return [{"score": 0.5, "comparisons": 0} for _ in trajectories]
        texts = [response_text(t, self.tokenizer) for t in trajectories]
        prompt = _prompt_text(task, trajectories[0])
        task_rubrics = list(task.get("rubrics", ())) if isinstance(task, dict) else []
        group_key = trajectories[0].group_id
        pairs = self.pairs(k, group_key)
        results = await asyncio.gather(*(self.preference(prompt, texts[i], texts[j], task_rubrics,
                                                         _seed(group_key, i, j)) for i, j in pairs))
        wins = [[0.0] * k for _ in range(k)]
        games, unparsed = [0] * k, 0
        for (i, j), (p, bad) in zip(pairs, results, strict=True):
            wins[i][j] += p
            wins[j][i] += 1.0 - p
            games[i] += 1
            games[j] += 1
            unparsed += bad
        if self.score == "win_rate":
            scores = [sum(wins[i]) / games[i] if games[i] else 0.5 for i in range(k)]
        else:
            scores = [s / (s + 1.0) for s in bradley_terry(wins)]
        return [{"score": scores[i], "comparisons": games[i], "unparsed": unparsed,
                 "critic_version": self.critic_version} for i in range(k)]

    # --- the closed loop --------------------------------------------------------------------------------------

    async def calibrate(self, groups: Sequence[tuple[Sequence[Trajectory], Any]], max_pairs: int = 64
                        ) -> dict[str, Any]:
        """Agreement of the critic with verifiable rewards: over pairs of one group's responses whose
        `reward` differs, the mean preference for the verified-better response (1 = always agrees, 0.5 =
        chance). Recorded in `calibration_history` (and `log_path`)."""
        jobs = []
        for trajectories, task in groups:
            prompt = _prompt_text(task, trajectories[0])
            for i, j in self.pairs(len(trajectories), "calibration:" + trajectories[0].group_id):
                ri, rj = trajectories[i].reward, trajectories[j].reward
                if ri is None or rj is None or ri == rj:
                    continue
                better, worse = (i, j) if ri > rj else (j, i)
                jobs.append((prompt, response_text(trajectories[better], self.tokenizer),
                             response_text(trajectories[worse], self.tokenizer), trajectories[0].group_id, i, j))
        jobs = jobs[:max_pairs]
        results = await asyncio.gather(*(self.preference(p, a, b, [], _seed("calibration", g, i, j))
                                         for p, a, b, g, i, j in jobs))
        record = {"critic_version": self.critic_version, "pairs": len(jobs),
                  "agreement": sum(p for p, _ in results) / len(results) if results else None,
                  "unparsed": sum(bad for _, bad in results)}
        self.calibration_history.append(record)
        if self.log_path:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record

    async def refresh(self, version: int, client: Any = None, model: str | None = None,
                      push_weights: Callable[[], Awaitable[None] | None] | None = None) -> None:
        """Follow the policy to `version`: switch endpoint/model and/or push the policy's weights into the
        critic's engine. Later requests carry the new version in their seed (no stale cached verdicts)."""
        if push_weights is not None:
            result = push_weights()
            if asyncio.iscoroutine(result):
                await result
        if client is not None:
            self.client = client
        if model is not None:
            self.model = model
        self.critic_version = version


__all__ = ["CORE_RUBRICS", "CRITIC_SYSTEM", "PRESCRIPTIVE_RUBRICS", "RubricCritic", "SCORE_MODES",
           "bradley_terry", "parse_verdict"]
