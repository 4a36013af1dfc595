"""Reward functions for GRPO, in TRL's shape: ``fn(completions, **kwargs) -> list[float]``.

Thin wrappers over :mod:`vlmrl.tasks.counting`, so a reward reads an answer exactly as the
evaluator does. ``completions`` are strings or TRL conversational completions (a list of
messages whose last one is the assistant's). Gold counts arrive as the ``counts`` column: one
dict per completion, ``{"car": 2, "bus": 0, ...}``; the task's classes are the dict's keys in
order, so a data set with other classes needs no extra argument.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Sequence

from vlmrl.tasks.counting import DEFAULT_CLASSES, CountingTask


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


@lru_cache(maxsize=64)
def _task(classes: tuple[str, ...]) -> CountingTask:
    return CountingTask(classes)


def _scores(completions: Sequence[Any], counts: Sequence[Mapping[str, int]]):
    if len(completions) != len(counts):
        raise ValueError(f"{len(completions)} completions but {len(counts)} gold counts")
    for completion, gold in zip(completions, counts):
        task = _task(tuple(gold))
        yield task.score(task.parse(completion_text(completion)), gold)


def count_exact_reward(completions, counts, **kwargs) -> list[float]:
    """1.0 when every class's count is right, else 0.0.

    >>> count_exact_reward(
    ...     ["There are 2 cars, 0 buses in the image.", "There are 2 cars, 1 bus."],
    ...     counts=[{"car": 2, "bus": 0}, {"car": 2, "bus": 0}])
    [1.0, 0.0]
    """
    return [1.0 if s.exact else 0.0 for s in _scores(completions, counts)]


def count_partial_reward(completions, counts, **kwargs) -> list[float]:
    """Fraction of classes counted right: partial credit that still rewards a near miss.

    >>> count_partial_reward(
    ...     [[{"role": "assistant", "content": "3 cars and no buses"}], "two buses"],
    ...     counts=[{"car": 2, "bus": 0}, {"car": 2, "bus": 2}])
    [0.5, 0.5]
    """
    return [s.class_accuracy for s in _scores(completions, counts)]


def count_format_reward(completions, counts=None, **kwargs) -> list[float]:
    """1.0 when the answer parses and names every class (zeros included), else 0.0.

    The classes come from the gold ``counts`` when given, else the default task's.

    >>> count_format_reward(["There are 1 car, 0 motorcycles, 2 buses, 0 bicycles in the image.",
    ...                      "There are 3 vehicles."])
    [1.0, 0.0]
    """
    classes = [tuple(gold) for gold in counts] if counts else [DEFAULT_CLASSES] * len(completions)
    rewards = []
    for completion, cls in zip(completions, classes):
        parsed = _task(cls).parse(completion_text(completion))
        rewards.append(1.0 if parsed.mentions_every_class else 0.0)
    return rewards
