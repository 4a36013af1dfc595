"""Evaluate a model on preference records: answer, score, attach CIs, write metrics and samples.

The entry points (``compare`` and ``vlmrl eval`` both call these)::

    load_for_eval(model_path, adapter=None, dtype="float32", min_pixels=None, max_pixels=None,
                  loader="transformers", trust_remote_code=False) -> (model, processor)
        model_path: a base checkpoint or a merged export (None: the adapter's base model);
        adapter: a training run folder (its ``final/`` peft adapter) or an adapter folder,
        refused if it does not fit the model (``vlmrl.models.adapters``).
        Returns the model in eval mode; with an adapter it is a ``PeftModel``, whose adapter
        switched off is the reference.

    evaluate(model, processor, records, out_dir, *, reference=None, batch_size=16,
             max_new_tokens=64, max_length=1024, beta=0.1, seed=0) -> dict
        records: list[PreferenceRecord]. reference: None (a PeftModel's adapter switched off;
        for a plain model no implicit-reward metrics), a model, or a zero-argument callable
        returning a context manager inside which ``model`` acts as the reference.
        Writes ``out_dir/metrics.json`` ({metric: {value, ci_low, ci_high, n}}) and
        ``out_dir/samples.jsonl`` (one row per record) and returns the metrics dict.

Metric names. Counting (records with ``metadata["counts"]``): ``exact_match``,
``class_accuracy``, ``accuracy/<cls>``, ``abs_error/<cls>``, ``total_accuracy``,
``total_abs_error``, ``parse_failure``. Preference (TRL's names): ``logps/chosen``,
``logps/rejected``, ``logps/accuracy`` (chosen more likely than rejected), and with a reference
``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins`` (implicit
reward ``beta * (log pi - log ref)``, Rafailov et al. 2023 eq. 5). Text, answer against the
chosen text: ``text/bleu`` (corpus), ``text/sentence_bleu``, ``text/rouge_l``.

``samples.jsonl`` rows: ``id``, ``image`` (first image path), ``images``, ``prompt`` (text),
``answer``, ``chosen``, ``rejected``, ``gold_counts``, ``parsed_counts``, ``parsed_total``,
``correct`` (exact match), ``class_hits``, ``parse_failure``, ``chosen_logp``,
``rejected_logp``, ``ref_chosen_logp``, ``ref_rejected_logp`` (null when not computed),
``bleu``, ``rouge_l``.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from vlmrl.data.records import PreferenceRecord
from vlmrl.errors import VlmrlError
from vlmrl.eval.metrics import count_values, summarise, text_metrics, with_ci
from vlmrl.tasks.counting import DEFAULT_CLASSES, CountingTask


def load_for_eval(model_path: str | Path | None, adapter: str | Path | None = None, dtype: str = "float32",
                  min_pixels: int | None = None, max_pixels: int | None = None, loader: str = "transformers",
                  trust_remote_code: bool = False):
    """``(model, processor)`` ready to evaluate: a base or merged model, or a base with an adapter.

    The adapter is checked against the model before it is put on (``vlmrl.models.adapters``).
    """
    from vlmrl.models.adapters import adapter_base, find_adapter, load_adapter
    from vlmrl.models.load import load_model

    adapter_dir = find_adapter(adapter) if adapter else None
    if model_path is None:
        if adapter_dir is None:
            raise VlmrlError("give a model (--model) or an adapter whose config names its base model")
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
) -> dict[str, dict]:
    """Answer every record greedily, score it, and write ``metrics.json`` and ``samples.jsonl``."""
    from vlmrl.generate import generate

    records = list(records)
    if not records:
        raise VlmrlError("no records to evaluate")
    answers = generate(model, processor, [(r.images, r.prompt) for r in records], max_new_tokens, batch_size)
    samples = [base_sample(r, a) for r, a in zip(records, answers)]
    metrics: dict[str, dict] = {}
    metrics.update(score_counts(records, answers, samples, seed))
    text, text_rows = text_metrics(answers, [r.chosen for r in records], seed=seed)
    for sample, row in zip(samples, text_rows):
        sample.update(row)
    metrics.update(text)
    metrics.update(score_preferences(model, processor, records, samples, reference, batch_size, max_length, beta, seed))
    write_results(out_dir, metrics, samples)
    return metrics


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


def task_for(record: PreferenceRecord, cache: dict[tuple[str, ...], CountingTask]) -> CountingTask:
    """The counting task of a record's classes (``metadata["classes"]``, else the gold's keys)."""
    classes = tuple(record.metadata.get("classes") or record.metadata["counts"].keys() or DEFAULT_CLASSES)
    if classes not in cache:
        cache[classes] = CountingTask(classes)
    return cache[classes]


def score_counts(records, answers, samples, seed: int) -> dict[str, dict]:
    """Counting metrics over the records that carry gold counts; fills the samples' count fields."""
    tasks: dict[tuple[str, ...], CountingTask] = {}
    rows = []
    for record, answer, sample in zip(records, answers, samples):
        gold = record.metadata.get("counts")
        if not isinstance(gold, dict):
            continue
        task = task_for(record, tasks)
        parsed = task.parse(answer)
        score = task.score(parsed, gold)
        sample.update(
            gold_counts={c: int(gold.get(c, 0)) for c in task.classes},
            parsed_counts=parsed.counts,
            parsed_total=parsed.total,
            correct=score.exact,
            class_hits=score.hits,
            parse_failure=score.parse_failure,
        )
        rows.append(count_values(score))
    return summarise(rows, seed=seed)


def score_preferences(model, processor, records, samples, reference, batch_size: int, max_length: int,
                      beta: float, seed: int) -> dict[str, dict]:
    """Log-prob accuracy, and implicit-reward accuracy and margin against the reference."""
    policy_c, policy_r = plain_pair_logps_per_record(model, processor, records, batch_size, max_length, None)
    context = reference_context(model, reference)
    ref_c = ref_r = None
    if context is not None:
        ref_model = reference if _is_module(reference) else model
        ref_c, ref_r = plain_pair_logps_per_record(ref_model, processor, records, batch_size, max_length, context)
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
    raise VlmrlError(f"reference must be a model or a context factory, not {type(reference).__name__}")


def plain_pair_logps_per_record(
    model, processor, records, batch_size: int, max_length: int, context
) -> tuple[list[float], list[float]]:
    """Summed answer log-probs of chosen and rejected for every record (the plain forward, in batches, no grad)."""
    import torch

    from vlmrl.batch import encode_pairs
    from vlmrl.forward.plain import plain_pair_logps

    device = next(model.parameters()).device
    chosen: list[float] = []
    rejected: list[float] = []
    with torch.inference_mode(), (context() if context else contextlib.nullcontext()):
        for start in range(0, len(records), batch_size):
            batch = encode_pairs(records[start : start + batch_size], processor, max_length).to(device)
            out = plain_pair_logps(model, batch)
            chosen.extend(out.chosen.tolist())
            rejected.extend(out.rejected.tolist())
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
