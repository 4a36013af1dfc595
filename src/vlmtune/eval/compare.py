"""Compare a base model with tuned runs on the same records: one evaluation each, then one report.

    compare_models(base, tuned, data, out) -> Comparison

Each model is evaluated into ``out/<name>/`` (``metrics.json``, ``samples.jsonl``) by
``vlmtune.eval.run.evaluate``, one at a time so that only one model is in memory; then
``out/report.html`` and ``out/comparison.json`` compare every tuned model with the base (the
first), and ``Comparison.tables`` holds the accuracy tables by family / hops / OOD axis with the
baselines (:mod:`vlmtune.eval.breakdown`). A tuned run is a training run folder (its ``final/`` adapter goes on the base), an
adapter folder, or a merged export. Names and runs are checked before any model is loaded.
``vlmtune compare`` parses its flags and calls ``compare_models``.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.report.inputs import RunResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TunedRun:
    """How to load one ``--tuned`` folder: ``model_path`` None means the adapter goes on the base."""

    model_path: Path | None
    adapter: Path | None
    train_log: Path | None


@dataclass(frozen=True)
class Comparison:
    report: Path  # out/report.html
    summaries: list[str]  # one line per tuned model: "<name> vs <base>: exact match +x points [CI]"
    tables: str = ""  # accuracy by family / hops / OOD axis, every model and the baselines


def compare_models(base: str, tuned: list[str], data: str | Path, out: str | Path, *,
                   names: str | None = None, skip_bad: bool = False, batch_size: int = 16,
                   max_new_tokens: int = 64, dtype: str = "float32", seed: int = 0,
                   max_gallery: int | None = 200, title: str = "vlmtune: before / after",
                   loader: str = "transformers", trust_remote_code: bool = False,
                   train_data: str | Path | None = None, blank_baseline: bool = False) -> Comparison:
    """Evaluate ``base`` and every ``tuned`` run on the records of ``data``, write the report.

    ``names`` is ``--names`` (comma-separated labels, base first; see ``model_names``);
    ``max_gallery`` None or below 1 shows every record in the gallery. ``train_data`` is the
    majority baseline's source (None: ``data``, optimistic); ``blank_baseline`` answers with grey
    images too (every model; the tables show the base's).
    """
    from vlmtune.eval.breakdown import breakdown_tables
    from vlmtune.eval.tasks import check_task_records
    from vlmtune.data.load import load_records
    from vlmtune.report.html import write_report

    labels = model_names(tuned, names)
    runs = [resolve_run(Path(r)) for r in tuned]
    records = load_records(data, skip_bad=skip_bad)
    if not records:
        raise VlmtuneError(f"{data}: no records to evaluate")
    train_records = load_records(train_data, skip_bad=skip_bad, check_images=False) if train_data else None
    if train_data and not train_records:
        raise VlmtuneError(f"--train-data {train_data}: no records; the majority baseline needs the training answers")
    check_task_records(records, str(data))
    check_task_records(train_records or [], str(train_data))
    out = Path(out)
    settings = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "dtype": dtype, "seed": seed,
                "loader": loader, "trust_remote_code": trust_remote_code, "train_records": train_records,
                "blank_baseline": blank_baseline}
    results = [_evaluate_one(labels[0], base, TunedRun(None, None, None), records, out, settings)]
    for label, run in zip(labels[1:], runs):
        results.append(_evaluate_one(label, base, run, records, out, settings))
    gallery = max_gallery if max_gallery and max_gallery > 0 else None
    report = write_report(out, results, title=title, max_gallery=gallery, seed=seed)
    summary = json.loads((out / "comparison.json").read_text())
    tables = breakdown_tables([(r.name, json.loads((r.eval_dir / "metrics.json").read_text())) for r in results])
    return Comparison(report, [m["summary"] for m in summary["models"].values()], tables)


def model_names(tuned: list[str], names: str | None) -> list[str]:
    """Labels, base first: ``names`` split on commas, or ``base`` and each run's folder name.

    Labels name folders under ``out``, so they must differ and hold no slash.
    """
    if names:
        out = [n.strip() for n in names.split(",")]
        if len(out) != 1 + len(tuned) or not all(out):
            raise VlmtuneError(
                f"--names needs {1 + len(tuned)} non-empty labels (base first), got {names!r}"
            )
    else:
        out = ["base"]
        for run in tuned:
            name, k = Path(run).resolve().name, 2
            while name in out:
                name, k = f"{Path(run).resolve().name}-{k}", k + 1
            out.append(name)
    if len(set(out)) != len(out):
        raise VlmtuneError(f"--names must differ from each other, got {out}")
    for n in out:
        if n in (".", "..") or "/" in n or "\\" in n:
            raise VlmtuneError(f"--names: {n!r} is used as a folder name; pick one without slashes")
    return out


def resolve_run(run: Path) -> TunedRun:
    """How to load a ``--tuned`` folder, and its training log (``metrics.jsonl``) when it has one.

    A training run (``final/`` inside) or an adapter folder (``adapter_config.json``) goes on top
    of the base (``model_path`` None); a merged export (``config.json``) is loaded as is.
    """
    if not run.is_dir():
        raise VlmtuneError(f"--tuned {run}: no such folder")
    log_path = run / "metrics.jsonl"
    train_log = log_path if log_path.is_file() else None
    if (run / "final").is_dir() or (run / "adapter_config.json").is_file():
        return TunedRun(None, run, train_log)
    if (run / "config.json").is_file():
        return TunedRun(run, None, train_log)
    raise VlmtuneError(
        f"--tuned {run}: not a training run (no final/), an adapter (no adapter_config.json) "
        "or a merged export (no config.json)"
    )


def _evaluate_one(name: str, base: str, run: TunedRun, records, out: Path, settings: dict) -> RunResult:
    """Load one model, evaluate it into ``out/name``, and free it before the next is loaded."""
    from vlmtune.eval.run import evaluate, load_for_eval

    model_path = run.model_path or base
    what = f"{model_path}" + (f" + adapter {run.adapter}" if run.adapter else "")
    log.info("evaluating %s: %s on %d records", name, what, len(records))
    model, processor = load_for_eval(str(model_path), adapter=str(run.adapter) if run.adapter else None,
                                     dtype=settings["dtype"], loader=settings["loader"],
                                     trust_remote_code=settings["trust_remote_code"])
    eval_dir = out / name
    evaluate(model, processor, records, eval_dir, batch_size=settings["batch_size"],
             max_new_tokens=settings["max_new_tokens"], seed=settings["seed"],
             train_records=settings["train_records"], blank_baseline=settings["blank_baseline"])
    del model, processor
    gc.collect()
    return RunResult(name=name, eval_dir=eval_dir, train_log=run.train_log)
