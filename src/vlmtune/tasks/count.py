"""The count family: today's counting task (every class, one sentence) through the task interface.

The question and answers are those of :mod:`vlmtune.data.pairs` (its prompts, the canonical
sentence of :class:`~vlmtune.tasks.counting.CountingTask`, its rejected-answer strategies), so a
count record built by ``vlmtune data tasks`` is the record ``vlmtune data from-detections`` writes,
with ``metadata.task`` added. Scoring is :class:`CountingTask`'s exact match, read strictly from
the single answer block (see :mod:`vlmtune.tasks.answers`, kind ``counts``).
"""

from __future__ import annotations

import random
from typing import Any, Mapping

from vlmtune.tasks.base import ProgramTask
from vlmtune.tasks.core import Negative, Question, Scene


class CountFamily(ProgramTask):
    family = "count"
    kinds = ("counts",)

    def questions(self, scene: Scene, rng: random.Random) -> list[Question]:
        from vlmtune.data.pairs import prompt_text
        from vlmtune.tasks.counting import CountingTask

        text = prompt_text(CountingTask(scene.classes), rng)
        program = [{"op": "count_each", "classes": list(scene.classes)}]
        return [self.make("counts", text, program, scene, extra={"classes": list(scene.classes)})]

    def negatives(self, question: Question, scene: Scene) -> list[Negative]:
        """One wrong answer per strategy of :mod:`vlmtune.data.pairs` that names every class."""
        from vlmtune.data.pairs import STRATEGIES, rejected_answer
        from vlmtune.tasks.counting import CountingTask

        task = CountingTask(scene.classes)
        rng = random.Random(repr(question.answer))
        found, seen = [], {task.render(question.answer)}
        for strategy in STRATEGIES:
            text = rejected_answer(question.answer, task, strategy, rng)
            counts = task.parse(text).counts if text is not None else {}
            if text not in seen and counts and None not in counts.values():
                seen.add(text)
                found.append(Negative(strategy, counts))
        return found

    def part_values(self, completion: str, metadata: Mapping[str, Any]) -> tuple[dict[str, float | None], dict]:
        """Today's counting metrics of one answer, and the sample fields they come from.

        The answer is read as before tasks existed (:meth:`CountingTask.parse` over the whole
        completion, not only a strict answer block), so counting records keep their numbers. The
        classes are ``metadata["classes"]``, else the gold's keys. Values (``None`` = not defined
        for this record): ``exact_match``, ``class_accuracy``, ``accuracy/<cls>``,
        ``abs_error/<cls>`` (left out for a class the answer does not mention: it is not guessed
        as 0), ``total_accuracy``, ``total_abs_error``, ``parse_failure``.
        """
        from vlmtune.tasks.counting import DEFAULT_CLASSES, CountingTask

        gold = metadata["counts"]
        task = CountingTask(tuple(metadata.get("classes") or gold.keys() or DEFAULT_CLASSES))
        parsed = task.parse(completion)
        score = task.score(parsed, gold)
        values: dict[str, float | None] = {
            "exact_match": float(score.exact),
            "class_accuracy": score.class_accuracy,
            "total_accuracy": float(score.total_error == 0),
            "total_abs_error": None if score.total_error is None else float(score.total_error),
            "parse_failure": float(score.parse_failure),
        }
        for cls, hit in score.hits.items():
            values[f"accuracy/{cls}"] = float(hit)
            err = score.abs_errors[cls]
            values[f"abs_error/{cls}"] = None if err is None else float(err)
        fields = {"gold_counts": {c: int(gold.get(c, 0)) for c in task.classes}, "parsed_counts": parsed.counts,
                  "parsed_total": parsed.total, "correct": score.exact, "class_hits": score.hits,
                  "parse_failure": score.parse_failure, "gold_text": task.render(gold)}
        return values, fields
