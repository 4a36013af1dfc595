"""Detection labels (YOLO, COCO, VOC) → scenes with boxes, for ``vlmrl data tasks --detections``.

:mod:`vlmrl.data.detections` reads per-image *counts*; the task families need every object's
box, so this module reads the boxes from the same files, found by that module's own layout
rules (``data.yaml``, split folders, ``_annotations.coco.json``, ``Annotations/``), with the
same class names (lower-cased) and the same source photo per image (:func:`source_name`).

Labels carry no colour or size, so the attribute family has nothing to ask of these scenes.
An image holding a *tiny* box (area under ``min_area`` of the image) or a COCO *crowd*
annotation is skipped whole and reported: dropping only the box would make every count and
relation on that image wrong. A malformed label raises :class:`VlmrlError` with ``file:line``,
or with ``skip_bad`` is skipped and reported.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from vlmrl.data import detections as det
from vlmrl.errors import VlmrlError
from vlmrl.tasks.core import Obj, Scene

DEFAULT_MIN_AREA = 0.0005


def read_detection_scenes(
    root: str | Path, fmt: str = "auto", classes: list[str] | None = None, keep: list[str] | None = None,
    min_area: float = DEFAULT_MIN_AREA, skip_bad: bool = False, skipped: list[str] | None = None,
) -> list[Scene]:
    """Every labelled image as a scene. ``keep`` restricts (and orders) the classes asked about;
    objects of other classes stay in the scene (they are still there to be seen)."""
    root = Path(root).resolve()
    fmt = det.detect_format(root) if fmt == "auto" else fmt
    skipped = [] if skipped is None else skipped
    if fmt == "yolo":
        names = [c.strip().lower() for c in classes] if classes else det._yaml_names(root)
        raw = _yolo(root, names, skip_bad, skipped)
    elif fmt == "coco":
        raw = _coco(root, skip_bad, skipped)
    elif fmt == "voc":
        raw = _voc(root, skip_bad, skipped)
    else:
        raise VlmrlError(f"unknown detection format {fmt!r}; use auto, yolo, coco or voc")
    raw = list(raw)
    order = keep or det.class_names(root, fmt, classes) or sorted({o.cls for *_, objs in raw for o in objs})
    scenes = []
    for image, (w, h), crowd, objects in raw:
        rel = image.relative_to(root).as_posix() if image.is_relative_to(root) else image.name
        tiny = [o for o in objects if o.area < min_area * w * h]
        if crowd or tiny:
            why = "a crowd annotation" if crowd else f"{len(tiny)} tiny box(es) (under {min_area:g} of the image)"
            skipped.append(f"{rel}: skipped, it holds {why}")
            continue
        scenes.append(Scene(str(image), w, h, tuple(objects), det.source_name(image), tuple(order), rel))
    return scenes


def _yolo(root: Path, names: list[str], skip_bad: bool, skipped: list[str]):
    dirs = det._yolo_dirs(root)
    if not dirs:
        raise VlmrlError(f"{root}: no images/ + labels/ folders (flat or per split) found")
    for d in dirs:
        for image in sorted(p for p in (d / "images").iterdir() if p.suffix.lower() in det.IMAGE_SUFFIXES):
            label = d / "labels" / f"{image.stem}.txt"
            with Image.open(image) as im:
                w, h = im.size
            objects = _yolo_objects(label, names, w, h, skip_bad, skipped) if label.is_file() else []
            if objects is not None:
                yield image, (w, h), False, objects


def _yolo_objects(label: Path, names: list[str], w: int, h: int, skip_bad: bool, skipped: list[str]):
    objects = []
    for n, line in enumerate(label.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        problem = det._yolo_line_problem(fields, len(names))
        if problem:
            det._bad(f"{label}:{n}: {problem}: {line.strip()!r}", skip_bad, skipped)
            return None
        values = [float(f) for f in fields[1:]]
        if len(values) == 4:
            cx, cy, bw, bh = values
            box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
        else:  # a polygon: its bounding box
            xs, ys = values[0::2], values[1::2]
            box = (min(xs) * w, min(ys) * h, max(xs) * w, max(ys) * h)
        objects.append(Obj(names[int(fields[0])], box))
    return objects


def _coco(root: Path, skip_bad: bool, skipped: list[str]):
    files = det._coco_files(root)
    if not files:
        raise VlmrlError(f"{root}: no COCO *.json annotation files found")
    for path in files:
        try:
            data = json.loads(path.read_text())
            categories = {c["id"]: str(c["name"]).strip().lower() for c in data["categories"]}
            images = {im["id"]: im for im in data["images"]}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise VlmrlError(f"{path}: not a COCO annotation file ({type(e).__name__}: {e})") from None
        per_image: dict = {i: [] for i in images}
        crowd, bad = set(), set()
        for k, ann in enumerate(data.get("annotations", [])):
            where = f"{path}: annotation #{k} (id {ann.get('id')})"
            bbox = ann.get("bbox")
            if ann.get("image_id") not in images or ann.get("category_id") not in categories or \
                    not (isinstance(bbox, list) and len(bbox) == 4):
                det._bad(f"{where}: unknown image_id or category_id, or no [x, y, w, h] bbox", skip_bad, skipped)
                bad.add(ann.get("image_id"))
                continue
            if ann.get("iscrowd"):
                crowd.add(ann["image_id"])
            x, y, bw, bh = (float(v) for v in bbox)
            per_image[ann["image_id"]].append(Obj(categories[ann["category_id"]], (x, y, x + bw, y + bh)))
        for image_id, im in images.items():
            if image_id not in bad:
                image = det._find_image(path.parent, root, im["file_name"])
                yield image, (int(im["width"]), int(im["height"])), image_id in crowd, per_image[image_id]


def _voc(root: Path, skip_bad: bool, skipped: list[str]):
    files = det._voc_files(root)
    if not files:
        raise VlmrlError(f"{root}: no VOC *.xml annotation files found")
    for path in files:
        try:
            tree = ET.parse(path).getroot()
            size = tree.find("size")
            w, h = int(size.findtext("width")), int(size.findtext("height"))
            objects = []
            for obj in tree.iter("object"):
                b = obj.find("bndbox")
                box = tuple(float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                objects.append(Obj(obj.findtext("name").strip().lower(), box))
            filename = tree.findtext("filename").strip()
        except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
            det._bad(f"{path}: not a VOC annotation with size, filename and boxes ({type(e).__name__}: {e})",
                     skip_bad, skipped)
            continue
        folder = path.parent.parent / "JPEGImages" if path.parent.name == "Annotations" else path.parent
        yield det._find_image(folder, root, filename), (w, h), False, objects
