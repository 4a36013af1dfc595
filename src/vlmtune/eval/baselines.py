"""The two baselines printed beside a model: the majority answer per question type, and the model
shown a blank image.

- **Majority answer** (the "Q-type mode" baseline of CLEVR, Johnson et al. 2017): for each
  question type (:func:`vlmtune.eval.tasks.question_type`: family and program operations) the most
  common gold answer text, counted once per question (records that share image and question
  count once), ties broken by the text's order. Computed from the training file when one is
  given; from the evaluated records otherwise, which is optimistic (it has seen the test
  answers). A question type the source never saw gets an empty answer, which scores 0. The
  answer is written as the record asks (inside ``<think></think><answer>…</answer>`` for think
  records) and scored by the record's own task.
- **Blank image**: the same prompts with every image replaced by a uniform grey
  (:data:`GREY`) image of the same size. A task the model solves as well blind is not visual.

Each baseline is scored per record by :func:`vlmtune.eval.tasks.task_values`; its metrics are
the model's names under ``baseline/majority/`` and ``baseline/blank/``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Sequence

from vlmtune.data.records import PreferenceRecord
from vlmtune.eval.tasks import gold_text, question_type
from vlmtune.tasks.core import render_completion, task_meta

GREY = (128, 128, 128)
GROUPS = ("family", "hops", "axis")
MAJORITY_NOTES = {True: "from the training file", False: "from the evaluated data itself: optimistic"}


def majority_answers(records: Sequence[PreferenceRecord]) -> dict[str, str]:
    """Question type -> its most common gold answer text, one vote per distinct question."""
    votes: dict[str, Counter] = defaultdict(Counter)
    seen: set[tuple] = set()
    for record in records:
        meta = task_meta(record.metadata)
        text = gold_text(meta)
        key = (tuple(record.images), str(meta.get("question") or record.prompt_text()))
        if text is None or key in seen:
            continue
        seen.add(key)
        votes[question_type(meta)][text] += 1
    return {qtype: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for qtype, c in votes.items()}


def majority_completion(record: PreferenceRecord, majority: dict[str, str]) -> str:
    """The majority answer of the record's question type, written as the record asks for it."""
    meta = task_meta(record.metadata)
    text = majority.get(question_type(meta), "")
    return render_completion(text, [], bool(meta.get("think"))) if text else ""


def blank_items(records: Sequence[PreferenceRecord]) -> list[tuple[list[Any], list[dict]]]:
    """``(images, prompt)`` per record with each image a grey one of the same size."""
    from PIL import Image

    from vlmtune.batch import open_image

    greys: dict[tuple[int, int], Any] = {}
    items = []
    for record in records:
        images = []
        for path in record.images:
            size = open_image(path, f"record {record.id}").size
            if size not in greys:
                greys[size] = Image.new("RGB", size, GREY)
            images.append(greys[size])
        items.append((images, record.prompt))
    return items


def baseline_metrics(name: str, summary: dict[str, Any], note: str | None = None) -> dict[str, Any]:
    """A baseline's accuracies (overall, per family, hop count and axis) renamed
    ``baseline/<name>/<metric>``; ``note`` (where its answers come from) goes in every entry."""
    out = {f"baseline/{name}/{k}": v for k, v in summary.items() if is_accuracy(k)}
    if note:
        out = {k: {**v, "note": note} for k, v in out.items()}
    return out


def is_accuracy(metric: str) -> bool:
    """``task/accuracy`` or the accuracy of one family, hop count or OOD axis."""
    parts = metric.split("/")
    return metric == "task/accuracy" or (len(parts) == 3 and parts[0] in GROUPS and parts[2] == "accuracy")
