"""Is a difference real? Bootstrap confidence intervals and paired tests over queries (pure numpy).

A retrieval metric is a mean over queries, so its uncertainty is the sampling of queries:

* ``bootstrap_ci``: percentile bootstrap of the mean (resample queries with replacement).
* ``paired_test``: two systems on the SAME queries; the per-query differences give the mean
  difference, its percentile-bootstrap interval and a two-sided p-value from the paired
  randomisation (sign-flip) test: under "no difference" each query's difference is as likely
  to have the other sign. ``p = (1 + #{|mean(s * d)| >= |mean(d)|}) / (1 + resamples)``.

Fixed seeds make every number reproducible; resampling runs in blocks so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0
_BLOCK = 256  # resamples drawn at once


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class PairedTest:
    diff: float  # mean of a - b
    low: float
    high: float
    p_value: float
    queries: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _values(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"need a non-empty 1-D sequence of per-query values, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("per-query values must be finite")
    return x


def _check(resamples: int, confidence: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _bootstrap_means(x: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    means = np.empty(resamples)
    for start in range(0, resamples, _BLOCK):
        n = min(_BLOCK, resamples - start)
        means[start : start + n] = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    return means


def bootstrap_ci(
    values: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = SEED
) -> Interval:
    """Mean of ``values`` and its percentile-bootstrap ``confidence`` interval."""
    _check(resamples, confidence)
    x = _values(values)
    means = _bootstrap_means(x, resamples, np.random.default_rng(seed))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(float(x.mean()), float(low), float(high))


def paired_test(
    a: Sequence[float], b: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = SEED
) -> PairedTest:
    """``a - b`` on the same queries (same order): mean difference, bootstrap interval, p-value."""
    _check(resamples, confidence)
    x, y = _values(a), _values(b)
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same queries: {x.size} vs {y.size}")
    d = x - y
    ci = bootstrap_ci(d, confidence=confidence, resamples=resamples, seed=seed)
    rng = np.random.default_rng(seed + 1)
    observed = abs(d.mean())
    extreme = 0
    for start in range(0, resamples, _BLOCK):
        n = min(_BLOCK, resamples - start)
        signs = rng.integers(0, 2, size=(n, d.size)) * 2 - 1
        # A tolerance so float noise in equal sums never decides "as extreme".
        extreme += int((np.abs((signs * d).mean(axis=1)) >= observed - 1e-12).sum())
    return PairedTest(ci.mean, ci.low, ci.high, (1 + extreme) / (1 + resamples), int(d.size))


def align(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[list[float], list[float]]:
    """Two systems' per-query values on their common queries, in one order.

    Raises when the query sets differ: a paired test on different queries compares nothing.
    """
    if a.keys() != b.keys():
        only = sorted(set(a) ^ set(b))
        raise ValueError(f"paired values need the same queries; {len(only)} differ, e.g. {only[:3]}")
    keys = sorted(a)
    return [a[k] for k in keys], [b[k] for k in keys]
