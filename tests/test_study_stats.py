"""The study's statistics against hand-worked values and plain re-computations."""

from __future__ import annotations

import math
import random

import pytest

from vlmtune.study.voting import winner_of
from vlmtune.study.export import majority
from vlmtune.study.stats import cohen_kappa, fleiss_kappa, wilson_interval, win_rate


def test_wilson_interval_hand_worked():
    """8 of 10, z = 1.96: centre (0.8 + 0.19207) / 1.38415 = 0.71674,
    half 1.96 * sqrt(0.016 + 0.0096) / 1.38415 = 0.22656 -> (0.4902, 0.9433)."""
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)
    # 0 of 10 keeps a non-zero upper bound (z^2 / (n + z^2) = 0.2775); n = 0 is "know nothing".
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_win_rate_counts_ties_as_half_and_both_bad_apart():
    w = win_rate(["B"] * 6 + ["A"] * 2 + ["tie"] * 2 + ["both_bad"] * 3)
    assert (w.a, w.b, w.ties, w.both_bad, w.n) == (2, 6, 2, 3, 13)
    assert w.rate == pytest.approx((6 + 1) / 10)
    assert w.ci == pytest.approx(wilson_interval(7, 10))
    assert w.rate_no_ties == pytest.approx(6 / 8)
    assert w.ci_no_ties == pytest.approx(wilson_interval(6, 8))
    only_bad = win_rate(["both_bad"])
    assert only_bad.rate is None and only_bad.rate_no_ties is None
    with pytest.raises(ValueError, match="unknown vote labels"):
        win_rate(["left"])


def test_cohen_kappa_hand_worked():
    """Wikipedia's example: 50 items; yes/yes 20, yes/no 5, no/yes 10, no/no 15.
    p_o = 35/50 = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5, kappa = 0.4."""
    first = ["y"] * 25 + ["n"] * 25
    second = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["A", "B", "A"], ["A", "B", "A"]) == pytest.approx(1.0)
    assert cohen_kappa(["A", "A"], ["A", "A"]) is None  # chance agreement is 1: undefined
    with pytest.raises(ValueError):
        cohen_kappa(["A"], ["A", "B"])


def test_fleiss_kappa_hand_worked():
    """Fleiss' kappa example from Wikipedia: 10 items, 14 raters, 5 categories -> 0.210."""
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)
    with pytest.raises(ValueError):
        fleiss_kappa([[1, 1], [3, 0]])


def test_fleiss_matches_a_plain_pairwise_computation():
    """Fleiss' P_bar is the share of agreeing rater pairs per item; check on random data."""
    rng = random.Random(0)
    n, cats = 3, 4
    ratings = [[rng.randrange(cats) for _ in range(n)] for _ in range(30)]
    table = [[r.count(k) for k in range(cats)] for r in ratings]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    p_bar = sum(sum(r[i] == r[j] for i, j in pairs) / len(pairs) for r in ratings) / len(ratings)
    shares = [sum(r.count(k) for r in ratings) / (len(ratings) * n) for k in range(cats)]
    p_e = sum(s * s for s in shares)
    assert fleiss_kappa(table) == pytest.approx((p_bar - p_e) / (1 - p_e))
    assert not math.isnan(fleiss_kappa(table))


def test_winner_of_translates_sides():
    assert winner_of("left", a_on_left=True) == "A"
    assert winner_of("left", a_on_left=False) == "B"
    assert winner_of("right", a_on_left=True) == "B"
    assert winner_of("right", a_on_left=False) == "A"
    assert winner_of("tie", a_on_left=False) == "tie"
    assert winner_of("both_bad", a_on_left=True) == "both_bad"


def test_majority_needs_a_strict_winner():
    assert majority(["B", "B", "A"]) == "B"
    assert majority(["A", "B"]) is None
    assert majority(["tie", "tie", "B"]) == "tie"
    assert majority([]) is None
