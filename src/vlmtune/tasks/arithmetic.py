"""The arithmetic family: sums over a super-class, differences, removal.

- sum: "How many two-wheelers are there?": each member class counted, then added (a super-class
  is asked only when the scene's classes hold at least two of its members; :data:`SUPERCLASSES`);
- difference: "How many more cars than buses are there?", asked only when the difference is not
  negative;
- removal: "Remove all buses. How many vehicles are left?".
"""

from __future__ import annotations

import random

from vlmtune.tasks.base import ProgramTask, pick_phrasing
from vlmtune.tasks.core import Question, Scene
from vlmtune.tasks.counting import plural
from vlmtune.tasks.programs import outputs

SUPERCLASSES = {
    "two-wheelers": ("motorcycle", "bicycle", "motorbike", "scooter"),
    "cars and buses": ("car", "bus"),
    "large vehicles": ("bus", "truck", "ambulance", "van"),
}
# The last template of each list is held out of training (the out-of-distribution phrasing axis).
SUM_TEMPLATES = ("How many {s} are there in the image?", "Count the {s} in the picture.",
                 "What is the total number of {s} shown?")
DIFF_TEMPLATES = ("How many more {a} than {b} are there?", "By how many do the {a} outnumber the {b}?",
                  "What is the number of {a} minus the number of {b}?")
REMOVE_TEMPLATES = ("Remove all {a}. How many objects are left?",
                    "If every {one} were taken away, how many objects would remain?",
                    "Take out the {a}; how many objects are still in the image?")


def sum_program(members: list[str]) -> list[dict]:
    """Count each member, then add the counts one by one."""
    program: list[dict] = []
    totals = []
    for cls in members:
        program += [{"op": "filter", "classes": [cls]}, {"op": "count", "in": len(program)}]
        totals.append(len(program) - 1)
    running = totals[0]
    for k in totals[1:]:
        program.append({"op": "add", "a": running, "b": k})
        running = len(program) - 1
    return program


def diff_program(a: str, b: str) -> list[dict]:
    return [{"op": "filter", "classes": [a]}, {"op": "count", "in": 0},
            {"op": "filter", "classes": [b]}, {"op": "count", "in": 2}, {"op": "sub", "a": 1, "b": 3}]


def remove_program(a: str) -> list[dict]:
    return [{"op": "filter", "classes": None}, {"op": "remove", "in": 0, "classes": [a]}, {"op": "count", "in": 1}]


class ArithmeticFamily(ProgramTask):
    family = "arithmetic"
    phrasings = len(SUM_TEMPLATES)

    def questions(self, scene: Scene, rng: random.Random) -> list[Question]:
        found = []
        for name, members in SUPERCLASSES.items():
            present = [c for c in scene.classes if c in members]
            if len(present) >= 2:
                k = pick_phrasing(len(SUM_TEMPLATES), rng)
                found.append(self.make("integer", SUM_TEMPLATES[k].format(s=name), sum_program(present), scene, k))
        for a in scene.classes:
            for b in scene.classes:
                program = diff_program(a, b)
                if a != b and outputs(program, scene)[-1] >= 0 and _any(scene, a, b):
                    k = pick_phrasing(len(DIFF_TEMPLATES), rng)
                    found.append(self.make("integer", DIFF_TEMPLATES[k].format(a=plural(a), b=plural(b)),
                                           program, scene, k))
        for a in scene.classes:
            if _any(scene, a):
                k = pick_phrasing(len(REMOVE_TEMPLATES), rng)
                text = REMOVE_TEMPLATES[k].format(a=plural(a), one=a)
                found.append(self.make("integer", text, remove_program(a), scene, k))
        return found


def _any(scene: Scene, *classes: str) -> bool:
    return any(o.cls in classes for o in scene.objects)
