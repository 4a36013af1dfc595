"""The count family: today's counting task (every class, one sentence) through the task interface.

The question and answers are those of :mod:`vlmrl.data.pairs` (its prompts, the canonical
sentence of :class:`~vlmrl.tasks.counting.CountingTask`, its rejected-answer strategies), so a
count record built by ``vlmrl data tasks`` is the record ``vlmrl data from-detections`` writes,
with ``metadata.task`` added. Scoring is :class:`CountingTask`'s exact match, read strictly from
the single answer block (see :mod:`vlmrl.tasks.answers`, kind ``counts``).
"""

from __future__ import annotations

import random

from vlmrl.tasks.base import ProgramTask
from vlmrl.tasks.core import Negative, Question, Scene


class CountFamily(ProgramTask):
    family = "count"
    kinds = ("counts",)

    def questions(self, scene: Scene, rng: random.Random) -> list[Question]:
        from vlmrl.data.pairs import prompt_text
        from vlmrl.tasks.counting import CountingTask

        text = prompt_text(CountingTask(scene.classes), rng)
        program = [{"op": "count_each", "classes": list(scene.classes)}]
        return [self.make("counts", text, program, scene, extra={"classes": list(scene.classes)})]

    def negatives(self, question: Question, scene: Scene) -> list[Negative]:
        """One wrong answer per strategy of :mod:`vlmrl.data.pairs` that names every class."""
        from vlmrl.data.pairs import STRATEGIES, rejected_answer
        from vlmrl.tasks.counting import CountingTask

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
