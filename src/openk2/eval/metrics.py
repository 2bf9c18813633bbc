"""Estimators every benchmark shares: avg@k, unbiased pass@k, pass^k, with standard errors and bootstrap intervals.

Per item we hold n scored samples with c successes (a score counts as a success when it is >= 0.5, so partial
credit still averages into avg@k):

- avg@k: the mean score over all samples of all items (K2's "Avg@k").
- pass@k = 1 - C(n-c, k) / C(n, k) per item, averaged: the unbiased estimator of "at least one of k samples
  passes" (Chen et al. 2021, arXiv 2107.03374, eq. 1).
- pass^k = C(c, k) / C(n, k) per item, averaged: "all k samples pass" (tau-bench, arXiv 2406.12045).

Uncertainty is over items (the samples of one item are not independent): the standard error of the per-item
mean and a percentile bootstrap interval that resamples items.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

SUCCESS = 0.5  # a score at or above this counts as a pass for pass@k and pass^k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one item with n samples, c of them correct (numerically stable product form)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i)  ==  1 - C(n-c, k) / C(n, k)
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_hat_k(n: int, c: int, k: int) -> float:
    """pass^k for one item: the chance that k samples drawn without replacement all pass, C(c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass^k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return math.comb(c, k) / math.comb(n, k)


def item_value(scores: Sequence[float], metric: str, k: int) -> float:
    """One item's value under `metric` ("avg@k", "pass@k" or "pass^k") from its sample scores."""
    if not scores:
        raise ValueError("an item with no scored samples")
    if metric == "avg@k":
        return sum(scores) / len(scores)
    n, c = len(scores), sum(s >= SUCCESS for s in scores)
    k = min(k, n)  # an item that lost samples to infrastructure errors is estimated from what it has
    if metric == "pass@k":
        return pass_at_k(n, c, k)
    if metric == "pass^k":
        return pass_hat_k(n, c, k)
    raise ValueError(f"unknown metric {metric!r}; valid: avg@k, pass@k, pass^k")


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); the error is 0 for fewer than two values."""
    if not values:
        return float("nan"), float("nan")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def bootstrap_ci(values: Sequence[float], *, resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of `values` (resampling items with replacement)."""
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * (resamples - 1))]
    hi = means[int((1 + level) / 2 * (resamples - 1))]
    return lo, hi


def summarize(item_scores: Mapping[str, Sequence[float]], *, k: int,
              categories: Mapping[str, str | None] | None = None, seed: int = 0) -> dict[str, Any]:
    """Every metric (0-100) with its standard error and 95% bootstrap interval over items, plus per-category
    breakdowns of every metric when `categories` maps item ids to a category."""
    items = {i: list(s) for i, s in item_scores.items() if s}
    out: dict[str, Any] = {"items": len(items), "samples": sum(len(s) for s in items.values()), "k": k,
                           "metrics": {}}
    for metric in ("avg@k", "pass@k", "pass^k"):
        values = [item_value(s, metric, k) for s in items.values()]
        mean, se = mean_stderr(values)
        lo, hi = bootstrap_ci(values, seed=seed)
        out["metrics"][metric] = {"value": 100 * mean, "stderr": 100 * se, "ci95": [100 * lo, 100 * hi]}
    if categories:
        by_cat: dict[str, list[str]] = {}
        for i in items:
            cat = categories.get(i)
            if cat is not None:
                by_cat.setdefault(cat, []).append(i)
        out["categories"] = {}
        for cat, ids in sorted(by_cat.items()):
            row: dict[str, Any] = {"items": len(ids)}
            for metric in ("avg@k", "pass@k", "pass^k"):
                mean, se = mean_stderr([item_value(items[i], metric, k) for i in ids])
                row[metric] = {"value": 100 * mean, "stderr": 100 * se}
            out["categories"][cat] = row
    return out


def group_overalls(benchmarks: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Task-weighted overall rows for benchmark groups (tau2's domains): for each `group` with at least two
    scored members in `benchmarks` (results.json entries), the members' headline scores weighted by their item
    counts, its standard error from the members' (independent item sets), and K2's number at the same weights
    (with all of τ²-bench's tasks that is K2's published overall, 66.1)."""
    members: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for name, b in benchmarks.items():
        if b.get("group") and b.get("score") is not None and b["summary"]["items"]:
            members.setdefault(b["group"], []).append((name, b))
    out: dict[str, dict[str, Any]] = {}
    for group, entries in members.items():
        if len(entries) < 2:
            continue
        n_items = sum(b["summary"]["items"] for _, b in entries)
        weights = [b["summary"]["items"] / n_items for _, b in entries]
        score = sum(w * b["score"] for w, (_, b) in zip(weights, entries, strict=True))
        stderr = math.sqrt(sum((w * (b["summary"]["metrics"][b["metric"]]["stderr"] or 0.0)) ** 2
                               for w, (_, b) in zip(weights, entries, strict=True)))
        k2 = None
        if all(b.get("k2_score") is not None for _, b in entries):
            k2 = sum(w * b["k2_score"] for w, (_, b) in zip(weights, entries, strict=True))
        scored = sum(b["scored"] for _, b in entries)
        truncated = sum((b["truncation_rate"] or 0.0) * b["scored"] for _, b in entries)
        out[group] = {"score": score, "stderr": stderr, "ci95": [score - 1.96 * stderr, score + 1.96 * stderr],
                      "k2_score": k2, "metric": entries[0][1]["metric"], "members": [name for name, _ in entries],
                      "k": entries[0][1]["settings"]["k"],
                      "items": n_items, "scored": scored, "infra_errors": sum(b["infra_errors"] for _, b in entries),
                      "truncation_rate": truncated / scored if scored else None}
    return out
