"""The count-compare family: "Are there more buses than cars?" answered more / fewer / same.

Two forms: the verdict alone (kind ``verdict``), and the compound form (kind ``compound``),
"2 buses, 3 cars: fewer", which pays only when both counts and the verdict are right, so a
model cannot guess the verdict without counting. Asked for every ordered pair of the scene's
classes of which at least one is present (0 against 0 says nothing about the image); the answers
are balanced later by the builder (:mod:`vlmtune.data.questions`).
"""

from __future__ import annotations

import random

from vlmtune.tasks.base import ProgramTask, pick_phrasing
from vlmtune.tasks.core import Question, Scene
from vlmtune.tasks.programs import outputs
from vlmtune.tasks.counting import plural

# The last template of each list is held out of training (the out-of-distribution phrasing axis).
VERDICT_TEMPLATES = (
    "Are there more {a} than {b} in the image? Answer more, fewer or same.",
    "Compare the number of {a} with the number of {b}: more, fewer or same?",
    "Is the number of {a} greater than, less than or equal to the number of {b}? Answer more, fewer or same.",
)
COMPOUND_TEMPLATES = (
    "How many {a} and how many {b} are there, and are there more, fewer or the same number of {a}? "
    "Answer as: N {a}, M {b}: more/fewer/same.",
    "Count the {a} and the {b}, then say whether there are more, fewer or the same number of {a}. "
    "Answer as: N {a}, M {b}: more/fewer/same.",
)


def compare_program(a: str, b: str) -> list[dict]:
    return [{"op": "filter", "classes": [a]}, {"op": "count", "in": 0},
            {"op": "filter", "classes": [b]}, {"op": "count", "in": 2}, {"op": "compare", "a": 1, "b": 3}]


class CompareFamily(ProgramTask):
    family = "compare"
    phrasings = len(VERDICT_TEMPLATES)
    kinds = ("verdict", "compound")

    def questions(self, scene: Scene, rng: random.Random) -> list[Question]:
        present = {o.cls for o in scene.objects}
        found = []
        for a in scene.classes:
            for b in scene.classes:
                if a == b or not ({a, b} & present):
                    continue
                program = compare_program(a, b)
                if rng.random() < 0.25:
                    k = rng.randrange(len(COMPOUND_TEMPLATES))
                    text = COMPOUND_TEMPLATES[k].format(a=plural(a), b=plural(b))
                    question = self.make("compound", text, program, scene, k, {"a": a, "b": b})
                else:
                    k = pick_phrasing(len(VERDICT_TEMPLATES), rng)
                    question = self.make("verdict", VERDICT_TEMPLATES[k].format(a=plural(a), b=plural(b)),
                                         program, scene, k)
                found.append(question)
        return found

    def answer_of(self, program: list[dict], value, scene: Scene, extra: dict):
        """The compound form's answer is both counts and the verdict: ``[[2, "bus"], [3, "car"], "fewer"]``."""
        if "a" not in extra:
            return value
        out = outputs(program, scene)
        return [[out[1], extra["a"]], [out[3], extra["b"]], value]
