"""avg@k, unbiased pass@k and pass^k against their closed forms; intervals and category breakdowns."""

import itertools
import math

import pytest

from openk2.eval.metrics import bootstrap_ci, item_value, mean_stderr, pass_at_k, pass_hat_k, summarize


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in (1, 5, 10) for c in range(n + 1) for k in (1, 2, n) if k <= n])
def test_pass_at_k_and_pass_hat_k_match_their_closed_forms(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert pass_hat_k(n, c, k) == pytest.approx(math.comb(c, k) / math.comb(n, k))


def test_pass_at_k_equals_the_subset_average_it_estimates():
    scores = [1, 0, 0, 1, 0, 0]  # n=6, c=2
    for k in (1, 2, 3):
        subsets = list(itertools.combinations(scores, k))
        assert pass_at_k(6, 2, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
        assert pass_hat_k(6, 2, k) == pytest.approx(sum(all(s) for s in subsets) / len(subsets))


def test_item_values_and_bad_arguments():
    assert item_value([1.0, 0.0, 0.5, 1.0], "avg@k", 4) == pytest.approx(0.625)
    assert item_value([1, 0, 1, 1], "pass@k", 1) == pytest.approx(0.75)
    assert item_value([1, 1, 1, 0], "pass^k", 4) == 0.0
    assert item_value([1, 1], "pass^k", 4) == 1.0  # fewer samples than k (infra errors): k shrinks to n
    with pytest.raises(ValueError, match="unknown metric"):
        item_value([1.0], "best@k", 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_stderr_bootstrap_and_categories():
    mean, se = mean_stderr([0.0, 1.0, 0.0, 1.0])
    assert mean == 0.5 and se == pytest.approx(math.sqrt((1 / 3) / 4))
    lo, hi = bootstrap_ci([0.0, 1.0] * 50, seed=1)
    assert lo < 0.5 < hi and hi - lo < 0.3
    s = summarize({"a": [1, 1], "b": [0, 1], "c": [0, 0]}, k=2, categories={"a": "x", "b": "x", "c": "y"})
    assert s["metrics"]["avg@k"]["value"] == pytest.approx(50.0)
    assert s["metrics"]["pass@k"]["value"] == pytest.approx(200 / 3)
    assert s["metrics"]["pass^k"]["value"] == pytest.approx(100 / 3)
    assert s["categories"]["x"]["avg@k"]["value"] == pytest.approx(75.0) and s["categories"]["y"]["items"] == 1
