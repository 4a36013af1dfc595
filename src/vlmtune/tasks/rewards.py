"""Task rewards in TRL's shape, ``fn(completions, metadata, **kwargs) -> list[float]``, for any family.

Each reward asks the record's task (:func:`vlmtune.tasks.core.task_of`, from ``metadata.task``,
or counting for records with only ``metadata.counts``) and reads only the single answer block
(:func:`vlmtune.tasks.core.answer_block`). The GRPO step passes ``metadata`` per completion.

- ``task_accuracy``: the family's score: exact for numbers and verdicts, IoU for a box, matched
  IoU × min(1, gold/predicted) for a box list, exact counts for the count family;
- ``task_accuracy_iou2``: the same with IoU² for a single box (sharper near a perfect box);
- ``task_format``: a small 0.1 when the completion has the expected shape (``<think>`` with
  content then ``<answer>`` for ``--think`` records, the answer alone otherwise) and its answer
  block parses, else 0. Logged apart from accuracy, it shows "format rises, accuracy flat".
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from vlmtune.rewards import completion_text
from vlmtune.tasks import answers
from vlmtune.tasks.core import format_ok, task_meta, task_of

FORMAT_REWARD = 0.1


def _pairs(completions: Sequence[Any], metadata: Sequence[Mapping[str, Any]]):
    if len(completions) != len(metadata):
        raise ValueError(f"{len(completions)} completions but {len(metadata)} metadata entries")
    for completion, meta in zip(completions, metadata):
        yield completion_text(completion), meta


def task_accuracy_reward(completions, metadata, **kwargs) -> list[float]:
    """The record's task's score of each completion, from its single answer block.

    >>> meta = {"task": {"family": "spatial", "kind": "integer", "answer": 2, "think": True}}
    >>> task_accuracy_reward(["<think>1 then 1</think><answer>2</answer>", "<think>2</think>"], [meta, meta])
    [1.0, 0.0]
    """
    return [task_of(meta).score(text, task_meta(meta)) for text, meta in _pairs(completions, metadata)]


def task_accuracy_iou2_reward(completions, metadata, **kwargs) -> list[float]:
    """As :func:`task_accuracy_reward`, with IoU² for single boxes.

    >>> meta = {"task": {"family": "grounding", "kind": "box", "answer": [0, 0, 2, 2], "think": False}}
    >>> task_accuracy_iou2_reward(["[1, 0, 3, 2]"], [meta])
    [0.1111111111111111]
    """
    return [task_of(meta).score(text, task_meta(meta), iou_power=2.0) for text, meta in _pairs(completions, metadata)]


def task_format_reward(completions, metadata, **kwargs) -> list[float]:
    """0.1 for the expected shape with a readable answer block, else 0.0.

    >>> meta = {"task": {"family": "compare", "kind": "verdict", "answer": "more", "think": True}}
    >>> task_format_reward(["<think>3 against 1</think><answer>fewer</answer>", "fewer"], [meta, meta])
    [0.1, 0.0]
    """
    rewards = []
    for text, meta in _pairs(completions, metadata):
        entry = task_meta(meta)
        ok = format_ok(text, bool(entry.get("think"))) and answers.completion_answer(text, entry) is not None
        rewards.append(FORMAT_REWARD if ok else 0.0)
    return rewards


TASK_REWARDS = {
    "task_accuracy": task_accuracy_reward,
    "task_accuracy_iou2": task_accuracy_iou2_reward,
    "task_format": task_format_reward,
}
