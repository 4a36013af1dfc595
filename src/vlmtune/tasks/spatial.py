"""The spatial family: "How many cars are left of the bus?", relations to a unique reference.

The reference class must have exactly one object in the scene. Relations (left, right, above,
below) compare box centres with a margin (:func:`vlmtune.tasks.programs.margin_of`). A question
is rejected when any candidate lies within the margin of the reference (CLEVR's rule: its side
is not clear) or when it is degenerate: its answer equals the count without the relation, so
the relation did not matter.
"""

from __future__ import annotations

import random

from vlmtune.tasks.base import ProgramTask, pick_phrasing
from vlmtune.tasks.core import Question, Scene
from vlmtune.tasks.counting import plural
from vlmtune.tasks.programs import RELATION_WORDS, ambiguous, outputs

RELATIONS = ("left", "right", "above", "below")
# The last template is held out of training (the out-of-distribution phrasing axis).
TEMPLATES = ("How many {c} are {rel} the {r}?", "Count the {c} {rel} the {r}.",
             "What number of {c} lie {rel} the {r}?")


def relate_program(candidate: str, reference: str, rel: str) -> list[dict]:
    return [{"op": "filter", "classes": [reference]}, {"op": "filter", "classes": [candidate]},
            {"op": "relate", "in": 1, "ref": 0, "rel": rel}, {"op": "count", "in": 2}]


def well_posed(program: list[dict], scene: Scene, relate_at: int) -> bool:
    """No candidate within the margin, and the relation changes the answer."""
    out = outputs(program, scene)
    step = program[relate_at]
    (ref,) = out[step["ref"]]
    candidates = out[step["in"]] if "in" in step else range(len(scene.objects))
    candidates = [i for i in candidates if i != ref]
    return not ambiguous(scene, candidates, ref, step["rel"]) and len(out[relate_at]) != len(candidates)


class SpatialFamily(ProgramTask):
    family = "spatial"
    phrasings = len(TEMPLATES)

    def questions(self, scene: Scene, rng: random.Random) -> list[Question]:
        found = []
        for r in scene.classes:
            if sum(o.cls == r for o in scene.objects) != 1:
                continue
            for c in scene.classes:
                if c == r or not any(o.cls == c for o in scene.objects):
                    continue
                for rel in RELATIONS:
                    program = relate_program(c, r, rel)
                    if well_posed(program, scene, 2):
                        k = pick_phrasing(len(TEMPLATES), rng)
                        text = TEMPLATES[k].format(c=plural(c), rel=RELATION_WORDS[rel], r=r)
                        found.append(self.make("integer", text, program, scene, k))
        return found
