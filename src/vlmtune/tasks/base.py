"""What every built-in family shares: running a program into a question, hard negatives, scoring.

A family module only writes its questions (:meth:`ProgramTask.questions`); this class turns a
program into a :class:`~vlmtune.tasks.core.Question` (executing it, or returning None when the
program is ambiguous on the scene), makes its hard negatives and scores completions through the
answer kinds of :mod:`vlmtune.tasks.answers`.

Hard negatives (:meth:`ProgramTask.negatives`) are, first, the answers of the program's slips
(:func:`vlmtune.tasks.programs.slips`: each a specific reasoning error, executed, with its own
trace), then, when those do not give enough distinct wrong answers, generic ones per answer kind
(``near_miss``: a number one off, another verdict, a box shifted by half its width). Negatives
equal to the gold answer, repeated, or negative numbers are dropped. :func:`mix_distances`
orders them so that the edit distances to the gold text are mixed: pairs whose answers differ by
one digit only give plain DPO almost no signal, so near and far negatives alternate.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

from vlmtune.tasks import answers
from vlmtune.tasks.core import Negative, Question, Scene, edit_distance
from vlmtune.tasks.programs import Ambiguous, execute, hops, slips


class ProgramTask:
    """Base of the built-in families; a subclass sets ``family`` and writes ``questions``."""

    family = ""
    kinds: tuple[str, ...] = ("integer",)
    phrasings = 0  # number of question templates; the last is held out (0: none held out)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m for kind in self.kinds for m in answers.METRICS[kind]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def questions(self, scene: Scene, rng: random.Random) -> list[Question]:
        raise NotImplementedError

    # ------------------------------------------------------------------ building
    def make(
        self, kind: str, text: str, program: list[dict], scene: Scene, phrasing: int = 0, extra: dict | None = None
    ) -> Question | None:
        """Execute ``program`` on ``scene``: the question, or None when it is ambiguous there."""
        try:
            answer, trace = execute(program, scene)
        except Ambiguous:
            return None
        return Question(self.family, kind, text, program, self.answer_of(program, answer, scene, extra or {}),
                        hops(program), trace, phrasing, extra or {})

    def answer_of(self, program: list[dict], value: Any, scene: Scene, extra: dict) -> Any:
        """The answer from a program's output (grounding converts boxes to its convention here)."""
        return value

    def negatives(self, question: Question, scene: Scene) -> list[Negative]:
        """Distinct wrong answers: the slips' first, then generic near misses."""
        found: list[Negative] = []
        seen = {answers.render(question.kind, question.answer, question.extra)}
        for name, program in slips(question.program):
            try:
                value, trace = execute(program, scene)
            except Ambiguous:
                continue
            answer = self.answer_of(program, value, scene, question.extra)
            self._keep(found, seen, question, Negative(name, answer, trace))
        for negative in near_misses(question):
            self._keep(found, seen, question, negative)
        return found

    @staticmethod
    def _keep(found: list, seen: set, question: Question, negative: Negative) -> None:
        if isinstance(negative.answer, int) and negative.answer < 0:
            return
        text = answers.render(question.kind, negative.answer, question.extra)
        if text not in seen:
            seen.add(text)
            found.append(negative)

    # ------------------------------------------------------------------ scoring
    def score(self, completion: str, meta: Mapping[str, Any], iou_power: float = 1.0) -> float:
        return answers.score_completion(completion, meta, iou_power)

    def metrics(self, completion: str, meta: Mapping[str, Any]) -> dict[str, float]:
        return answers.completion_metrics(completion, meta)


def pick_phrasing(n: int, rng: random.Random) -> int:
    """A template index: the held-out last one 10% of the time (it only feeds the OOD file), the
    others evenly."""
    if n < 2:
        return 0
    if rng.random() < 0.1:
        return n - 1
    return rng.randrange(n - 1)


def near_misses(question: Question) -> list[Negative]:
    """Generic wrong answers of a question's answer kind (no trace: no program made them)."""
    gold, kind = question.answer, question.kind
    if kind == "integer":
        return [Negative("near_miss", gold + d) for d in (1, -1, 2)]
    if kind == "verdict":
        return [Negative("near_miss", v) for v in answers.VERDICTS if v != gold]
    if kind == "compound":
        (na, ca), (nb, cb), verdict = gold
        return [Negative("near_miss", [[na, ca], [nb, cb], v]) for v in answers.VERDICTS if v != verdict]
    if kind == "box":
        x0, y0, x1, y1 = gold
        dx = max(1, (x1 - x0) // 2)
        return [Negative("near_miss", [x0 + dx, y0, x1 + dx, y1])]
    if kind == "boxes":
        found = [Negative("near_miss", gold[:-1])] if gold else []
        if gold:
            x0, y0, x1, y1 = gold[0]
            found.append(Negative("near_miss", gold + [[x1, y0, 2 * x1 - x0, y1]]))
        return found
    return []


def mix_distances(negatives: list[Negative], gold_text: str, kind: str, extra: dict,
                  rng: random.Random) -> list[Negative]:
    """Negatives ordered near, far, next-near, next-far... (or far first, at random)."""
    ranked = sorted(negatives, key=lambda n: edit_distance(answers.render(kind, n.answer, extra), gold_text))
    mixed, low, high = [], 0, len(ranked) - 1
    near_first = rng.random() < 0.5
    while low <= high:
        for pick_near in ((True, False) if near_first else (False, True)):
            if low > high:
                break
            if pick_near:
                mixed.append(ranked[low])
                low += 1
            else:
                mixed.append(ranked[high])
                high -= 1
    return mixed
