"""avg@k, unbiased pass@k and bootstrap confidence intervals: numbers in, numbers out.

Everything here is pure (no I/O, no models) so the formulas can be checked
against independent references. A problem contributes ``n`` samples of which
``c`` are correct; the overall score is the mean over problems, and its
uncertainty comes from which problems were drawn, so the bootstrap resamples
problems (not samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), in its stable product form.

    The binomial ratio overflows floats for large n; the product
    ``prod(1 - k/i, i = n-c+1..n)`` never does. With fewer than ``k``
    wrong samples every k-subset holds a correct one, so the value is 1.
    """
    if not 0 <= c <= n:
        raise PipelineError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise PipelineError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(n: int, c: int) -> float:
    """Mean accuracy over the n samples of one problem (the paper's avg@k)."""
    if not 0 <= c <= n or n < 1:
        raise PipelineError(f"avg@k needs 0 <= c <= n and n >= 1, got c={c}, n={n}")
    return c / n


def pass_ks(k: int) -> list[int]:
    """The pass@j reported for k samples: 1, 2, 4, ... and k itself."""
    out = [1 << i for i in range(k.bit_length()) if 1 << i < k]
    return [*out, k]


@dataclass(frozen=True)
class Estimate:
    """A mean over problems with its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


def bootstrap_mean(values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> Estimate:
    """Mean of ``values`` and its percentile bootstrap interval (resampling the values).

    Seeded, so the same results give the same interval on every run (a
    resumed evaluation reports exactly what an uninterrupted one does).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise PipelineError("bootstrap needs at least one problem")
    if not 0 < level < 1:
        raise PipelineError(f"confidence level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise PipelineError(f"bootstrap resamples must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // v.size)  # bound the index matrix, not the problem count
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = v[rng.integers(0, v.size, size=(stop - start, v.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    mean = float(v.mean())
    # float rounding can put an interval of identical means a hair off the mean itself
    return Estimate(mean, min(float(low), mean), max(float(high), mean))


@dataclass(frozen=True)
class Summary:
    """Per-problem scores and the overall estimates of one evaluation."""

    k: int
    ids: list[str]
    correct: list[int]  # c per problem, out of k
    overall: dict[str, Estimate]  # "avg@K", "pass@1", "pass@2", ..., "pass@K"
    n_boot: int
    seed: int
    level: float

    def as_dict(self) -> dict:
        k = self.k
        per = [{"id": i, "n": k, "correct": c, f"avg@{k}": avg_at_k(k, c),
                **{f"pass@{j}": pass_at_k(k, c, j) for j in pass_ks(k)}}
               for i, c in zip(self.ids, self.correct, strict=True)]
        return {"k": k, "n_problems": len(self.ids),
                "overall": {name: e.as_dict() for name, e in self.overall.items()},
                "bootstrap": {"resamples": self.n_boot, "seed": self.seed, "level": self.level,
                              "resampled": "problems"},
                "per_problem": per}


def summarize(ids: Sequence[str], correct: Sequence[int], k: int, n_boot: int = 1000,
              seed: int = 0, level: float = 0.95) -> Summary:
    """avg@k and pass@j (j in ``pass_ks(k)``) over problems, each with a bootstrap CI.

    Every metric is bootstrapped with the same resampled problem sets (the
    same seed), so their intervals are comparable.
    """
    if len(ids) != len(correct):
        raise PipelineError(f"{len(ids)} problem ids but {len(correct)} scores")
    overall = {f"avg@{k}": bootstrap_mean([avg_at_k(k, c) for c in correct], n_boot, seed, level)}
    for j in pass_ks(k):
        overall[f"pass@{j}"] = bootstrap_mean([pass_at_k(k, c, j) for c in correct],
                                              n_boot, seed, level)
    return Summary(k, list(ids), list(correct), overall, n_boot, seed, level)
