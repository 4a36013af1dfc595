"""Detection labels (YOLO, COCO, VOC) → scenes with boxes, for ``vlmtune data tasks --detections``.

The labels are read by :func:`vlmtune.data.detections.read_boxes`, the reader that ``vlmtune data
from-detections`` counts from: both commands see the same images, class names (lower-cased) and
source photos, and refuse the same bad labels with the same messages (or, with ``skip_bad``,
skip and report them). Each scene's boxes are in pixels of its image: the reader's fractions
times the image size (the label's, else the image file's).

Labels carry no colour or size, so the attribute family has nothing to ask of these scenes.
An image holding a *tiny* box (area under ``min_area`` of the image), a COCO *crowd* annotation
or an object without a box (a COCO annotation without ``bbox``, a VOC object without
``<bndbox>``) is skipped whole and reported in ``skipped``: dropping only that object would make
every count and relation on the image wrong.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.data.detections import ImageBoxes, class_names, read_boxes
from vlmtune.errors import VlmtuneError
from vlmtune.tasks.core import Obj, Scene

DEFAULT_MIN_AREA = 0.0005


def read_detection_scenes(
    root: str | Path, fmt: str = "auto", classes: list[str] | None = None, keep: list[str] | None = None,
    min_area: float = DEFAULT_MIN_AREA, skip_bad: bool = False, skipped: list[str] | None = None,
) -> list[Scene]:
    """Every usable labelled image as a scene. ``keep`` restricts (and orders) the classes asked
    about; objects of other classes stay in the scene (they are still there to be seen)."""
    skipped = [] if skipped is None else skipped
    images = list(read_boxes(root, fmt, classes, skip_bad, skipped, sizes=True))
    names = class_names(root, fmt, classes)
    order = _asked_classes(keep, names) or names or sorted({b.cls for i in images for b in i.boxes})
    scenes = []
    for item in images:
        scene, why = _usable_scene(item, tuple(order), min_area)
        if scene is None:
            skipped.append(f"{item.rel}: skipped, it holds {why}")
        else:
            scenes.append(scene)
    if not scenes:
        first = f"; {len(skipped)} skipped, the first: {skipped[0]}" if skipped else ""
        raise VlmtuneError(f"{root}: no labelled image to pose questions about{first}")
    return scenes


def _asked_classes(keep: list[str] | None, names: list[str] | None) -> list[str] | None:
    """``keep`` lower-cased, checked against the data set's class names when those are known."""
    if not keep:
        return None
    keep = [k.strip().lower() for k in keep]
    unknown = [k for k in keep if names is not None and k not in names]
    if unknown:
        raise VlmtuneError(f"--keep: no class {', '.join(unknown)} in the data (its classes: {', '.join(names)})")
    return keep


def _usable_scene(item: ImageBoxes, classes: tuple[str, ...], min_area: float) -> tuple[Scene | None, str]:
    """The image as a scene with boxes in pixels, or None and why it cannot be one (see the module's docstring)."""
    if any(b.crowd for b in item.boxes):
        return None, "a crowd annotation"
    boxless = sum(b.box is None for b in item.boxes)
    if boxless:
        return None, f"{boxless} object(s) without a box"
    w, h = item.size
    objects = tuple(Obj(b.cls, (b.box[0] * w, b.box[1] * h, b.box[2] * w, b.box[3] * h)) for b in item.boxes)
    tiny = [o for o in objects if o.area < min_area * w * h]
    if tiny:
        return None, f"{len(tiny)} tiny box(es) (under {min_area:g} of the image)"
    return Scene(str(item.image), w, h, objects, item.source, classes, item.rel), ""
