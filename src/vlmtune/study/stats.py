"""The statistics of an A/B study, as pure functions over plain lists of labels.

- Win rate of B over A: ``(B wins + 1/2 ties) / (A wins + B wins + ties)``, and the same
  without ties, ``B wins / (A wins + B wins)``. "Both bad" votes are neither; they are counted
  and reported on their own. The 95% interval is Wilson's score interval
  (Wilson 1927, "Probable inference, the law of succession, and statistical inference"):
  ``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``. With ties counted as halves
  the "successes" are not whole, which the formula takes as is (an approximation); votes on
  the same item by several raters are treated as independent, which makes the interval a
  little too narrow when raters agree.
- Cohen's kappa (Cohen 1960) for two raters on the items both rated:
  ``(p_o - p_e) / (1 - p_e)``, ``p_e = sum_k p1(k) p2(k)``.
- Fleiss' kappa (Fleiss 1971) over items that have the same number n of ratings:
  ``P_i = (sum_k n_ik^2 - n) / (n(n-1))``, ``P_bar = mean P_i``, ``p_k = sum_i n_ik / (N n)``,
  ``P_e = sum_k p_k^2``, ``kappa = (P_bar - P_e) / (1 - P_e)``.

Kappa is undefined when chance agreement is 1 (everyone always used one label); those
functions return None then.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054
LABELS = ("A", "B", "tie", "both_bad")


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n``; (0, 1) when n is 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class WinRate:
    a: int
    b: int
    ties: int
    both_bad: int
    rate: float | None  # (B + ties/2) / (A + B + ties)
    ci: tuple[float, float]
    rate_no_ties: float | None  # B / (A + B)
    ci_no_ties: tuple[float, float]

    @property
    def n(self) -> int:
        return self.a + self.b + self.ties + self.both_bad


def win_rate(winners: Sequence[str]) -> WinRate:
    """Win rate of B over A from vote labels (A, B, tie, both_bad)."""
    counts = Counter(winners)
    unknown = set(counts) - set(LABELS)
    if unknown:
        raise ValueError(f"unknown vote labels {sorted(unknown)}; expected {LABELS}")
    a, b, t = counts["A"], counts["B"], counts["tie"]
    n = a + b + t
    return WinRate(
        a=a,
        b=b,
        ties=t,
        both_bad=counts["both_bad"],
        rate=(b + 0.5 * t) / n if n else None,
        ci=wilson_interval(b + 0.5 * t, n),
        rate_no_ties=b / (a + b) if a + b else None,
        ci_no_ties=wilson_interval(b, a + b),
    )


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's kappa between two raters' labels on the same items (same order)."""
    if len(first) != len(second):
        raise ValueError(f"two raters need the same number of labels, got {len(first)} and {len(second)}")
    n = len(first)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(first, second)) / n
    c1, c2 = Counter(first), Counter(second)
    expected = sum(c1[k] * c2[k] for k in set(c1) | set(c2)) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def fleiss_kappa(table: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa from a table: one row per item, one column per category, counts of ratings.

    Every row must sum to the same number of raters n >= 2.
    """
    if not table:
        return None
    n = sum(table[0])
    if n < 2 or any(sum(row) != n for row in table):
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings on every item")
    n_items = len(table)
    agreement = [(sum(c * c for c in row) - n) / (n * (n - 1)) for row in table]
    p_bar = sum(agreement) / n_items
    shares = [sum(row[k] for row in table) / (n_items * n) for k in range(len(table[0]))]
    p_e = sum(p * p for p in shares)
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1 - p_e)
