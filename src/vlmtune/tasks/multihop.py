"""The multi-hop family: 2 to 4 composed steps (filter → argmax → relate → count).

- 2 hops: "How many objects are left of the bus?" (filter the unique bus, relate);
- 3 hops: "How many objects are left of the largest bus?" (filter, argmax, relate);
- 4 hops: "How many motorcycles are left of the largest bus?" (filter, argmax, filter, relate).

The reference is unique (exactly one of its class for 2 hops; unique by the argmax margin
otherwise), and the spatial family's rules hold: no candidate within the margin of the
reference, and the relation must change the answer (:func:`vlmtune.tasks.spatial.well_posed`).
The builder keeps questions with more hops than training sees for the out-of-distribution file.
"""

from __future__ import annotations

import random

from vlmtune.tasks.base import ProgramTask, pick_phrasing
from vlmtune.tasks.core import Question, Scene
from vlmtune.tasks.counting import plural
from vlmtune.tasks.programs import RELATION_WORDS, Ambiguous
from vlmtune.tasks.spatial import RELATIONS, well_posed

KEYS = ("largest", "smallest", "leftmost", "rightmost")
# The last template is held out of training (the out-of-distribution phrasing axis).
TEMPLATES = ("How many {c} are {rel} the {r}?", "Count the {c} {rel} the {r}.", "What number of {c} lie {rel} the {r}?")


def hop_program(reference: str, rel: str, key: str | None = None, candidate: str | None = None) -> list[dict]:
    """filter reference [→ argmax key] [→ filter candidate] → relate → count."""
    program: list[dict] = [{"op": "filter", "classes": [reference]}]
    if key:
        program.append({"op": "argmax", "in": 0, "key": key})
    ref = len(program) - 1
    relate = {"op": "relate", "ref": ref, "rel": rel}
    if candidate:
        program.append({"op": "filter", "classes": [candidate]})
        relate["in"] = len(program) - 1
    program += [relate, {"op": "count", "in": len(program)}]
    return program


class MultihopFamily(ProgramTask):
    family = "multihop"
    phrasings = len(TEMPLATES)

    def questions(self, scene: Scene, rng: random.Random) -> list[Question]:
        found = []
        for r in scene.classes:
            n = sum(o.cls == r for o in scene.objects)
            for rel in RELATIONS:
                shapes = [(None, None)] if n == 1 else []
                if n >= 2:
                    shapes += [(key, None) for key in KEYS]
                    shapes += [(key, c) for key in KEYS for c in scene.classes if c != r]
                for key, c in shapes:
                    question = self._ask(scene, rng, r, rel, key, c)
                    if question is not None:
                        found.append(question)
        return found

    def _ask(self, scene: Scene, rng: random.Random, r: str, rel: str, key: str | None, c: str | None):
        program = hop_program(r, rel, key, c)
        try:
            if not well_posed(program, scene, len(program) - 2):
                return None
        except Ambiguous:
            return None
        k = pick_phrasing(len(TEMPLATES), rng)
        noun = plural(c) if c else "objects"
        text = TEMPLATES[k].format(c=noun, rel=RELATION_WORDS[rel], r=f"{key} {r}" if key else r)
        return self.make("integer", text, program, scene, k)
