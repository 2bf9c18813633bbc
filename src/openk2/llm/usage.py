"""Token usage and cost accounting for one pipeline run, per model.

Cached responses (and requests answered by an identical one in flight) are counted separately and cost
nothing: `cost_usd` is what the run actually spent, `cached_cost_usd` what the cache saved.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: Mapping[str, Any] | None) -> Usage:
        if not usage:
            return cls()
        return cls(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Price:
        """'INPUT,OUTPUT' (USD per million tokens, the CLIs' --price) -> Price; ValueError says what is wanted."""
        try:
            price_in, price_out = (float(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"--price wants INPUT,OUTPUT in USD per million tokens, got {text!r}") from None
        return cls(price_in, price_out)

    def cost(self, usage: Usage) -> float:
        return (usage.prompt_tokens * self.input_per_mtok + usage.completion_tokens * self.output_per_mtok) / 1e6


@dataclass
class ModelUsage:
    requests: int = 0
    cached_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    cost_usd: float = 0.0
    cached_cost_usd: float = 0.0
    latency_s: float = 0.0  # summed over non-cached requests

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageTracker:
    """Thread-safe counters per model; `prices` maps a model name to its `Price` (missing: free)."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self.prices = dict(prices or {})
        self._by_model: dict[str, ModelUsage] = {}
        self._lock = threading.Lock()

    def record(self, model: str, usage: Usage, *, cached: bool, latency_s: float | None = None) -> None:
        cost = self.prices.get(model, Price()).cost(usage)
        with self._lock:
            m = self._by_model.setdefault(model, ModelUsage())
            if cached:
                m.cached_requests += 1
                m.cached_prompt_tokens += usage.prompt_tokens
                m.cached_completion_tokens += usage.completion_tokens
                m.cached_cost_usd += cost
            else:
                m.requests += 1
                m.prompt_tokens += usage.prompt_tokens
                m.completion_tokens += usage.completion_tokens
                m.cost_usd += cost
                m.latency_s += latency_s or 0.0

    def model(self, name: str) -> ModelUsage:
        with self._lock:
            return ModelUsage(**asdict(self._by_model.get(name, ModelUsage())))

    def summary(self) -> dict[str, Any]:
        """{"models": {name: counters}, "total": counters summed over models}."""
        with self._lock:
            models = {name: asdict(m) for name, m in sorted(self._by_model.items())}
        total = {k: 0 for k in asdict(ModelUsage())}
        for m in models.values():
            for k, v in m.items():
                total[k] += v
        for d in (*models.values(), total):
            d["total_tokens"] = d["prompt_tokens"] + d["completion_tokens"]
        return {"models": models, "total": total}

    def save(self, path: str | os.PathLike) -> None:
        """Write `summary()` as JSON, atomically (e.g. into the pipeline's run directory)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.summary(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
