"""Metrics against hand-worked values, plain-loop references and direct library calls."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from vlmtune.eval import metrics
from vlmtune.tasks.families import FAMILIES


def _loop_bootstrap_mean(values, n_resamples, seed):
    """The obvious implementation: draw each resample with the same seeded generator, in order."""
    rng = np.random.default_rng(seed)
    n = len(values)
    stats = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        stats.append(sum(values[i] for i in idx) / n)
    stats.sort()
    return stats


def test_bootstrap_ci_matches_plain_loop_and_contains_mean():
    values = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1]
    low, high = metrics.bootstrap_ci(values, n_resamples=1000, seed=3)
    stats = _loop_bootstrap_mean(values, 1000, seed=3)
    assert low == pytest.approx(np.percentile(stats, 2.5))
    assert high == pytest.approx(np.percentile(stats, 97.5))
    assert low <= np.mean(values) <= high
    assert low < high


def test_bootstrap_is_deterministic_per_seed_and_varies_across_seeds():
    rng = random.Random(0)
    values = [rng.random() for _ in range(30)]
    assert metrics.bootstrap_ci(values, seed=1) == metrics.bootstrap_ci(values, seed=1)
    assert metrics.bootstrap_ci(values, seed=1) != metrics.bootstrap_ci(values, seed=2)


def test_bootstrap_of_a_constant_is_a_point_and_empty_is_nan():
    assert metrics.bootstrap_ci([2.0] * 7) == (2.0, 2.0)
    low, high = metrics.bootstrap_ci([])
    assert math.isnan(low) and math.isnan(high)
    assert metrics.with_ci([1.0, 0.0, 1.0, 1.0])["value"] == 0.75
    assert metrics.with_ci([1.0, 0.0, 1.0, 1.0])["n"] == 4


def test_paired_bootstrap_diff_matches_loop_and_sign():
    a = [0, 0, 1, 0, 1, 0, 0, 1, 0, 0]
    b = [1, 0, 1, 1, 1, 0, 1, 1, 0, 1]
    delta, low, high = metrics.paired_bootstrap_diff(a, b, seed=5)
    assert delta == pytest.approx(0.4)  # 7/10 - 3/10
    diffs = [y - x for x, y in zip(a, b)]
    stats = _loop_bootstrap_mean(diffs, 1000, seed=5)
    assert low == pytest.approx(np.percentile(stats, 2.5))
    assert high == pytest.approx(np.percentile(stats, 97.5))
    assert low <= delta <= high
    # Pairing: identical systems give exactly zero width, unlike two marginal CIs.
    assert metrics.paired_bootstrap_diff(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        metrics.paired_bootstrap_diff([1, 2], [1])


def test_count_values_and_summary_by_hand():
    gold = {"car": 2, "motorcycle": 1, "bus": 0, "bicycle": 0}
    answers = [
        "There are 2 cars, 1 motorcycle, 0 buses, 0 bicycles in the image.",  # exact
        "There are 3 cars, 1 motorcycle, 0 buses, 0 bicycles in the image.",  # car off by 1
        "I see 2 cars.",  # three classes not mentioned
        "A lovely day.",  # parse failure
    ]
    rows = [FAMILIES["count"].part_values(a, {"counts": gold})[0] for a in answers]
    summary = metrics.summarise(rows)
    assert summary["exact_match"]["value"] == pytest.approx(1 / 4)
    assert summary["parse_failure"]["value"] == pytest.approx(1 / 4)
    assert summary["accuracy/car"]["value"] == pytest.approx(2 / 4)
    assert summary["accuracy/motorcycle"]["value"] == pytest.approx(2 / 4)
    # Car errors 0, 1, 0 (the failure mentions no car, so it has no error): MAE 1/3.
    assert summary["abs_error/car"]["value"] == pytest.approx(1 / 3)
    assert summary["abs_error/car"]["n"] == 3
    assert summary["abs_error/bus"]["n"] == 2
    # Totals: 3, 4, 2 (sum of mentioned), none -> errors 0, 1, 1; accurate 1 of 4.
    assert summary["total_abs_error"]["value"] == pytest.approx(2 / 3)
    assert summary["total_accuracy"]["value"] == pytest.approx(1 / 4)
    # Class accuracy: 4/4, 3/4, 1/4, 0/4.
    assert summary["class_accuracy"]["value"] == pytest.approx(8 / 16)
    for entry in summary.values():
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]


def test_bleu_and_rouge_match_direct_library_calls():
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps = ["There are 2 cars, 0 buses in the image.", "the cat sat on the mat", "hello world"]
    refs = ["There are 3 cars, 0 buses in the image.", "a cat sat on the mat", "goodbye world"]
    assert metrics.corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert metrics.sentence_bleu(hyps[1], refs[1]) == pytest.approx(
        sacrebleu.sentence_bleu(hyps[1], [refs[1]]).score
    )
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert metrics.rouge_l(hyps[0], refs[0]) == pytest.approx(scorer.score(refs[0], hyps[0])["rougeL"].fmeasure)
    # Identical strings are perfect; the sufficient statistics reproduce corpus BLEU exactly.
    assert metrics.sentence_bleu(refs[0], refs[0]) == pytest.approx(100.0)
    assert metrics.rouge_l(refs[0], refs[0]) == pytest.approx(1.0)
    stats = metrics.bleu_statistics(hyps, refs)
    assert metrics.bleu_from_statistics(stats) == pytest.approx(metrics.corpus_bleu(hyps, refs))
    sub = [0, 0, 2]
    assert metrics.bleu_from_statistics(stats[sub]) == pytest.approx(
        metrics.corpus_bleu([hyps[i] for i in sub], [refs[i] for i in sub])
    )


def test_text_metrics_rows_and_cis():
    hyps = ["a b c d e", "a b x d e", "q r s t"]
    refs = ["a b c d e", "a b c d e", "a b c d"]
    summary, rows = metrics.text_metrics(hyps, refs, seed=0)
    assert [r["rouge_l"] for r in rows] == pytest.approx([1.0, 0.8, 0.0])
    assert summary["text/rouge_l"]["value"] == pytest.approx(0.6)
    for entry in summary.values():
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
        assert entry["n"] == 3
