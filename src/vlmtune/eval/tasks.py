"""Score one answer through its record's task, for evaluation: per-record values and sample fields.

Every record is scored by its own task (:func:`vlmtune.tasks.core.task_of`: ``metadata.task``, or
counting for records with only ``metadata.counts``), so a file that mixes families evaluates in
one run. :func:`task_values` gives one record's value of each metric (``None`` = not defined for
it); :func:`vlmtune.eval.metrics.summarise` turns the rows into means with bootstrap CIs.

Metric names (every one a mean over the records it is defined on):

- ``task/accuracy``: the task's accuracy of the answer (exact for numbers and verdicts, both
  counts and verdict for the compound form, IoU ≥ 0.5 for a box, matched IoU × min(1,
  gold/predicted) for a box list, every class right for counts), read strictly from the single
  answer block;
- ``family/<family>/accuracy``, ``hops/<n>/accuracy``, ``axis/<axis>/accuracy``: the same over
  the records of one family, hop count, or out-of-distribution axis (``metadata.task.axis``, else
  a split named ``ood_<axis>``; ``axis/iid`` for the records of no axis);
- ``family/<family>/<metric>``: the family's other per-answer metrics (``class_accuracy`` for
  counts, ``count_accuracy`` for box lists, ``acc@0.5`` and ``iou`` for grounding);
- ``task/format_rate``: the completion has the expected shape (``<think>`` with content then
  ``<answer>`` for think records, else the answer alone) and its answer block parses;
- ``task/answer_tokens``: generated tokens before the stop token;
- ``task/truncation_rate``: the answer hit ``max_new_tokens`` without a stop token;
- ``task/think_consistency`` (think records only; see :func:`think_conclusion`): the answer
  block states what the think block concluded.

Counting records (``metadata.counts``) also get today's counting metrics from the count task's
:meth:`part_values` (``exact_match``, ``accuracy/<cls>``, ...), read leniently as before, so
their numbers do not change; ``task/accuracy`` reads them strictly and can be lower.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Protocol, runtime_checkable

from vlmtune.errors import VlmtuneError
from vlmtune.tasks import answers
from vlmtune.tasks.core import answer_block, format_ok, task_meta, task_of

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_LAST_INT = re.compile(r"-?\d+")
_VERDICT_WORDS = re.compile(r"\b(more|fewer|same)\b", re.IGNORECASE)
_BOX_TEXT = re.compile(r"\[\s*-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?){3}\s*\]")


@runtime_checkable
class PartScorer(Protocol):
    """A task with metrics of its own parts (the count task: today's per-class metrics)."""

    def part_values(self, completion: str, metadata: Mapping[str, Any]) -> tuple[dict, dict]: ...


def axis_of(metadata: Mapping[str, Any]) -> str:
    """The record's out-of-distribution axis, or ``iid``."""
    meta = metadata.get("task")
    axis = meta.get("axis") if isinstance(meta, Mapping) else None
    split = str(metadata.get("split") or "")
    if not axis and split.startswith("ood_"):
        axis = split[len("ood_"):]
    return str(axis) if axis else "iid"


def question_type(meta: Mapping[str, Any]) -> str:
    """``family:op>op>...``: the family and its program's operations without their arguments
    (CLEVR's question type; the majority baseline answers per type)."""
    ops = [str(step.get("op")) for step in meta.get("program") or [] if isinstance(step, Mapping)]
    return f"{meta.get('family', '?')}:{'>'.join(ops)}"


def think_conclusion(think: str, kind: str) -> str | None:
    """What a think block concludes, as answer text: its last integer (kinds ``integer``), its
    last verdict word (``verdict``, ``compound``: only the verdict is compared), its last
    ``[x0, y0, x1, y1]`` (``box``); None when it states none or the kind has no single conclusion
    (box lists, counts)."""
    pattern = {"integer": _LAST_INT, "verdict": _VERDICT_WORDS, "compound": _VERDICT_WORDS, "box": _BOX_TEXT}.get(kind)
    found = pattern.findall(think) if pattern else []
    return found[-1] if found else None


def think_consistent(completion: str, meta: Mapping[str, Any]) -> float | None:
    """1.0 when the answer block states the think block's conclusion, 0.0 when not; None when
    not defined (no think record, no readable answer, or a think block that concludes nothing).

    Both sides are parsed by the answer kind, so "3" and "three" agree; a compound answer agrees
    when its verdict is the last verdict word of the think block.
    """
    if not meta.get("think"):
        return None
    kind, extra = meta["kind"], meta.get("extra") or {}
    pred = answers.completion_answer(completion, meta)
    think = _THINK.search(completion or "")
    if pred is None or think is None:
        return None
    conclusion = think_conclusion(think[1], kind)
    if conclusion is None:
        return None
    if kind == "compound":
        return float(conclusion.lower() == pred[2])
    return float(answers.parse(kind, conclusion, extra) == pred)


def task_values(metadata: Mapping[str, Any], completion: str, n_tokens: int | None = None,
                truncated: bool | None = None) -> tuple[dict[str, float | None], dict[str, Any]]:
    """One record's metric values and its sample fields (family, hops, axis, gold text, correct).

    ``n_tokens`` and ``truncated`` describe the generation (None: not known, no such metric).

    ``correct`` (the report's right/wrong) is accuracy 1.0, or 0.5 and above for a box list
    (matched IoU, never exactly 1 for a good answer); a counting record keeps today's lenient
    exact match.
    """
    try:
        return _task_values(metadata, completion, n_tokens, truncated)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        reason = f"missing {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise VlmtuneError(
            f"its metadata.task cannot be scored ({reason}); a task record needs family, kind and "
            "answer as `vlmtune data tasks` writes them: rebuild the file or fix the record"
        ) from None


