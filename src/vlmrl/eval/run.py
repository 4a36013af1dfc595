"""Evaluate a model on preference records: answer, score, attach CIs, write metrics and samples.

The entry points (``compare`` and ``vlmrl eval`` both call these)::

    load_for_eval(model_path, adapter=None, dtype="float32") -> (model, processor)
        model_path: a base checkpoint or a merged export; adapter: a training run folder (its
        ``final/`` peft adapter is loaded) or an adapter folder itself. Returns the model in eval
        mode; with an adapter it is a ``PeftModel`` whose adapter can be disabled for a reference.

    evaluate(model, processor, records, out_dir, *, reference=None, batch_size=16,
             max_new_tokens=64, max_length=1024, task=None, seed=0) -> dict
        records: list[PreferenceRecord]. reference: None (a PeftModel's adapter switched off, or
        no implicit-reward metrics for a plain model), a model, or a zero-argument callable that
        returns a context manager inside which ``model`` acts as the reference.
        Writes ``out_dir/metrics.json`` ({metric: {value, ci_low, ci_high, n}}) and
        ``out_dir/samples.jsonl`` (one row per record) and returns the metrics dict.

Metric names: ``count/exact``, ``count/class_acc/<cls>``, ``count/class_mae/<cls>``,
``count/total_acc``, ``count/total_mae``, ``count/parse_failure``, ``pref/logp_accuracy``,
``pref/reward_accuracy``, ``pref/reward_margin``, ``text/bleu``, ``text/sentence_bleu``,
``text/rouge_l``.

``samples.jsonl`` rows: ``id``, ``image`` (first image path), ``prompt`` (text), ``answer``,
``chosen``, ``gold_counts``, ``parsed_counts``, ``exact``, ``class_hits``, ``parse_failure``,
``chosen_logp``, ``rejected_logp``, ``ref_chosen_logp``, ``ref_rejected_logp`` (null when not
computed), ``bleu``, ``rouge_l``.
"""

from __future__ import annotations
