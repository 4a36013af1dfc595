"""Read object-detection labels (YOLO, COCO JSON, Pascal VOC XML): every image's boxes, and its counts.

Layouts understood:

- YOLO, Roboflow export: ``data.yaml`` + ``{train,valid,test}/{images,labels}``; flat:
  ``images/`` + ``labels/``. Class names come from ``data.yaml`` or from ``classes`` (names in
  index order); an image without a label file has no objects (YOLO's convention).
- COCO: any ``*.json`` with ``images``/``annotations``/``categories`` in the folder or its split
  folders (Roboflow writes ``{split}/_annotations.coco.json`` beside the images).
- Pascal VOC: ``*.xml`` files in ``Annotations/`` (images in ``JPEGImages/``) or beside the images.

:func:`read_boxes` is the one reader of these files: it yields :class:`ImageBoxes` one image at a
time, each object with its class name (lower-cased), its box as ``(x0, y0, x1, y1)`` in fractions
of the image's width and height (YOLO's own unit; COCO and VOC pixels are divided by the image
size), or None where the label gives no box (a COCO annotation without ``bbox``, a VOC object
without ``<bndbox>`` or with an empty one), and COCO's crowd flag. The image size is the label's
(COCO ``width`` and ``height``, VOC ``<size>``) when it states one in whole numbers > 0;
otherwise it is read from the image file's header (no pixels decoded) only where it is needed: to
divide a COCO or VOC pixel box, or when the caller asks for every size (``sizes=True``, as scenes
do). So YOLO counting never opens an image. :func:`read_detections` derives each image's counts
(:class:`ImageCounts`) from those boxes; every labelled object counts, crowd ones too.

A malformed label raises :class:`VlmtuneError` naming ``file:line`` (or the COCO record), unless
``skip_bad`` is given, in which case the problem is appended to ``skipped`` and the image left
out. Malformed means: not UTF-8, a class index that is not a whole number of ASCII digits or is out
of range, a box coordinate or size that is not a finite number >= 0 (a VOC box whose max is below
its min too), a COCO entry that is not an object, a COCO ``iscrowd`` other than 0 or 1, a COCO or
VOC image file that is missing or whose name leads outside the data set's root
(``../../etc/passwd``), an image whose size is needed but that PIL cannot open, an unreadable file
(a symbolic link that loops, say). A class list that cannot be read (``data.yaml`` not a mapping,
``names`` holding lists, mappings or values YAML reads as booleans, a mapping whose keys are not
0..n-1) is an error even with ``skip_bad``.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vlmtune.data.label_values import (Box, box_fractions, box_problem, header_size, image_in_root, stated_size,
                                     whole_number)
from vlmtune.data.text_files import path_problem, read_json, read_text, read_yaml, require_path
from vlmtune.errors import VlmtuneError
from vlmtune.progress import progress_bar

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
SPLIT_DIRS = ("train", "valid", "val", "test")
_ROBOFLOW_COPY = re.compile(r"^(?P<source>.+)_(?:jpg|jpeg|png|bmp|webp)\.rf\.[A-Za-z0-9]+$", re.I)


@dataclass(frozen=True)
class LabelBox:
    """One labelled object: class name, box ``(x0, y0, x1, y1)`` in fractions of the image's width
    and height (None when the label gives no box), and whether COCO marks it a crowd."""

    cls: str
    box: Box | None
    crowd: bool = False


@dataclass
class ImageBoxes:
    """One image's labelled objects in label order, and its ``(width, height)`` when known.
    ``image`` and the next three fields are as in :class:`ImageCounts`."""

    image: Path
    rel: str
    source: str
    split: str | None
    size: tuple[int, int] | None
    boxes: list[LabelBox]

    def counts(self) -> Counter:
        """Objects per class name, crowd annotations included."""
        return Counter(b.cls for b in self.boxes)


@dataclass
class ImageCounts:
    """One image's object counts by class name, before mapping and dropping."""

    image: Path  # absolute
    rel: str  # path relative to the data set root, for ids and messages
    source: str  # the source photo: augmentation copies of one photo share it
    split: str | None  # the split folder it came from, if any
    counts: Counter


