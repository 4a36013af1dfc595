"""Reward functions for GRPO in TRL's shape, ``fn(completions, **kwargs) -> list[float]``: reading a
completion, and the reward names of configs written before tasks existed.

The built-in rewards are the task rewards of :mod:`vlmtune.tasks.rewards` (``task_accuracy``,
``task_accuracy_iou2``, ``task_format``): each asks the record's task (``metadata`` column) and
reads only the completion's single answer block. The older names stay valid in configs and are
the same task rewards, on count-family records and on any other:

- ``count_exact``: ``task_accuracy`` (on a count record, 1.0 when every class's count is right);
- ``count_partial``: the task's partial credit, ``class_accuracy`` where the task has one (the share
  of classes counted right), else its accuracy;
- ``count_format``: 1.0 where ``task_format`` pays (its 0.1 scaled to 1, the scale the old
  ``count_format`` had, so that old configs' weights keep their meaning), else 0.0.

Each reads the ``metadata`` column; called as before with only ``counts`` (one dict of gold counts
per completion), the records are the count records those counts describe. ``completions`` are
strings or TRL conversational completions (a list of messages whose last one is the assistant's).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from vlmtune.tasks.core import task_meta, task_of


def completion_text(completion: Any) -> str:
    """The answer text of a completion: a string, or the last message of a TRL message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        content = completion.get("content", "")
    elif completion:
        content = completion[-1].get("content", "")
    else:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content if part.get("type") == "text")


def _metadata(completions: Sequence[Any], counts, metadata) -> list[Mapping[str, Any]]:
    """Each completion's record metadata: the ``metadata`` column, or records made of ``counts``."""
    found = metadata if metadata is not None else [{"counts": c} for c in counts or []]
    if len(found) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(found)} metadata entries (or gold counts)")
    return list(found)


def count_exact_reward(completions, counts=None, metadata=None, **kwargs) -> list[float]:
    """``task_accuracy`` under its old name; on count records, 1.0 when every class's count is right.

    >>> count_exact_reward(
    ...     ["There are 2 cars, 0 buses in the image.", "There are 2 cars, 1 bus."],
    ...     counts=[{"car": 2, "bus": 0}, {"car": 2, "bus": 0}])
    [1.0, 0.0]
    """
    from vlmtune.tasks.rewards import task_accuracy_reward

    return task_accuracy_reward(completions, _metadata(completions, counts, metadata))


def count_partial_reward(completions, counts=None, metadata=None, **kwargs) -> list[float]:
    """The task's partial credit: on count records, the fraction of classes counted right.

    >>> count_partial_reward(
    ...     [[{"role": "assistant", "content": "3 cars and no buses"}], "two buses"],
    ...     counts=[{"car": 2, "bus": 0}, {"car": 2, "bus": 2}])
    [0.5, 0.5]
    """
    rewards = []
    for completion, meta in zip(completions, _metadata(completions, counts, metadata)):
        metrics = task_of(meta).metrics(completion_text(completion), task_meta(meta))
        rewards.append(metrics.get("class_accuracy", metrics["accuracy"]))
    return rewards


def count_format_reward(completions, counts=None, metadata=None, **kwargs) -> list[float]:
    """1.0 where ``task_format`` pays (the expected shape, an answer block that parses), else 0.0.

    >>> count_format_reward(["There are 1 car, 0 motorcycles, 2 buses, 0 bicycles in the image.", "I see cars."],
    ...                     counts=[{"car": 1, "motorcycle": 0, "bus": 2, "bicycle": 0}] * 2)
    [1.0, 0.0]
    """
    from vlmtune.tasks.rewards import task_format_reward

    return [1.0 if r > 0 else 0.0 for r in task_format_reward(completions, _metadata(completions, counts, metadata))]
