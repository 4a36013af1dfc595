"""Evaluate a model on preference records: answer, score, attach CIs, write metrics and samples.

The entry points (``compare`` and ``vlmtune eval`` both call these)::

    load_for_eval(model_path, adapter=None, dtype="float32", min_pixels=None, max_pixels=None,
                  loader="transformers", trust_remote_code=False) -> (model, processor)
        model_path: a base checkpoint or a merged export (None: the adapter's base model);
        adapter: a training run folder (its ``final/`` peft adapter) or an adapter folder,
        refused if it does not fit the model (``vlmtune.models.adapters``).
        Returns the model in eval mode; with an adapter it is a ``PeftModel``, whose adapter
        switched off is the reference.

    evaluate(model, processor, records, out_dir, *, reference=None, batch_size=16,
             max_new_tokens=64, max_length=1024, beta=0.1, seed=0, train_records=None,
             blank_baseline=False) -> dict
        records: list[PreferenceRecord], any mix of task families. reference: None (a
        PeftModel's adapter switched off; for a plain model no implicit-reward metrics), a model,
        or a zero-argument callable returning a context manager inside which ``model`` acts as
        the reference. train_records: the majority baseline's source; blank_baseline: also
        answer with grey images (:mod:`vlmtune.eval.baselines`).
        Writes ``out_dir/metrics.json`` ({metric: {value, ci_low, ci_high, n}}) and
        ``out_dir/samples.jsonl`` (one row per record) and returns the metrics dict.

Metric names. Every record that names its task (``metadata.task``, or ``metadata.counts``):
the task metrics of :mod:`vlmtune.eval.tasks` (``task/accuracy``, ``family/<f>/accuracy``,
``hops/<n>/accuracy``, ``axis/<a>/accuracy``, ``task/format_rate``, ``task/answer_tokens``,
``task/truncation_rate``, ``task/think_consistency``, ``family/grounding/acc@0.5`` and
``family/grounding/iou``, ...), and the baselines' accuracies under ``baseline/majority/`` and
``baseline/blank/``. Counting (records with ``metadata["counts"]``), as before tasks existed:
``exact_match``, ``class_accuracy``, ``accuracy/<cls>``, ``abs_error/<cls>``,
``total_accuracy``, ``total_abs_error``, ``parse_failure``. Preference (TRL's names):
``logps/chosen``, ``logps/rejected``, ``logps/accuracy`` (chosen more likely than rejected), and
with a reference ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins`` (implicit reward ``beta * (log pi - log ref)``, Rafailov et al. 2023 eq. 5).
Text, answer against the chosen text: ``text/bleu`` (corpus), ``text/sentence_bleu``,
``text/rouge_l``.

``samples.jsonl`` rows: ``id``, ``image`` (first image path), ``images``, ``prompt`` (text),
``answer``, ``chosen``, ``rejected``, ``gold_counts``, ``parsed_counts``, ``parsed_total``,
``correct`` (right or wrong; for counting the exact match), ``class_hits``, ``parse_failure``,
``chosen_logp``, ``rejected_logp``, ``ref_chosen_logp``, ``ref_rejected_logp`` (null when not
computed), ``bleu``, ``rouge_l``; for a record with a task also ``family``, ``hops``, ``axis``,
``question_type``, ``task_accuracy``, ``gold_text``, ``majority_answer`` (``blank_answer``) and
``values`` (the record's value of every mean metric above, which the report pairs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError
from vlmtune.eval.baselines import MAJORITY_NOTES, baseline_metrics, blank_items, majority_answers, majority_completion
from vlmtune.eval.metrics import summarise, text_metrics, with_ci
from vlmtune.eval.tasks import has_task, task_values

log = logging.getLogger(__name__)


def load_for_eval(model_path: str | Path | None, adapter: str | Path | None = None, dtype: str = "float32",
                  min_pixels: int | None = None, max_pixels: int | None = None, loader: str = "transformers",
                  trust_remote_code: bool = False):
    """``(model, processor)`` ready to evaluate: a base or merged model, or a base with an adapter.

    The adapter is checked against the model before it is put on (``vlmtune.models.adapters``).
    """
    from vlmtune.models.adapters import adapter_base, find_adapter, load_adapter
    from vlmtune.models.load import load_model

    adapter_dir = find_adapter(adapter) if adapter else None
    if model_path is None:
        if adapter_dir is None:
            raise VlmtuneError("give a model (--model) or an adapter whose config names its base model")
        model_path = adapter_base(adapter_dir)
    model, processor = load_model(model_path, dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels,
                                  loader=loader, trust_remote_code=trust_remote_code)
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir, str(model_path))
    model.eval()
    return model, processor


def evaluate(
    model,
    processor,
    records: Sequence[PreferenceRecord],
    out_dir: str | Path,
    *,
    reference: Any = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    max_length: int = 1024,
    beta: float = 0.1,
    seed: int = 0,
    train_records: Sequence[PreferenceRecord] | None = None,
    blank_baseline: bool = False,
) -> dict[str, dict]:
    """Answer every record greedily, score it, and write ``metrics.json`` and ``samples.jsonl``.

    ``train_records``: the majority baseline's source (None: the evaluated records, optimistic);
    ``blank_baseline``: also answer every prompt with grey images (:mod:`vlmtune.eval.baselines`).
    """
    records = list(records)
    if not records:
        raise VlmtuneError("no records to evaluate")
    answers, lengths = answer_all(model, processor, [(r.images, r.prompt) for r in records], max_new_tokens,
                                  batch_size, "answer")
    samples = [base_sample(r, a) for r, a in zip(records, answers)]
    metrics: dict[str, dict] = {}
    metrics.update(score_tasks(records, answers, samples, seed, lengths, max_new_tokens))
    text, text_rows = text_metrics(answers, [r.chosen for r in records], seed=seed)
    for sample, row in zip(samples, text_rows):
        sample.update(row)
    metrics.update(text)
    metrics.update(score_preferences(model, processor, records, samples, reference, batch_size, max_length, beta, seed))
    metrics.update(score_baselines(model, processor, records, samples, train_records, blank_baseline,
                                   batch_size, max_new_tokens, seed))
    write_results(out_dir, metrics, samples)
    return metrics


def answer_all(model, processor, items, max_new_tokens: int, batch_size: int, progress: str
               ) -> tuple[list[str], list[int]]:
    """Greedy answers and their lengths in new tokens (before the stop token); ``progress`` labels the bar."""
    from vlmtune.generate import answer_texts, generate_ids

    ids = generate_ids(model, processor, items, max_new_tokens, batch_size, progress=progress)
    return answer_texts(processor, ids), [len(row) for row in ids]


def base_sample(record: PreferenceRecord, answer: str) -> dict[str, Any]:
    return {
        "id": record.id,
        "image": record.images[0] if record.images else None,
        "images": list(record.images),
        "prompt": record.prompt_text(),
        "answer": answer,
        "chosen": record.chosen,
        "rejected": record.rejected,
        "gold_counts": None,
        "parsed_counts": None,
        "parsed_total": None,
        "correct": None,
        "class_hits": None,
        "parse_failure": None,
    }


def task_rows(records, answers, lengths=None, max_new_tokens: int | None = None) -> list[tuple[dict, dict] | None]:
    """Each record's ``(values, sample fields)`` from its task (:func:`vlmtune.eval.tasks.task_values`);
    None for a record with no task (it gets only the preference and text metrics).

    ``lengths`` are the answers' token counts; truncated = as long as ``max_new_tokens``.
    Without them (hand-written answers) there is no length or truncation metric.
    """
    rows: list[tuple[dict, dict] | None] = []
    for i, (record, answer) in enumerate(zip(records, answers)):
        if not has_task(record.metadata):
            rows.append(None)
            continue
        n = lengths[i] if lengths is not None else None
        try:
            truncated = None if n is None or max_new_tokens is None else n >= max_new_tokens
            values, fields = task_values(record.metadata, answer, n, truncated)
        except VlmtuneError as e:
            raise VlmtuneError(f"record {record.id}: {e}") from None
        rows.append((values, fields))
    return rows


def score_tasks(records, answers, samples, seed: int, lengths=None, max_new_tokens: int | None = None
                ) -> dict[str, dict]:
    """Task and counting metrics over the records that name a task; fills the samples' fields
    (and ``values``: the record's value of each metric, which the report pairs)."""
    rows = task_rows(records, answers, lengths, max_new_tokens)
    scored = []
    for sample, row in zip(samples, rows):
        if row is not None:
            sample.update(row[1], values=row[0])
            scored.append(row[0])
    skipped = rows.count(None)
    if skipped and scored:
        log.info("%d of %d records name no task (no metadata.task, no metadata.counts): they get only the "
                 "preference and text metrics", skipped, len(rows))
    return summarise(scored, seed=seed)


def score_baselines(model, processor, records, samples, train_records, blank: bool, batch_size: int,
                    max_new_tokens: int, seed: int) -> dict[str, dict]:
    """The majority-answer baseline, and with ``blank`` the blank-image one (``baseline/...``)."""
    if not any(s.get("values") for s in samples):
        return {}
    if train_records is None:
        log.info("majority baseline from the evaluated records themselves (no --train-data): optimistic")
    majority = majority_answers(train_records if train_records is not None else records)
    guesses = [majority_completion(r, majority) for r in records]
    metrics = baseline_metrics("majority", _summary(records, guesses, samples, "majority", seed),
                               MAJORITY_NOTES[train_records is not None])
    if blank:
        blind, _ = answer_all(model, processor, blank_items(records), max_new_tokens, batch_size,
                              "blank baseline")
        metrics.update(baseline_metrics("blank", _summary(records, blind, samples, "blank", seed)))
    return metrics


def _summary(records, answers, samples, name: str, seed: int) -> dict[str, dict]:
    """A baseline's answers scored like the model's; each sample keeps ``<name>_answer`` and its values."""
    rows = task_rows(records, answers)
    for sample, row, answer in zip(samples, rows, answers):
        if row is not None:
            sample[f"{name}_answer"] = answer
            sample["values"].update(baseline_metrics(name, row[0]))
    return summarise([row[0] for row in rows if row is not None], seed=seed)


def score_preferences(model, processor, records, samples, reference, batch_size: int, max_length: int,
                      beta: float, seed: int) -> dict[str, dict]:
    """Log-prob accuracy, and implicit-reward accuracy and margin against the reference."""
    policy_c, policy_r = plain_pair_logps_per_record(model, processor, records, batch_size, max_length, None,
                                                     "log-probs")
    context = reference_context(model, reference)
    ref_c = ref_r = None
    if context is not None:
        ref_model = reference if _is_module(reference) else model
        ref_c, ref_r = plain_pair_logps_per_record(ref_model, processor, records, batch_size, max_length, context,
                                                   "log-probs (reference)")
    for i, sample in enumerate(samples):
        sample.update(
            chosen_logp=policy_c[i], rejected_logp=policy_r[i],
            ref_chosen_logp=None if ref_c is None else ref_c[i],
            ref_rejected_logp=None if ref_r is None else ref_r[i],
        )
    metrics = {
        "logps/chosen": with_ci(policy_c, seed=seed),
        "logps/rejected": with_ci(policy_r, seed=seed),
        "logps/accuracy": with_ci([float(c > r) for c, r in zip(policy_c, policy_r)], seed=seed),
    }
    if ref_c is not None:
        chosen = [beta * (p - q) for p, q in zip(policy_c, ref_c)]
        rejected = [beta * (p - q) for p, q in zip(policy_r, ref_r)]
        metrics["rewards/chosen"] = with_ci(chosen, seed=seed)
        metrics["rewards/rejected"] = with_ci(rejected, seed=seed)
        metrics["rewards/accuracies"] = with_ci([float(c > r) for c, r in zip(chosen, rejected)], seed=seed)
        metrics["rewards/margins"] = with_ci([c - r for c, r in zip(chosen, rejected)], seed=seed)
    return metrics


def reference_context(model, reference: Any) -> Callable[[], Any] | None:
    """A zero-argument context factory for the reference pass, or None when there is no reference."""
    if reference is None:
        from peft import PeftModel

        return model.disable_adapter if isinstance(model, PeftModel) else None
    if _is_module(reference):
        return contextlib.nullcontext
    if callable(reference):
        return reference
    raise VlmtuneError(f"reference must be a model or a context factory, not {type(reference).__name__}")


def plain_pair_logps_per_record(
    model, processor, records, batch_size: int, max_length: int, context, progress: str = "log-probs"
) -> tuple[list[float], list[float]]:
    """Summed answer log-probs of chosen and rejected for every record (the plain forward, in batches,
    no grad), under a progress bar labelled ``progress``."""
    import torch

    from vlmtune.batch import encode_pairs
    from vlmtune.forward.plain import plain_pair_logps
    from vlmtune.progress import progress_bar

    device = next(model.parameters()).device
    chosen: list[float] = []
    rejected: list[float] = []
    bar = progress_bar(total=len(records), desc=progress)
    with bar, torch.inference_mode(), (context() if context else contextlib.nullcontext()):
        for start in range(0, len(records), batch_size):
            batch = encode_pairs(records[start : start + batch_size], processor, max_length).to(device)
            out = plain_pair_logps(model, batch)
            chosen.extend(out.chosen.tolist())
            rejected.extend(out.rejected.tolist())
            bar.update(len(out.chosen))
    return chosen, rejected


def write_results(out_dir: str | Path, metrics: dict[str, dict], samples: list[dict[str, Any]]) -> Path:
    """``metrics.json`` (NaN written as null) and ``samples.jsonl`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_finite(metrics), indent=2) + "\n")
    with open(out / "samples.jsonl", "w") as f:
        for sample in samples:
            f.write(json.dumps(_finite(sample)) + "\n")
    return out


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _is_module(x: Any) -> bool:
    import torch

    return isinstance(x, torch.nn.Module)