@dataclass
class _Reading:
    """What every reader of one data set needs: its root, and what to do with a bad label."""

    root: Path
    skip_bad: bool
    skipped: list[str]
    sizes: bool  # read every image's size, even where no box needs it

    def bad(self, message: str) -> None:
        if not self.skip_bad:
            raise VlmtuneError(f"{message} (fix it, or pass --skip-bad to skip it and report it)")
        self.skipped.append(message)

    def image_boxes(self, image: Path, stated: tuple[int, int] | None, boxes: list[LabelBox],
                    in_pixels: bool) -> ImageBoxes | None:
        """``image`` with ``boxes``, divided by its size when ``in_pixels``; None when skipped as bad."""
        size = stated
        if size is None and (self.sizes or (in_pixels and any(b.box is not None for b in boxes))):
            size, why = header_size(image)
            if size is None:
                self.bad(why)
                return None
        if in_pixels:
            boxes = [LabelBox(b.cls, box_fractions(b.box, size), b.crowd) for b in boxes]
        rel = image.relative_to(self.root)
        return ImageBoxes(image, rel.as_posix(), source_name(image), _split_of(rel), size, boxes)


def source_name(image: Path) -> str:
    """The source photo of an image: Roboflow names copies ``NAME_jpg.rf.HASH.jpg``.

    >>> source_name(Path("test/images/00dea1edf14f09ab_jpg.rf.KJ730oDTFPdXdJxvSLnX.jpg"))
    '00dea1edf14f09ab'
    >>> source_name(Path("scene_000003.png"))
    'scene_000003'
    """
    m = _ROBOFLOW_COPY.match(image.stem)
    return m["source"] if m else image.stem


def detect_format(root: Path) -> str:
    """'yolo', 'coco' or 'voc', from what the folder holds."""
    require_path(root)
    if not root.is_dir():
        raise VlmtuneError(f"{root}: not a folder (give the data set's root folder)")
    if (root / "data.yaml").is_file() or (root / "data.yml").is_file() or _yolo_dirs(root):
        return "yolo"
    if _coco_files(root):
        return "coco"
    if _voc_files(root):
        return "voc"
    raise VlmtuneError(
        f"{root}: found no YOLO (images/ + labels/), COCO (*.json) or VOC (*.xml) labels; "
        "point at the data set's root folder"
    )


def read_boxes(root: str | Path, fmt: str = "auto", classes: list[str] | None = None, skip_bad: bool = False,
               skipped: list[str] | None = None, sizes: bool = False) -> Iterator[ImageBoxes]:
    """Yield each image's boxes. ``skipped`` collects what ``skip_bad`` skipped (file:line why);
    ``sizes`` gives every image its size, read from the image file where the label has none.
    A progress bar counts the images read (:mod:`vlmtune.progress`)."""
    root = _root(root)
    fmt = detect_format(root) if fmt == "auto" else fmt
    reading = _Reading(root, skip_bad, [] if skipped is None else skipped, sizes)
    if fmt == "yolo":
        names = [c.strip().lower() for c in classes] if classes else _yaml_names(root)
        images = _read_yolo(reading, names)
    elif fmt == "coco":
        images = _read_coco(reading)
    elif fmt == "voc":
        images = _read_voc(reading)
    else:
        raise VlmtuneError(f"unknown detection format {fmt!r}; use auto, yolo, coco or voc")
    # The total is not known before the folder is walked: the bar shows the count and images/s.
    return iter(progress_bar(images, desc=f"read {fmt} labels", unit="image"))


def read_detections(root: str | Path, fmt: str = "auto", classes: list[str] | None = None, skip_bad: bool = False,
                    skipped: list[str] | None = None) -> Iterator[ImageCounts]:
    """Yield each image's counts, from :func:`read_boxes`; ``skipped`` as there."""
    images = read_boxes(root, fmt, classes, skip_bad, skipped)
    return (ImageCounts(i.image, i.rel, i.source, i.split, i.counts()) for i in images)


def class_names(root: str | Path, fmt: str = "auto", classes: list[str] | None = None) -> list[str] | None:
    """The data set's class names in their own order (YOLO index, COCO category id); None for VOC."""
    root = _root(root)
    fmt = detect_format(root) if fmt == "auto" else fmt
    if classes:
        return [c.strip().lower() for c in classes]
    if fmt == "yolo":
        return _yaml_names(root)
    if fmt == "coco":
        names: list[str] = []
        for path in _coco_files(root):
            categories = _coco_tables(path)[0]
            names += [categories[k] for k in sorted(categories, key=lambda k: (isinstance(k, str), k))]
        return list(dict.fromkeys(names))
    return None


