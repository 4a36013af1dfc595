"""The attribute family: "How many red cars?", "How many large buses?".

Asked only on scenes whose every object has a colour and a size (synthetic scenes drawn with
``attributes``: there the colour is independent of the class). The attribute value asked is one
the scene shows; a question whose answer equals the class's count is rejected as degenerate
(the attribute did not matter).
"""

from __future__ import annotations

import random

from vlmtune.tasks.base import ProgramTask, pick_phrasing
from vlmtune.tasks.core import Question, Scene
from vlmtune.tasks.counting import plural
from vlmtune.tasks.programs import outputs

# The last template is held out of training (the out-of-distribution phrasing axis).
TEMPLATES = ("How many {w} {c} are there?", "Count the {w} {c} in the image.", "What number of {w} {c} can you see?")


def attribute_program(cls: str, colour: str | None = None, size: str | None = None) -> list[dict]:
    return [{"op": "filter", "classes": [cls], "colour": colour, "size": size}, {"op": "count", "in": 0}]


class AttributeFamily(ProgramTask):
    family = "attribute"
    phrasings = len(TEMPLATES)

    def questions(self, scene: Scene, rng: random.Random) -> list[Question]:
        if not scene.objects or any(o.colour is None or o.size is None for o in scene.objects):
            return []
        colours = sorted({o.colour for o in scene.objects})
        sizes = sorted({o.size for o in scene.objects})
        found = []
        for c in scene.classes:
            n = sum(o.cls == c for o in scene.objects)
            asks = [(colour, None) for colour in colours] + [(None, size) for size in sizes]
            for colour, size in asks:
                program = attribute_program(c, colour, size)
                if outputs(program, scene)[-1] == n:
                    continue  # degenerate: the attribute does not change the answer
                k = pick_phrasing(len(TEMPLATES), rng)
                text = TEMPLATES[k].format(w=colour or size, c=plural(c))
                found.append(self.make("integer", text, program, scene, k))
        return found
