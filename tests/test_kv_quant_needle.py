"""The needle benchmark's accuracy interval (benchmarks/kv_quant_needle.py): exact Clopper-Pearson bounds."""

from math import comb

import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def needle_script():
    return load_benchmark("kv_quant_needle")


def tail(k: int, n: int, p: float, upper: bool) -> float:
    """P(X >= k) (upper) or P(X <= k) for X ~ Binomial(n, p), summed term by term."""
    ks = range(k, n + 1) if upper else range(k + 1)
    return sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in ks)


def answers(k: int, n: int) -> list[dict]:
    return [{"correct": i < k} for i in range(n)]


def test_all_wrong_and_all_right_have_the_closed_form_bounds(needle_script):
    none, every = needle_script.correct_ci(answers(0, 6)), needle_script.correct_ci(answers(6, 6))
    assert (none["correct"], none["trials_total"], none["ci_low"]) == (0, 6, 0.0)
    assert none["ci_high"] == pytest.approx(1 - 0.025 ** (1 / 6), abs=1e-9)
    assert every["ci_low"] == pytest.approx(0.025 ** (1 / 6), abs=1e-9) and every["ci_high"] == 1.0


@pytest.mark.parametrize("k,n", [(1, 6), (3, 6), (7, 9), (17, 18)])
def test_bounds_put_two_and_a_half_percent_in_each_tail(needle_script, k, n):
    r = needle_script.correct_ci(answers(k, n))
    assert r["correct"] == k and r["trials_total"] == n
    assert r["ci_low"] < k / n < r["ci_high"]
    assert tail(k, n, r["ci_low"], upper=True) == pytest.approx(0.025, abs=1e-6)
    assert tail(k, n, r["ci_high"], upper=False) == pytest.approx(0.025, abs=1e-6)
