"""The list-and-count family: "Output the boxes of all buses", the count being the number of boxes.

Boxes are written in the model family's convention (:mod:`vlmtune.tasks.grounding`). Reward =
matched IoU × min(1, n_gold / n_predicted) (:func:`vlmtune.tasks.answers.list_reward`), so box spam
does not pay (VLM-R1's lesson); metrics ``accuracy`` (that reward) and ``count_accuracy`` (as
many boxes as objects). Asked for classes with 1 to 8 objects in the scene.
"""

from __future__ import annotations

import random

from vlmtune.tasks.base import pick_phrasing
from vlmtune.tasks.core import Question, Scene
from vlmtune.tasks.grounding import GroundingFamily
from vlmtune.tasks.counting import plural

MAX_OBJECTS = 8
# The last template is held out of training (the out-of-distribution phrasing axis).
TEMPLATES = ("Output the boxes of all {c} as [[x0, y0, x1, y1], ...].",
             "List the bounding box of every {one} as [[x0, y0, x1, y1], ...].",
             "Give [x0, y0, x1, y1] for each {one} in the image, as a list.")


def list_program(cls: str) -> list[dict]:
    return [{"op": "filter", "classes": [cls]}, {"op": "boxes", "in": 0}]


class ListFamily(GroundingFamily):
    """Same box conventions as grounding; one question per class present."""

    family = "list"
    phrasings = len(TEMPLATES)
    kinds = ("boxes",)

    def questions(self, scene: Scene, rng: random.Random) -> list[Question]:
        found = []
        for c in scene.classes:
            if 1 <= sum(o.cls == c for o in scene.objects) <= MAX_OBJECTS:
                k = pick_phrasing(len(TEMPLATES), rng)
                text = TEMPLATES[k].format(c=plural(c), one=c)
                found.append(self.make("boxes", text, list_program(c), scene, k, self.extra(scene)))
        return found
