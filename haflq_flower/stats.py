"""Paired tests on per-row predictions: two models evaluated on the same rows.

Pure numpy and the standard library; no model, Flower or Ray. Used by
:mod:`haflq_flower.compare` to decide "arm A vs arm B" from ``predictions.npz``.

- :func:`mcnemar_exact`: McNemar's exact test. Only rows where exactly one model is right
  count (b: A right and B wrong, c: the reverse); under the null hypothesis of equal
  accuracy each such row is a fair coin, so the two-sided p-value is the binomial tail
  ``min(1, 2 * P(X <= min(b, c)))`` with ``X ~ Bin(b + c, 1/2)``.
- :func:`pooled_mcnemar`: the same over several seeds, the discordant counts summed.
- :func:`paired_bootstrap`: a percentile interval for the accuracy difference, resampling
  rows (the same resampled rows for both models).
- :func:`gap_closed`: ``(acc - low) / (high - low)`` against two bounds, with a paired
  bootstrap interval.
- :func:`holm`: Holm's step-down adjustment for a family of p-values.

Several seeds are several strata: each seed draws its own test rows (the test split is
seeded by the run's seed), so every function takes one pair (or triple) per seed, each on
that seed's rows; the bootstrap resamples rows within each seed and weighs the seeds
equally, the permutation test pools every seed's rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np


@dataclass(frozen=True)
class McNemar:
    """``b``: rows only A gets right; ``c``: rows only B gets right; two-sided ``p``."""

    b: int
    c: int
    p: float

    @property
    def discordant(self) -> int:
        return self.b + self.c


def _as_pairs(a: np.ndarray, b: np.ndarray, dtype: type = bool) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=dtype)
    b = np.asarray(b, dtype=dtype)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired rows must be two 1-d arrays of one length, got {a.shape}, {b.shape}"
        )
    return a, b


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (doubling the
    smaller tail, capped at 1); 1 for ``n = 0``."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    tail = Fraction(sum(math.comb(n, i) for i in range(low + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> McNemar:
    """McNemar's exact test of equal accuracy for two models on the same rows."""
    a, b = _as_pairs(a_correct, b_correct)
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    return McNemar(only_a, only_b, binomial_two_sided(only_a, only_a + only_b))


def pooled_mcnemar(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> McNemar:
    """McNemar over several seeds: discordant rows summed over the pairs (each seed's
    pair of runs on the same rows), one exact test on the totals."""
    if not pairs:
        raise ValueError("no pairs to pool")
    tests = [mcnemar_exact(a, b) for a, b in pairs]
    b = sum(t.b for t in tests)
    c = sum(t.c for t in tests)
    return McNemar(b, c, binomial_two_sided(b, b + c))


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def excludes(self, value: float) -> bool:
        return not self.low <= value <= self.high


def _resampled_rows(num_rows: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, num_rows, size=(resamples, num_rows))


def _seed_differences(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Per seed, score A minus score B on each of that seed's rows."""
    if not pairs:
        raise ValueError("no pairs")
    return [a - b for a, b in (_as_pairs(a, b, float) for a, b in pairs)]


def _stratified_means(
    per_seed: Sequence[np.ndarray], resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap draws of the mean over seeds of each seed's row mean, rows resampled
    within each seed. ``per_seed[i]`` has shape (groups, rows_i); the result
    (groups, resamples)."""
    draws = [
        values[:, _resampled_rows(values.shape[1], resamples, rng)].mean(axis=2)
        for values in per_seed
    ]
    return np.mean(draws, axis=0)


def paired_bootstrap(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile interval of ``mean over seeds of (acc(A) - acc(B))``: within each seed
    its rows resampled with replacement, the same rows for both models."""
    diffs = _seed_differences(pairs)
    estimate = float(np.mean([d.mean() for d in diffs]))
    rng = np.random.default_rng(seed)
    draws = _stratified_means([d[None, :] for d in diffs], resamples, rng)[0]
    alpha = (1.0 - level) / 2
    return Interval(estimate, *np.quantile(draws, [alpha, 1 - alpha]).tolist())


def is_binary(correct: np.ndarray) -> bool:
    """Whether a per-row correctness vector holds only right/wrong (0 or 1); a method
    evaluated per client gives the fraction of clients right instead."""
    values = np.asarray(correct, dtype=float)
    return bool(np.all((values == 0.0) | (values == 1.0)))


def paired_permutation(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    resamples: int = 20_000,
    seed: int = 0,
) -> float:
    """Two-sided p-value of "mean over rows of (score A - score B) is 0" by flipping the
    sign of each row's difference (A and B exchangeable on a row under the null; the rows
    of every seed together). Works for fractional per-row scores, where McNemar's test
    does not apply. Monte Carlo with ``resamples`` flips, the observed assignment counted
    in (so p >= 1 / (resamples + 1))."""
    diff = np.concatenate(_seed_differences(pairs))
    n = diff.shape[0]
    observed = abs(diff.mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 1000):  # in chunks: 1000 x rows signs at a time
        size = min(1000, resamples - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(size, n))
        hits += int(np.sum(np.abs(signs @ diff) / n >= observed - 1e-12))
    return (hits + 1) / (resamples + 1)


def gap_closed(
    runs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """``(acc - acc_low) / (acc_high - acc_low)`` from one ``(arm, low, high)`` triple of
    correctness vectors per seed (each triple on that seed's rows), every accuracy the
    mean over seeds; a percentile interval from resampling rows within each seed, jointly
    for the three. Resamples where the bounds tie are dropped; the interval is NaN if all
    tie."""
    if not runs:
        raise ValueError("no runs")
    per_seed = []
    for triple in runs:
        vectors = [np.asarray(r, dtype=float) for r in triple]
        if len({v.shape for v in vectors}) != 1 or vectors[0].ndim != 1:
            raise ValueError("the runs of one seed must cover the same rows")
        per_seed.append(np.stack(vectors))
    a, lo, hi = np.mean([g.mean(axis=1) for g in per_seed], axis=0)
    if hi == lo:
        raise ValueError("the bounds have equal accuracy: the gap is undefined")
    estimate = (a - lo) / (hi - lo)
    draws = _stratified_means(per_seed, resamples, np.random.default_rng(seed))
    num, den = draws[0] - draws[1], draws[2] - draws[1]
    keep = den != 0
    if not keep.any():
        return Interval(float(estimate), math.nan, math.nan)
    ratios = num[keep] / den[keep]
    alpha = (1.0 - level) / 2
    return Interval(float(estimate), *np.quantile(ratios, [alpha, 1 - alpha]).tolist())


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (same order as given): the k-th smallest of m is multiplied
    by ``m - k + 1``, made monotone, capped at 1. Rejecting where the adjusted value is
    below alpha controls the family-wise error rate at alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