def _task_values(metadata, completion, n_tokens, truncated):
    task, meta = task_of(metadata), task_meta(metadata)
    family, hops, axis = str(meta.get("family", "?")), meta.get("hops", 1), axis_of(metadata)
    per_answer = dict(task.metrics(completion, meta))
    accuracy = per_answer.pop("accuracy", None)
    if accuracy is None:
        accuracy = task.score(completion, meta)
    parsed = per_answer.pop("parsed", None)
    think = bool(meta.get("think"))
    if parsed is None:
        parsed = float(answer_block(completion, think) is not None)
    values: dict[str, float | None] = {}
    fields: dict[str, Any] = {}
    if isinstance(metadata.get("counts"), Mapping) and isinstance(task, PartScorer):
        values, fields = task.part_values(completion, metadata)
    values.update({
        "task/accuracy": accuracy,
        f"family/{family}/accuracy": accuracy,
        f"hops/{hops}/accuracy": accuracy,
        f"axis/{axis}/accuracy": accuracy,
        "task/format_rate": float(bool(parsed) and format_ok(completion, think)),
        "task/answer_tokens": None if n_tokens is None else float(n_tokens),
        "task/truncation_rate": None if truncated is None else float(truncated),
        "task/think_consistency": think_consistent(completion, meta) if meta.get("kind") in answers.KINDS else None,
    })
    values.update({f"family/{family}/{name}": v for name, v in per_answer.items()})
    own = {"family": family, "hops": hops, "axis": axis, "question_type": question_type(meta),
           "task_accuracy": accuracy, "correct": accuracy >= (0.5 if meta.get("kind") == "boxes" else 1.0),
           "gold_text": gold_text(meta)}
    return values, {**own, **fields}


def check_task_records(records, source: str) -> None:
    """Fail early, naming the file and record, when a record that names a task cannot be scored
    (an unknown family, a ``metadata.task`` without kind or answer): its gold answer is scored."""
    for record in records:
        if has_task(record.metadata):
            try:
                task_values(record.metadata, record.chosen)
            except VlmtuneError as e:
                raise VlmtuneError(f"{source}: record {record.id}: {e}") from None


def has_task(metadata: Mapping[str, Any]) -> bool:
    """Whether a record names its task (``metadata.task.family``) or carries counting gold."""
    meta = metadata.get("task")
    return (isinstance(meta, Mapping) and bool(meta.get("family"))) or isinstance(metadata.get("counts"), Mapping)


def gold_text(meta: Mapping[str, Any]) -> str | None:
    """The canonical text of the gold answer (None for a task outside the built-in answer kinds)."""
    if meta.get("kind") not in answers.KINDS:
        return None
    return answers.render(meta["kind"], meta["answer"], meta.get("extra") or {})
