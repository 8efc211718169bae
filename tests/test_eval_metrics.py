"""avg@k, pass@k and bootstrap intervals against independent references."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation.metrics import (
    avg_at_k,
    bootstrap_mean,
    pass_at_k,
    pass_ks,
    summarize,
)


def comb_pass_at_k(n: int, c: int, k: int) -> float:
    """The textbook form 1 - C(n-c, k) / C(n, k), exact in integers."""
    return 1 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_matches_the_binomial_formula_on_every_small_case():
    cases = [(n, c, k) for n in range(1, 41) for c in range(n + 1) for k in range(1, n + 1)]
    assert len(cases) > 10_000
    for n, c, k in cases:
        assert pass_at_k(n, c, k) == pytest.approx(comb_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_the_binomials_overflow_floats():
    n, c, k = 2000, 3, 500  # C(2000, 500) ~ 1e486: as floats the ratio would be inf/inf
    with pytest.raises(OverflowError):
        float(math.comb(n, k))
    exact = comb_pass_at_k(n, c, k)  # Python's big-int division is exact-then-rounded
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-10)


def test_pass_at_k_by_enumerating_subsets():
    """pass@k is the share of k-subsets of the samples that hold a correct one."""
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 9)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))


def test_pass_at_1_is_avg_at_k_and_pass_at_n_is_any_correct():
    for n in range(1, 30):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(avg_at_k(n, c))
            assert pass_at_k(n, c, n) == (1.0 if c else 0.0)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(PipelineError):
        pass_at_k(n, c, k)


def test_reported_pass_ks():
    assert pass_ks(1) == [1]
    assert pass_ks(8) == [1, 2, 4, 8]
    assert pass_ks(12) == [1, 2, 4, 8, 12]


def test_bootstrap_is_seeded_and_matches_a_direct_resampling():
    rng = np.random.default_rng(5)
    v = rng.random(57)
    a, b = bootstrap_mean(v, 500, seed=3), bootstrap_mean(v, 500, seed=3)
    assert a == b
    assert bootstrap_mean(v, 500, seed=4) != a
    # independent reference: resample with the same generator stream, one row at a time
    ref_rng = np.random.default_rng(3)
    means = [v[ref_rng.integers(0, v.size, size=v.size)].mean() for _ in range(500)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert (a.low, a.high) == pytest.approx((lo, hi), abs=1e-12)
    assert a.value == pytest.approx(v.mean())


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_problems():
    rng = np.random.default_rng(0)
    widths = {}
    for n in (25, 400):
        ws = []
        for rep in range(10):
            v = (rng.random(n) < 0.4).astype(float)
            e = bootstrap_mean(v, 1000, seed=rep)
            assert e.low <= e.value <= e.high
            ws.append(e.high - e.low)
        widths[n] = float(np.mean(ws))
    # ~1/sqrt(n): 16x the problems -> about a quarter of the width; allow a wide margin
    assert widths[400] < 0.5 * widths[25]
    assert widths[25] == pytest.approx(2 * 1.96 * math.sqrt(0.24 / 25), rel=0.3)


def test_bootstrap_of_a_constant_is_a_point():
    e = bootstrap_mean([0.7] * 10)
    assert e.low == e.value == e.high == pytest.approx(0.7)


def test_bootstrap_refuses_nothing_to_resample():
    with pytest.raises(PipelineError, match="at least one problem"):
        bootstrap_mean([])


def test_summarize_overall_is_the_mean_of_per_problem_scores():
    rng = random.Random(1)
    k = 8
    correct = [rng.randint(0, k) for _ in range(40)]
    s = summarize([f"p{i}" for i in range(40)], correct, k, n_boot=200)
    d = s.as_dict()
    assert set(d["overall"]) == {"avg@8", "pass@1", "pass@2", "pass@4", "pass@8"}
    assert d["overall"]["avg@8"]["value"] == pytest.approx(sum(correct) / (k * 40))
    for j in (1, 2, 4, 8):
        ref = sum(comb_pass_at_k(k, c, j) for c in correct) / 40
        assert d["overall"][f"pass@{j}"]["value"] == pytest.approx(ref)
        assert d["overall"][f"pass@{j}"]["ci_low"] <= ref <= d["overall"][f"pass@{j}"]["ci_high"]
    assert [p["correct"] for p in d["per_problem"]] == correct
    assert d["per_problem"][0]["pass@8"] == (1.0 if correct[0] else 0.0)
