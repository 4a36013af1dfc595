"""The grounding family: "Give the box of the largest bus / the leftmost car", scored by IoU.

The object must be unique by a margin (areas 25% apart, positions the relation margin apart;
:func:`vlmtune.tasks.programs._argmax`) among at least two of its class. Answers are written in the
model family's own box convention (:data:`CONVENTIONS`):

- ``qwen2_vl``: 0–1000 relative coordinates, ``x' = round(1000 x / W)``;
- ``qwen2_5_vl`` and ``qwen3_vl``: absolute pixels of the *processed* image, whose size is
  Qwen's ``smart_resize`` of the original (sides rounded to multiples of 28, resp. 32 = patch
  14 or 16 × merge 2, area kept within ``min_pixels``..``max_pixels``): ``x' = round(x W' / W)``.

Pass the processor's ``min_pixels``/``max_pixels`` of the model you train (the defaults are
transformers' ``Qwen2VLImageProcessor`` defaults). The record's ``metadata.task.extra`` keeps
the convention and the frame, so a box is always scored in the frame it was asked in. Reward =
IoU (``iou_power=2`` for IoU²); metrics ``acc@0.5`` (IoU ≥ 0.5) and ``iou``.
"""

from __future__ import annotations

import random

from vlmtune.errors import VlmtuneError
from vlmtune.tasks.base import ProgramTask, pick_phrasing
from vlmtune.tasks.core import Question, Scene

# convention -> smart_resize factor (None: 0-1000 relative)
CONVENTIONS = {"qwen2_vl": None, "qwen2_5_vl": 28, "qwen3_vl": 32}
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 56 * 56, 28 * 28 * 1280
KEYS = ("largest", "smallest", "leftmost", "rightmost", "topmost", "bottommost")
# The last template is held out of training (the out-of-distribution phrasing axis).
TEMPLATES = ("Give the box of the {key} {c} as [x0, y0, x1, y1].",
             "Where is the {key} {c}? Answer with its bounding box [x0, y0, x1, y1].",
             "Output the bounding box [x0, y0, x1, y1] of the {key} {c}.")


def answer_frame(width: int, height: int, convention: str, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of the frame a convention's boxes live in (1000 × 1000 for relative)."""
    if convention not in CONVENTIONS:
        raise VlmtuneError(f"box convention {convention!r}: choose from {', '.join(CONVENTIONS)}")
    factor = CONVENTIONS[convention]
    if factor is None:
        return 1000, 1000
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor, min_pixels or DEFAULT_MIN_PIXELS, max_pixels or DEFAULT_MAX_PIXELS)
    return w, h


def to_frame(box, width: int, height: int, frame: tuple[int, int]) -> list[int]:
    """A pixel box of a ``width`` × ``height`` image in the answer frame, rounded.

    >>> to_frame([10, 20, 30, 40], 100, 200, (1000, 1000))
    [100, 100, 300, 200]
    """
    sx, sy = frame[0] / width, frame[1] / height
    return [round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)]


def ground_program(cls: str, key: str) -> list[dict]:
    return [{"op": "filter", "classes": [cls]}, {"op": "argmax", "in": 0, "key": key}, {"op": "box", "in": 1}]


class GroundingFamily(ProgramTask):
    family = "grounding"
    phrasings = len(TEMPLATES)
    kinds = ("box",)

    def __init__(self, convention: str = "qwen2_5_vl", min_pixels: int | None = None,
                 max_pixels: int | None = None):
        if convention not in CONVENTIONS:
            raise VlmtuneError(f"box convention {convention!r}: choose from {', '.join(CONVENTIONS)}")
        self.convention, self.min_pixels, self.max_pixels = convention, min_pixels, max_pixels

    def extra(self, scene: Scene) -> dict:
        frame = answer_frame(scene.width, scene.height, self.convention, self.min_pixels, self.max_pixels)
        return {"convention": self.convention, "frame": list(frame), "image_size": [scene.width, scene.height]}

    def answer_of(self, program: list[dict], value, scene: Scene, extra: dict):
        """Pixel boxes of the program, in the answer frame of ``extra``."""
        if program[-1]["op"] == "box":
            return to_frame(value, scene.width, scene.height, extra["frame"])
        return [to_frame(b, scene.width, scene.height, extra["frame"]) for b in value]

    def questions(self, scene: Scene, rng: random.Random) -> list[Question]:
        found = []
        extra = None
        for c in scene.classes:
            if sum(o.cls == c for o in scene.objects) < 2:
                continue
            for key in KEYS:
                extra = extra or self.extra(scene)
                k = pick_phrasing(len(TEMPLATES), rng)
                question = self.make("box", TEMPLATES[k].format(key=key, c=c), ground_program(c, key), scene, k, extra)
                if question is not None:
                    found.append(question)
        return found
