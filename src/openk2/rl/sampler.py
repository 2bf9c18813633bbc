"""Prompt sampling for RL: curriculum (easy -> hard) and prioritized sampling p_i ∝ (1 − s_i) (K1.5 §2.3.4).

    sampler = TaskSampler(pools={"digits": tasks}, weights={"digits": 1.0}, levels=..., cfg=cfg.sampler, seed=0)
    picks = sampler.sample(16)                        # [(family, task_index)]
    sampler.update(family, task_index, pass_rate)     # after the group is scored
    state = sampler.state_dict(); sampler.load_state_dict(state)   # checkpointed with the run

Each family's share of a batch follows `weights` (largest-remainder rounding, then random for the remainder).
Within a family, the curriculum admits tasks up to `max_level` (starting at `start_level`); a level is
unlocked once the admitted tasks' mean success estimate reaches `curriculum_threshold`. Among admitted tasks,
prioritized sampling draws without replacement with weight (1 − s_i) + floor, where s_i is an exponential moving
average of the task's group pass rate (unseen tasks count as 0.5), so tasks the policy already solves are drawn
rarely and failures are replayed. The sampler's state (success estimates, levels, RNG) is plain data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

UNSEEN_SUCCESS = 0.5


@dataclass
class SamplerState:
    success: dict[str, dict[int, float]] = field(default_factory=dict)   # family -> task index -> estimate
    max_level: dict[str, int] = field(default_factory=dict)


class TaskSampler:
    def __init__(self, levels: dict[str, list[int]], weights: dict[str, float], cfg: Any, seed: int = 0) -> None:
        """`levels[family][i]`: the difficulty level of task i of the family's pool; `cfg`: a SamplerSection."""
        self.levels, self.cfg = levels, cfg
        self.weights = {f: w for f, w in weights.items() if w > 0}
        self.rng = random.Random(f"rl-sampler/{seed}")
        top = {f: max(lv) if lv else 1 for f, lv in levels.items()}
        self.state = SamplerState(success={f: {} for f in levels},
                                  max_level={f: (min(cfg.start_level, top[f]) if cfg.curriculum else top[f])
                                             for f in levels})

    def _admitted(self, family: str) -> list[int]:
        cap = self.state.max_level[family]
        admitted = [i for i, lv in enumerate(self.levels[family]) if lv <= cap]
        return admitted or list(range(len(self.levels[family])))

    def _split(self, n: int) -> dict[str, int]:
        total = sum(self.weights.values())
        exact = {f: n * w / total for f, w in self.weights.items()}
        counts = {f: int(x) for f, x in exact.items()}
        rest = sorted(exact, key=lambda f: exact[f] - counts[f], reverse=True)
        for f in rest[: n - sum(counts.values())]:
            counts[f] += 1
        return counts

    def sample(self, n: int) -> list[tuple[str, int]]:
        picks: list[tuple[str, int]] = []
        for family, k in self._split(n).items():
            admitted = self._admitted(family)
            est = self.state.success[family]
            if self.cfg.prioritized:
                w = [(1.0 - est.get(i, UNSEEN_SUCCESS)) + self.cfg.priority_floor for i in admitted]
            else:
                w = [1.0] * len(admitted)
            chosen: list[int] = []
            pool, weights = list(admitted), list(w)
            for _ in range(min(k, len(pool))):  # weighted sampling without replacement
                j = self.rng.choices(range(len(pool)), weights)[0]
                chosen.append(pool.pop(j))
                weights.pop(j)
            while len(chosen) < k:  # a pool smaller than the batch: repeat tasks
                chosen.append(self.rng.choice(admitted))
            picks += [(family, i) for i in chosen]
        return picks

    def update(self, family: str, index: int, pass_rate: float) -> None:
        est = self.state.success[family]
        a = self.cfg.success_ema
        est[index] = a * pass_rate + (1 - a) * est.get(index, UNSEEN_SUCCESS)
        self._maybe_unlock(family)

    def _maybe_unlock(self, family: str) -> None:
        if not self.cfg.curriculum:
            return
        cap, top = self.state.max_level[family], max(self.levels[family], default=1)
        if cap >= top:
            return
        est = self.state.success[family]
        seen = [est[i] for i in self._admitted(family) if i in est]
        if len(seen) >= 8 and sum(seen) / len(seen) >= self.cfg.curriculum_threshold:
            self.state.max_level[family] = cap + 1

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for family, est in self.state.success.items():
            out[f"sampler/{family}/max_level"] = self.state.max_level[family]
            if est:
                out[f"sampler/{family}/mean_success"] = sum(est.values()) / len(est)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"success": {f: {str(i): s for i, s in est.items()} for f, est in self.state.success.items()},
                "max_level": dict(self.state.max_level), "rng": self.rng.getstate()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.state = SamplerState(success={f: {int(i): s for i, s in est.items()} for f, est in d["success"].items()},
                                  max_level=dict(d["max_level"]))
        state = d["rng"]
        self.rng.setstate((state[0], tuple(state[1]), state[2]) if isinstance(state, list) else state)


__all__ = ["TaskSampler"]
