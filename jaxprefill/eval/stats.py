"""Confidence intervals for accuracies and for paired accuracy differences (pure Python).

* :func:`wilson`: the Wilson score interval of a binomial proportion (Wilson 1927); unlike the
  normal (Wald) interval it stays inside [0, 1] and is sensible at 0/n and n/n.
* :func:`paired_difference`: accuracy(config) - accuracy(baseline) on the *same* samples, with
  Newcombe's square-and-add interval for paired proportions (Newcombe 1998, method 10: the two
  Wilson intervals combined with the continuity-corrected correlation phi of the 2x2 table),
  plus the exact two-sided McNemar p-value on the discordant pairs. Pairing matters: two
  policies that fail on the same hard samples differ far less than two independent accuracies
  with the same sample count suggest.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

Z95 = 1.959963984540054  # standard normal quantile of 0.975


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) Wilson score interval for ``correct`` successes of ``n``; (0, 1) if n = 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n={n}], got {correct}")
    p = correct / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclasses.dataclass(frozen=True)
class PairedDiff:
    """Paired comparison on n samples. ``both``: both right; ``only_a``: config right and
    baseline wrong; ``only_b``: baseline right and config wrong; ``neither``. ``diff`` =
    acc_a - acc_b = (only_a - only_b) / n with its 95% interval [low, high]; ``p_mcnemar`` the
    exact two-sided McNemar p-value (binomial test of only_a vs only_b)."""

    n: int
    both: int
    only_a: int
    only_b: int
    neither: int
    acc_a: float
    acc_b: float
    diff: float
    low: float
    high: float
    p_mcnemar: float


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = Z95) -> PairedDiff:
    """Compare outcomes ``a`` (config) and ``b`` (baseline), aligned per sample."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    neither = n - both - only_a - only_b
    if n == 0:
        nan = float("nan")
        return PairedDiff(0, 0, 0, 0, 0, nan, nan, nan, -1.0, 1.0, 1.0)
    ka, kb = both + only_a, both + only_b
    pa, pb = ka / n, kb / n
    la, ua = wilson(ka, n, z)
    lb, ub = wilson(kb, n, z)
    # Correlation of the paired outcomes, continuity-corrected as in Newcombe (1998).
    margins = ka * (n - ka) * kb * (n - kb)
    phi = 0.0
    if margins > 0:
        cross = both * neither - only_a * only_b
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)
    d = pa - pb
    # Distances from each estimate to its Wilson bounds, combined with the correlation.
    down_a, up_b = pa - la, ub - pb
    up_a, down_b = ua - pa, pb - lb
    low = d - math.sqrt(max(0.0, down_a ** 2 - 2 * phi * down_a * up_b + up_b ** 2))
    high = d + math.sqrt(max(0.0, up_a ** 2 - 2 * phi * up_a * down_b + down_b ** 2))
    return PairedDiff(n, both, only_a, only_b, neither, pa, pb, d, max(-1.0, low), min(1.0, high),
                      mcnemar_exact(only_a, only_b))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: 2 * P(X <= min) for X ~ Binomial(only_a + only_b, 1/2),
    capped at 1."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return min(1.0, 2 * tail)
