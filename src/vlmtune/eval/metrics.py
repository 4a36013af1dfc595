"""Metrics with 95% bootstrap confidence intervals, and the text metrics (BLEU, ROUGE-L).

Every number the evaluator reports carries a percentile-bootstrap interval (Efron & Tibshirani
1993, ch. 13): resample the records with replacement ``n_resamples`` times, recompute the
statistic, take the 2.5th and 97.5th percentiles. A difference between two systems on the same
records uses the *paired* bootstrap (Koehn 2004): the same resampled indices for both, so the
record-to-record variation they share cancels out.

All functions here are pure: lists of numbers in, numbers out, seeded.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

N_RESAMPLES = 1000
CONFIDENCE = 0.95


def resample_indices(n: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``(n_resamples, n)`` indices drawn with replacement from ``range(n)``, seeded."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(stats, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float],
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of ``values``; ``(nan, nan)`` when there are none."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    stats = x[resample_indices(x.size, n_resamples, seed)].mean(axis=1)
    return _percentiles(stats, confidence)


def bootstrap_statistic_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """CI of a statistic that is not a mean (corpus BLEU): ``statistic(indices) -> float``."""
    if n == 0:
        return math.nan, math.nan
    stats = np.array([statistic(idx) for idx in resample_indices(n, n_resamples, seed)])
    return _percentiles(stats, confidence)


def with_ci(values: Sequence[float], seed: int = 0, n_resamples: int = N_RESAMPLES) -> dict:
    """``{value, ci_low, ci_high, n}``: the mean of ``values`` and its bootstrap CI."""
    x = np.asarray(values, dtype=float)
    low, high = bootstrap_ci(x, n_resamples=n_resamples, seed=seed)
    value = float(x.mean()) if x.size else math.nan
    return {"value": value, "ci_low": low, "ci_high": high, "n": int(x.size)}


def paired_bootstrap_diff(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``mean(b) - mean(a)`` and its paired-bootstrap CI: ``(delta, ci_low, ci_high)``.

    ``a[i]`` and ``b[i]`` are two systems' values on the same record ``i`` (``a`` = before,
    ``b`` = after). Each resample draws record indices once and uses them for both.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired values need equal lengths, got {x.size} and {y.size}")
    if x.size == 0:
        return math.nan, math.nan, math.nan
    diffs = y - x
    stats = diffs[resample_indices(diffs.size, n_resamples, seed)].mean(axis=1)
    low, high = _percentiles(stats, confidence)
    return float(diffs.mean()), low, high


# ----------------------------------------------------------------------------- summaries
def summarise(rows: Sequence[Mapping[str, float | None]], seed: int = 0) -> dict[str, dict]:
    """Per-record metric values -> ``{metric: {value, ci_low, ci_high, n}}`` (None values skipped).

    A metric with no defined value on any record is left out rather than reported as NaN.
    """
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row if k not in names)
    out = {}
    for name in names:
        values = [row[name] for row in rows if row.get(name) is not None]
        if values:
            out[name] = with_ci(values, seed=seed)
    return out


# ----------------------------------------------------------------------------- text
def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus BLEU (0-100) with one reference per hypothesis."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def bleu_statistics(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Each sentence's BLEU sufficient statistics: ``(n, 10)`` = 4 correct, 4 total, sys, ref length.

    Corpus BLEU is a function of their column sums, so a bootstrap resample only re-sums rows.
    """
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    rows = []
    for h, r in zip(hypotheses, references):
        s = bleu.corpus_score([h], [[r]])
        rows.append([*s.counts, *s.totals, s.sys_len, s.ref_len])
    return np.array(rows, dtype=np.int64).reshape(-1, 10)


def bleu_from_statistics(stats: np.ndarray) -> float:
    """Corpus BLEU from summed sufficient statistics (sacreBLEU's defaults: exp smoothing)."""
    from sacrebleu.metrics import BLEU

    total = stats.sum(axis=0).tolist()
    return float(BLEU.compute_bleu(total[0:4], total[4:8], total[8], total[9], smooth_method="exp").score)


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """sacreBLEU sentence BLEU (0-100, exponential smoothing, sacreBLEU's default)."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(hypothesis, [reference]).score)


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure (0-1) from Google's rouge-score, with Porter stemming."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(scorer.score(reference, hypothesis)["rougeL"].fmeasure)


def text_metrics(
    hypotheses: Sequence[str], references: Sequence[str], seed: int = 0
) -> tuple[dict[str, dict], list[dict[str, float]]]:
    """BLEU (corpus, with a bootstrap over sentences), mean sentence BLEU and mean ROUGE-L.

    Returns ``(metrics, per_record)``: the metric dict and each record's ``bleu``/``rouge_l``.
    """
    hyps, refs = list(hypotheses), list(references)
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    per_record = [{"bleu": sentence_bleu(h, r), "rouge_l": rouge_l(h, r)} for h, r in zip(hyps, refs)]
    if not hyps:
        return {}, per_record
    stats = bleu_statistics(hyps, refs)
    low, high = bootstrap_statistic_ci(lambda idx: bleu_from_statistics(stats[idx]), len(hyps), seed=seed)
    metrics = {
        "text/bleu": {"value": corpus_bleu(hyps, refs), "ci_low": low, "ci_high": high, "n": len(hyps)},
        "text/sentence_bleu": with_ci([r["bleu"] for r in per_record], seed=seed),
        "text/rouge_l": with_ci([r["rouge_l"] for r in per_record], seed=seed),
    }
    return metrics, per_record
