"""Read what evaluation and training left on disk, for the report.

An evaluation folder holds ``metrics.json`` (metric -> ``{value, ci_low, ci_high, n}``) and
``samples.jsonl`` (one row per record: id, image, prompt, answer, gold and parsed counts,
correct flags, the task family and the record's value of each metric). A training run holds ``metrics.jsonl``: one JSON object per logged step.
Nothing here computes a statistic; it only reads, checks and names what it read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError
from vlmtune.jsonl import read_jsonl


@dataclass(frozen=True)
class RunResult:
    """One model to show in the report.

    ``name`` labels it everywhere; ``eval_dir`` is the folder that ``vlmtune.eval.run.evaluate``
    wrote; ``train_log`` is the run's ``metrics.jsonl`` (``None`` for the base model or an
    export without its log). The first ``RunResult`` given to the report is the baseline.
    """

    name: str
    eval_dir: Path
    train_log: Path | None = None


@dataclass(frozen=True)
class Sample:
    """One evaluated record, reduced to what the report shows and compares."""

    id: str
    image: str | None
    prompt: str
    answer: str
    gold: dict[str, int]
    parsed: dict[str, int | None]
    correct: bool | None  # right or wrong (counting: exact match); None for a record without a task
    row: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def family(self) -> str | None:
        """The record's task family (``count`` for a counting row written before tasks), or None."""
        family = self.row.get("family")
        if isinstance(family, str):
            return family
        return "count" if self.gold else None

    def class_hits(self) -> dict[str, bool]:
        """Class -> counted right; the evaluator's own flags when the row has them."""
        flags = self.row.get("class_hits")
        if isinstance(flags, dict):
            return {c: bool(flags.get(c)) for c in self.gold}
        return {c: self.parsed.get(c) == g for c, g in self.gold.items()}

    def total_error(self) -> int | None:
        """|predicted total - gold total|: the row's stated total if it has one, else the sum of
        the mentioned classes; ``None`` when nothing was parsed."""
        stated = self.row.get("parsed_total")
        if isinstance(stated, int) and not isinstance(stated, bool):
            return abs(stated - sum(self.gold.values()))
        mentioned = [self.parsed.get(c) for c in self.gold if self.parsed.get(c) is not None]
        if not mentioned:
            return None
        return abs(sum(mentioned) - sum(self.gold.values()))


@dataclass(frozen=True)
class EvalResult:
    name: str
    metrics: dict[str, dict[str, float]]
    samples: list[Sample]
    train_log: list[dict[str, Any]]


def load_run(run: RunResult) -> EvalResult:
    eval_dir = Path(run.eval_dir)
    return EvalResult(
        name=run.name,
        metrics=read_metrics(eval_dir / "metrics.json"),
        samples=read_samples(eval_dir / "samples.jsonl"),
        train_log=read_train_log(run.train_log) if run.train_log else [],
    )


def read_metrics(path: Path) -> dict[str, dict[str, float]]:
    """``metrics.json``: every metric with a numeric ``value`` (CI bounds may be null)."""
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise VlmtuneError(f"{path}: expected a JSON object of metric -> {{value, ci_low, ci_high, n}}")
    metrics = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or not _is_number(entry.get("value")):
            raise VlmtuneError(
                f"{path}: metric {name!r} has no numeric 'value'; re-run the evaluation that wrote it"
            )
        metrics[name] = {
            "value": float(entry["value"]),
            "ci_low": _float_or_nan(entry.get("ci_low")),
            "ci_high": _float_or_nan(entry.get("ci_high")),
            "n": entry.get("n"),
        }
        if isinstance(entry.get("note"), str):  # a baseline says where its answers come from
            metrics[name]["note"] = entry["note"]
    return metrics


def read_samples(path: Path) -> list[Sample]:
    """``samples.jsonl`` rows as :class:`Sample`; a row without id, answer or gold counts is an error."""
    rows = _read_jsonl(path)
    samples = []
    for line_no, row in rows:
        try:
            samples.append(_sample(row))
        except (KeyError, TypeError, ValueError) as e:
            raise VlmtuneError(
                f"{path}, line {line_no}: not an evaluation sample ({e}); "
                "expected id, answer, gold counts, parsed counts and a correct flag"
            ) from None
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise VlmtuneError(f"{path}: sample ids repeat; each evaluated record needs its own id")
    return samples


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl``: the rows in order (train rows and ``eval/...`` rows mixed)."""
    return [row for _, row in _read_jsonl(Path(path))]


def _sample(row: dict[str, Any]) -> Sample:
    """A row as a Sample; a record without gold counts has ``gold == {}``, and one without a
    boolean ``correct`` (no task) ``correct is None``."""
    gold_raw = row.get("gold_counts", row.get("gold")) or {}
    gold = {str(c): int(v) for c, v in gold_raw.items()}
    parsed_raw = row.get("parsed_counts", row.get("parsed")) or {}
    parsed = {str(c): (None if v is None else int(v)) for c, v in parsed_raw.items()}
    image = row.get("image")
    if image is None and row.get("images"):
        image = row["images"][0]
    correct = row.get("correct", row.get("exact"))
    if gold and not isinstance(correct, bool):
        raise ValueError("gold counts but no boolean 'correct' flag")
    if "values" in row and not isinstance(row["values"], dict):
        raise ValueError("'values' is not an object of metric -> value")
    return Sample(
        id=str(row["id"]),
        image=str(image) if image else None,
        prompt=_prompt_text(row.get("prompt", "")),
        answer=str(row["answer"]),
        gold=gold,
        parsed=parsed,
        correct=correct if isinstance(correct, bool) else None,
        row=row,
    )


def _prompt_text(prompt: Any) -> str:
    """A prompt as display text: a string as is, chat messages as their text parts."""
    if isinstance(prompt, str):
        return prompt
    pieces = []
    for message in prompt or []:
        content = message.get("content") if isinstance(message, dict) else message
        if isinstance(content, str):
            pieces.append(content)
            continue
        for part in content or []:
            if isinstance(part, dict) and part.get("type") == "text":
                pieces.append(part.get("text", ""))
    return " ".join(p.strip() for p in pieces if p.strip())


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise VlmtuneError(f"{path} is missing; run `vlmtune evaluate` (or `vlmtune compare`) to write it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VlmtuneError(f"{path}: not valid JSON ({e})") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise VlmtuneError(f"{path} is missing; it is written by evaluation or training")
    return read_jsonl(path)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _float_or_nan(x: Any) -> float:
    return float(x) if _is_number(x) else math.nan