def _root(root: str | Path) -> Path:
    require_path(root)  # before resolve(), which raises RuntimeError on a looping link
    return Path(root).resolve()


def _split_of(rel: Path) -> str | None:
    first = rel.parts[0] if len(rel.parts) > 1 else None
    return {"valid": "val"}.get(first, first) if first in SPLIT_DIRS else None


# ---------------------------------------------------------------------- YOLO
def _yolo_dirs(root: Path) -> list[Path]:
    """Folders holding an ``images/`` + ``labels/`` pair: the root (flat) and split folders."""
    candidates = [root] + [root / s for s in SPLIT_DIRS]
    return [d for d in candidates if (d / "images").is_dir() and (d / "labels").is_dir()]


def _yaml_names(root: Path) -> list[str]:
    path = next((p for p in (root / "data.yaml", root / "data.yml") if os.path.lexists(p)), None)
    if path is None:
        raise VlmtuneError(
            f"{root}: no data.yaml, so the YOLO class names are unknown; pass them in index "
            "order, e.g. --classes Ambulance,Bus,Car,Motorcycle,Truck"
        )
    try:
        data = read_yaml(path)
        data = {} if data is None else data  # an empty file
    except VlmtuneError as e:
        raise VlmtuneError(f"{e}; fix it or pass --classes") from None
    if not isinstance(data, dict):
        raise VlmtuneError(f"{path}: expected a mapping with a 'names' key, got a YAML "
                         f"{type(data).__name__}; fix it or pass --classes")
    names = data.get("names")
    if isinstance(names, dict):
        names = _indexed_names(path, names)
    if not isinstance(names, list) or not names:
        raise VlmtuneError(f"{path}: no 'names' list of classes; add one or pass --classes")
    for k, name in enumerate(names):
        if isinstance(name, bool) or not isinstance(name, (str, int)) or not str(name).strip():
            raise VlmtuneError(f"{path}: names[{k}] is {repr(name)[:80]}, not a class name; give each class one "
                             "name (quote names YAML reads otherwise, e.g. 'no', 'on') or pass --classes")
    return [str(n).strip().lower() for n in names]


def _indexed_names(path: Path, names: dict) -> list:
    """``{0: car, 1: bus}`` → ``[car, bus]``; the keys must be exactly 0..n-1."""
    indexes = {}
    for key in names:
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and whole_number(key))):
            raise VlmtuneError(f"{path}: 'names' key {key!r} is not a class index; write names as a list, "
                             "or as 0: name, 1: name, ...; or pass --classes")
        indexes[int(key)] = names[key]
    if sorted(indexes) != list(range(len(indexes))):
        raise VlmtuneError(f"{path}: 'names' keys are {sorted(indexes)}, not 0..{len(indexes) - 1}; "
                         "number the classes from 0 without gaps, or pass --classes")
    return [indexes[i] for i in range(len(indexes))]


