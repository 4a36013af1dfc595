"""Tuned vs base: per-metric deltas with paired-bootstrap CIs, and per-record outcomes.

Both models answer the same records, so a delta's uncertainty comes from resampling records
(paired bootstrap: Efron & Tibshirani 1993, ch. 16; Koehn 2004 for its use on system
comparisons) rather than from the two marginal CIs, which would overstate it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlmrl.report.results import EvalResult, Sample

# A metric whose name holds one of these is better when lower.
LOWER_IS_BETTER = ("error", "mae", "rmse", "failure", "loss")

OUTCOMES = ("improved", "regressed", "both-wrong", "both-right")


@dataclass(frozen=True)
class MetricDelta:
    """``tuned - base`` for one metric. ``verdict`` is ``better``/``worse`` when the CI excludes 0."""

    metric: str
    delta: float
    ci_low: float
    ci_high: float
    n: int
    verdict: str  # "better", "worse", "no change" (CI holds 0) or "no CI"


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def outcome(base_correct: bool, tuned_correct: bool) -> str:
    """Where a record went: ``improved`` = base wrong and tuned right, and so on."""
    if base_correct:
        return "both-right" if tuned_correct else "regressed"
    return "improved" if tuned_correct else "both-wrong"


def record_values(s: Sample) -> dict[str, float]:
    """The per-record value behind each metric of ``metrics.json`` that is a mean over records.

    A key is left out where the row does not say (a count not mentioned has no error, a log-prob
    not computed has no accuracy); :func:`paired_values` checks that the means agree with the
    evaluator's before pairing anything.
    """
    row = s.row
    values = {"count/exact": float(s.correct)}
    for c, hit in s.class_hits().items():
        values[f"count/class_acc/{c}"] = float(hit)
        if s.parsed.get(c) is not None:
            values[f"count/class_mae/{c}"] = float(abs(s.parsed[c] - s.gold[c]))
    total_error = s.total_error()
    if total_error is not None:
        values["count/total_acc"] = float(total_error == 0)
        values["count/total_mae"] = float(total_error)
    if isinstance(row.get("parse_failure"), bool):
        values["count/parse_failure"] = float(row["parse_failure"])
    for key, metric in (("bleu", "text/sentence_bleu"), ("rouge_l", "text/rouge_l")):
        if _is_number(row.get(key)):
            values[metric] = float(row[key])
    logps = [row.get(k) for k in ("chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp")]
    if all(_is_number(x) for x in logps[:2]):
        values["pref/logp_accuracy"] = float(logps[0] > logps[1])
    if all(_is_number(x) for x in logps):
        values["pref/reward_accuracy"] = float(logps[0] - logps[2] > logps[1] - logps[3])
    return values


def paired_values(
    metric: str, base: EvalResult, tuned: EvalResult
) -> tuple[list[float], list[float]] | None:
    """Per-record values of ``metric`` for the records both models answered, base first.

    ``None`` unless every record has a value and each model's mean reproduces the value in its
    ``metrics.json`` (so a CI is never drawn around a quantity the evaluator did not report).
    """
    per_model = []
    for result in (base, tuned):
        values = {s.id: record_values(s).get(metric) for s in result.samples}
        if not values or any(v is None for v in values.values()):
            return None
        if not math.isclose(sum(values.values()) / len(values), result.metrics[metric]["value"],
                            rel_tol=1e-6, abs_tol=1e-9):
            return None
        per_model.append(values)
    shared = [i for i in per_model[0] if i in per_model[1]]
    if not shared:
        return None
    return [per_model[0][i] for i in shared], [per_model[1][i] for i in shared]


def metric_deltas(base: EvalResult, tuned: EvalResult, seed: int = 0) -> list[MetricDelta]:
    """One :class:`MetricDelta` per metric both report, in ``base.metrics`` order.

    Paired metrics get ``mean(tuned - base)`` over shared records with a paired-bootstrap CI;
    others (corpus BLEU, ...) the plain difference of the reported values and no CI.
    """
    from vlmrl.eval.metrics import paired_bootstrap_diff

    rows = []
    for metric, entry in base.metrics.items():
        if metric not in tuned.metrics:
            continue
        pairs = paired_values(metric, base, tuned)
        if pairs is None:
            delta, lo, hi, n = tuned.metrics[metric]["value"] - entry["value"], math.nan, math.nan, 0
        else:
            delta, lo, hi = paired_bootstrap_diff(pairs[0], pairs[1], seed=seed)
            n = len(pairs[0])
        rows.append(MetricDelta(metric, delta, lo, hi, n, verdict(metric, lo, hi)))
    return rows


def outcomes(base: EvalResult, tuned: EvalResult) -> dict[str, str]:
    """Record id -> outcome of ``tuned`` against ``base``, over the records both answered."""
    tuned_by_id = {s.id: s for s in tuned.samples}
    return {
        s.id: outcome(s.correct, tuned_by_id[s.id].correct)
        for s in base.samples
        if s.id in tuned_by_id
    }


def verdict(metric: str, lo: float, hi: float) -> str:
    """``better``/``worse`` when the CI of ``tuned - base`` excludes 0, by the metric's direction."""
    if math.isnan(lo) or math.isnan(hi):
        return "no CI"
    if lo <= 0 <= hi:
        return "no change"
    up = lo > 0
    return "better" if up != lower_is_better(metric) else "worse"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
