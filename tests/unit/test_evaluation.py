"""pass@k against its closed form C(n-c, k) / C(n, k) with math.comb, and the set metrics."""

from __future__ import annotations

from math import comb

import pytest

from megatron_sapo.algo.evaluation import pass_at_k, sample_set_metrics


@pytest.mark.parametrize("n", [1, 2, 5, 8, 16])
def test_pass_at_k_is_the_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, n, n) == 1.0


def test_pass_at_1_is_the_fraction_correct_and_bad_counts_are_refused():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="0 <= c <= n and 1 <= k <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="0 <= c <= n and 1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_set_metrics_report_avg_and_pass_at_powers_of_two():
    scores = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]]
    metrics = sample_set_metrics("toy", scores)
    assert metrics["eval_toy_avg_at_4"] == pytest.approx(4 / 12)
    assert metrics["eval_toy_pass_at_1"] == pytest.approx((1 / 4 + 0 + 3 / 4) / 3)
    assert metrics["eval_toy_pass_at_2"] == pytest.approx((1 - comb(3, 2) / comb(4, 2) + 0 + 1) / 3)
    assert metrics["eval_toy_pass_at_4"] == pytest.approx(2 / 3)
    assert set(metrics) == {"eval_toy_avg_at_4", "eval_toy_problems", "eval_toy_pass_at_1", "eval_toy_pass_at_2",
                            "eval_toy_pass_at_4"}
