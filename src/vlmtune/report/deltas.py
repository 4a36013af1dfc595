"""Tuned vs base: per-metric deltas with paired-bootstrap CIs, and per-record outcomes.

Both models answer the same records, so a delta's uncertainty comes from resampling records
(paired bootstrap: Efron & Tibshirani 1993, ch. 16; Koehn 2004 for its use on system
comparisons) rather than from the two marginal CIs, which would overstate it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlmtune.report.inputs import EvalResult, Sample

# A metric whose name holds one of these is better when lower.
LOWER_IS_BETTER = ("error", "mae", "rmse", "failure", "loss")
# Quantities with no better direction on their own (DPO can lower both log-probs and still win).
NO_DIRECTION = ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected")

# Metrics of a group of records (a family, a hop count, an OOD axis; the baselines' too), each
# defined on the group's records whatever the answers.
SCOPED = ("family/", "hops/", "axis/", "baseline/")

OUTCOMES = ("improved", "regressed", "both-wrong", "both-right", "unscored")


@dataclass(frozen=True)
class MetricDelta:
    """``tuned - base`` for one metric. ``verdict`` is ``better``/``worse`` when the CI excludes 0."""

    metric: str
    delta: float
    ci_low: float
    ci_high: float
    n: int
    verdict: str  # "better", "worse", "up"/"down" (no direction), "no change" (CI holds 0), "no CI"


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def outcome(base_correct: bool | None, tuned_correct: bool | None) -> str:
    """Where a record went: ``improved`` = base wrong and tuned right, and so on; ``unscored``
    when either has no right/wrong (a record without gold counts)."""
    if base_correct is None or tuned_correct is None:
        return "unscored"
    if base_correct:
        return "both-right" if tuned_correct else "regressed"
    return "improved" if tuned_correct else "both-wrong"


def record_values(s: Sample) -> dict[str, float]:
    """The per-record value behind each metric of ``metrics.json`` that is a mean over records.

    Task and counting values are the row's ``values``, the very numbers the evaluator averaged,
    so the two cannot disagree; a counting row written before ``values`` existed is re-scored by
    the count task (:func:`vlmtune.tasks.core.task_of`). A key is left out where the row does not
    say (a class not mentioned has no error, a log-prob not computed has no accuracy);
    :func:`paired_values` checks that the means agree with the evaluator's before pairing anything.
    """
    row = s.row
    values: dict[str, float] = {}
    if isinstance(row.get("values"), dict):
        values.update({k: float(v) for k, v in row["values"].items() if _is_number(v)})
    elif s.gold:
        values.update({k: v for k, v in _count_values(s).items() if v is not None})
    for key, metric in (("bleu", "text/sentence_bleu"), ("rouge_l", "text/rouge_l"),
                        ("chosen_logp", "logps/chosen"), ("rejected_logp", "logps/rejected")):
        if _is_number(row.get(key)):
            values[metric] = float(row[key])
    logps = [row.get(k) for k in ("chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp")]
    if all(_is_number(x) for x in logps[:2]):
        values["logps/accuracy"] = float(logps[0] > logps[1])
    if all(_is_number(x) for x in logps):
        # beta > 0 scales both implicit rewards alike, so their order needs no beta.
        values["rewards/accuracies"] = float(logps[0] - logps[2] > logps[1] - logps[3])
    return values


def _count_values(s: Sample) -> dict[str, float | None]:
    """Today's counting values of a counting row without ``values``, from its task."""
    from vlmtune.tasks.core import task_of

    metadata = {"counts": s.gold, "classes": list(s.gold)}
    return task_of(metadata).part_values(s.answer, metadata)[0]


def paired_values(
    metric: str, base: EvalResult, tuned: EvalResult
) -> tuple[list[float], list[float]] | None:
    """Per-record values of ``metric`` for the records both models answered, base first.

    A metric of a group of records (:data:`SCOPED`: ``family/count/accuracy`` is defined on the
    count records) is paired over the group, which is the same for both models. Any other metric
    needs a value on every record: one defined only where the answer allows (an absolute error
    where the model named the class, think/answer consistency) is not paired. ``None`` then, or
    unless each model's mean reproduces the value in its ``metrics.json`` (so a CI is never
    drawn around a quantity the evaluator did not report).
    """
    per_model = []
    for result in (base, tuned):
        values = {s.id: record_values(s).get(metric) for s in result.samples}
        if metric.startswith(SCOPED):
            values = {i: v for i, v in values.items() if v is not None}
        if not values or any(v is None for v in values.values()) or not math.isclose(sum(values.values()) / len(values), result.metrics[metric]["value"],
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
    from vlmtune.eval.metrics import paired_bootstrap_diff

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
    if metric in NO_DIRECTION:
        return "up" if up else "down"
    return "better" if up != lower_is_better(metric) else "worse"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