def _read_yolo(reading: _Reading, names: list[str]) -> Iterator[ImageBoxes]:
    dirs = _yolo_dirs(reading.root)
    if not dirs:
        raise VlmtuneError(f"{reading.root}: no images/ + labels/ folders (flat or per split) found")
    for d in dirs:
        for image in sorted(p for p in (d / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            if not image.is_file():
                reading.bad(f"{path_problem(image) or f'{image} is not a file'}")
                continue
            label = d / "labels" / f"{image.stem}.txt"
            boxes = _yolo_boxes(reading, label, names) if os.path.lexists(label) else []
            item = None if boxes is None else reading.image_boxes(image, None, boxes, in_pixels=False)
            if item is not None:
                yield item


def _yolo_boxes(reading: _Reading, label: Path, names: list[str]) -> list[LabelBox] | None:
    """The boxes of one label file; None when the file was skipped as bad."""
    try:
        text = read_text(label)
    except VlmtuneError as e:
        reading.bad(str(e))
        return None
    boxes = []
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        problem = _yolo_line_problem(fields, len(names))
        if problem:
            reading.bad(f"{label}:{n}: {problem}: {line.strip()[:200]!r}")
            return None
        boxes.append(LabelBox(names[int(fields[0])], _yolo_box([float(f) for f in fields[1:]])))
    return boxes


def _yolo_box(values: list[float]) -> Box:
    """``x_center y_center width height``, or a polygon's points, as ``(x0, y0, x1, y1)``.

    >>> _yolo_box([0.5, 0.5, 0.2, 0.4])
    (0.4, 0.3, 0.6, 0.7)
    >>> _yolo_box([0.1, 0.2, 0.3, 0.1, 0.2, 0.4])
    (0.1, 0.1, 0.3, 0.4)
    """
    if len(values) == 4:
        cx, cy, w, h = values
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    xs, ys = values[0::2], values[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def _yolo_line_problem(fields: list[str], n_classes: int) -> str | None:
    if len(fields) < 5 or (len(fields) > 5 and len(fields) % 2 == 0):
        return "expected 'class x_center y_center width height' (or a polygon)"
    if not whole_number(fields[0]):
        return f"class index {fields[0][:20]!r} is not a whole number"
    try:
        numbers = [float(f) for f in fields[1:]]
    except ValueError:
        return "coordinates are not numbers"
    if int(fields[0]) >= n_classes:
        return (f"class index {fields[0]} but only {n_classes} class names are known "
                "(check data.yaml or --classes)")
    return box_problem(numbers)


# ---------------------------------------------------------------------- COCO
def _coco_files(root: Path) -> list[Path]:
    files = sorted(root.glob("*.json")) + [f for s in SPLIT_DIRS for f in sorted((root / s).glob("*.json"))]
    files += sorted((root / "annotations").glob("*.json"))
    return [f for f in files if f.name != "stats.json"]


def _read_coco(reading: _Reading) -> Iterator[ImageBoxes]:
    files = _coco_files(reading.root)
    if not files:
        raise VlmtuneError(f"{reading.root}: no COCO *.json annotation files found")
    for path in files:
        yield from _coco_file(reading, path)


def _coco_tables(path: Path) -> tuple[dict, list, list]:
    """A COCO file's ``{category id: name}``, its images and its annotations (entries unchecked)."""
    try:
        data = read_json(path)
    except VlmtuneError as e:
        raise VlmtuneError(f"{e}; fix the annotation file, or move it out of the data set") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise VlmtuneError(f"{path}: not a COCO annotation file: it needs lists 'images', 'annotations' "
                         "and 'categories'")
    categories = {}
    for k, c in enumerate(data["categories"]):
        if not (isinstance(c, dict) and _coco_id(c.get("id")) and _coco_id(c.get("name"))
                and str(c["name"]).strip()):
            raise VlmtuneError(f"{path}: category #{k} must be {{\"id\": <number>, \"name\": <text>}}, "
                             f"got {str(c)[:80]}; fix the file")
        categories[c["id"]] = str(c["name"]).strip().lower()
    return categories, data["images"], data["annotations"]


def _coco_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _coco_file(reading: _Reading, path: Path) -> Iterator[ImageBoxes]:
    categories, image_rows, annotations = _coco_tables(path)
    images = {}
    for k, im in enumerate(image_rows):
        if isinstance(im, dict) and _coco_id(im.get("id")) and isinstance(im.get("file_name"), str):
            images[im["id"]] = im
        else:
            reading.bad(f"{path}: image #{k} must be an object with an 'id' and a 'file_name', got {str(im)[:80]}")
    per_image: dict = {i: [] for i in images}
    bad_images = set()
    for k, ann in enumerate(annotations):
        problem = _annotation_problem(ann, images, categories)
        if problem:
            where = f"{path}: annotation #{k}" + (f" (id {ann.get('id')})" if isinstance(ann, dict) else "")
            reading.bad(f"{where}: {problem}")
            if isinstance(ann, dict) and _coco_id(ann.get("image_id")):
                bad_images.add(ann["image_id"])
        else:
            per_image[ann["image_id"]].append(_coco_box(ann, categories))
    folders = (path.parent, path.parent / "images", reading.root / "images", reading.root / "JPEGImages")
    for image_id, im in images.items():
        if image_id in bad_images:
            continue
        image, why = image_in_root(reading.root, folders, im["file_name"])
        if image is None:
            reading.bad(f"{path}: image id {image_id}: {why}")
            continue
        stated = stated_size(im.get("width"), im.get("height"))
        item = reading.image_boxes(image, stated, per_image[image_id], in_pixels=True)
        if item is not None:
            yield item


def _coco_box(ann: dict, categories: dict) -> LabelBox:
    """A checked annotation as a box in pixels ``(x0, y0, x1, y1)``: COCO writes ``[x, y, width, height]``."""
    box = ann.get("bbox")
    if box is not None:
        x, y, w, h = (float(v) for v in box)
        box = (x, y, x + w, y + h)
    return LabelBox(categories[ann["category_id"]], box, ann.get("iscrowd", 0) == 1)


def _annotation_problem(ann, images: dict, categories: dict) -> str | None:
    if not isinstance(ann, dict):
        return f"expected an object with image_id, category_id and bbox, got {str(ann)[:80]}"
    if not _coco_id(ann.get("image_id")) or ann["image_id"] not in images:
        return f"image_id {str(ann.get('image_id'))[:40]} is not in 'images'"
    if not _coco_id(ann.get("category_id")) or ann["category_id"] not in categories:
        return f"category_id {str(ann.get('category_id'))[:40]} is not in 'categories'"
    if ann.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd {str(ann['iscrowd'])[:40]} is not 0 or 1"
    box = ann.get("bbox")
    if box is None:
        return None
    if not (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        return f"bbox {str(box)[:80]} is not [x, y, width, height]"
    too_large = f"bbox {str(box)[:80]}: a coordinate or size is too large"
    try:
        x, y, w, h = (float(v) for v in box)
    except OverflowError:  # an integer too large for a float
        return too_large
    problem = box_problem([x, y, w, h])
    if problem:
        return f"bbox {str(box)[:80]}: {problem}"
    return None if math.isfinite(x + w + y + h) else too_large  # finite each, but x + w overflows


# ---------------------------------------------------------------------- VOC
def _voc_files(root: Path) -> list[Path]:
    dirs = [root, root / "Annotations"] + [root / s for s in SPLIT_DIRS]
    return [f for d in dirs for f in sorted(d.glob("*.xml"))]


def _read_voc(reading: _Reading) -> Iterator[ImageBoxes]:
    files = _voc_files(reading.root)
    if not files:
        raise VlmtuneError(f"{reading.root}: no VOC *.xml annotation files found")
    for path in files:
        item = _voc_file(reading, path)
        if item is not None:
            yield item


def _voc_file(reading: _Reading, path: Path) -> ImageBoxes | None:
    """One annotation file's image and boxes; None when skipped as bad."""
    tree, boxes, problem = _voc_labels(path)
    if problem:
        reading.bad(problem)
        return None
    folder = path.parent.parent / "JPEGImages" if path.parent.name == "Annotations" else path.parent
    folders = (folder, folder / "images", reading.root / "images", reading.root / "JPEGImages")
    image, why = image_in_root(reading.root, folders, tree.findtext("filename").strip())
    if image is None:
        reading.bad(f"{path}: {why}")
        return None
    size = tree.find("size")
    stated = None if size is None else stated_size(size.findtext("width"), size.findtext("height"))
    return reading.image_boxes(image, stated, boxes, in_pixels=True)


def _voc_labels(path: Path) -> tuple[ET.Element | None, list[LabelBox], str | None]:
    """The parsed annotation and its objects (boxes in pixels), or why the file cannot be used."""
    try:
        tree = ET.parse(path).getroot()
    except ET.ParseError as e:
        return None, [], f"{path}: not valid XML ({e})"
    except OSError:
        return None, [], path_problem(path) or f"{path} cannot be read"
    boxes = []
    for k, obj in enumerate(tree.iter("object")):
        box, why = _voc_box(obj.find("bndbox"))
        if why:
            return None, [], f"{path}: <object> #{k}: {why}"
        boxes.append(LabelBox((obj.findtext("name") or "").strip().lower(), box))
    if any(not b.cls for b in boxes) or not (tree.findtext("filename") or "").strip():
        return None, [], f"{path}: an <object> without <name>, or no <filename>"
    return tree, boxes, None


def _voc_box(bndbox: ET.Element | None) -> tuple[Box | None, str | None]:
    """A ``<bndbox>`` as a pixel box ``(x0, y0, x1, y1)``, None without one (no element, or one holding
    none of the four tags), or why it cannot be used."""
    texts = [None if bndbox is None else bndbox.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")]
    if all(t is None for t in texts):
        return None, None
    try:
        box = tuple(float(t) for t in texts)
    except (TypeError, ValueError):  # a missing tag (None), or text that is not a number
        return None, "<bndbox> needs numbers <xmin>, <ymin>, <xmax> and <ymax>"
    problem = box_problem(list(box))
    if not problem and (box[2] < box[0] or box[3] < box[1]):
        problem = "xmax or ymax is below xmin or ymin"
    return box, problem
