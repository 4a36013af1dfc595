"""Read object-detection labels (YOLO, COCO JSON, Pascal VOC XML) as per-image class counts.

Layouts understood:

- YOLO, Roboflow export: ``data.yaml`` + ``{train,valid,test}/{images,labels}``; flat:
  ``images/`` + ``labels/``. Class names come from ``data.yaml`` or from ``classes`` (names in
  index order); an image without a label file has no objects (YOLO's convention).
- COCO: any ``*.json`` with ``images``/``annotations``/``categories`` in the folder or its split
  folders (Roboflow writes ``{split}/_annotations.coco.json`` beside the images).
- Pascal VOC: ``*.xml`` files in ``Annotations/`` (images in ``JPEGImages/``) or beside the images.

Every reader yields :class:`ImageCounts` one image at a time (images are never opened). Class
names are lower-cased. A malformed label raises :class:`VlmrlError` naming ``file:line``,
unless ``skip_bad`` is given, in which case the problem is appended to ``skipped`` instead.
Malformed means: not UTF-8, a class index that is not a whole number of ASCII digits or is out
of range, a box coordinate or size that is not a finite number >= 0, a COCO entry that is not an
object, a COCO or VOC image file that is missing or whose name leads outside the data set's root
(``../../etc/passwd``), an unreadable file (a symbolic link that loops, say). A class list that
cannot be read (``data.yaml`` not a mapping, ``names`` holding lists, mappings or values YAML
reads as booleans, a mapping whose keys are not 0..n-1) is an error even with ``skip_bad``.
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

from vlmrl.data.text_files import path_problem, read_json, read_text, read_yaml, require_path
from vlmrl.errors import VlmrlError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
SPLIT_DIRS = ("train", "valid", "val", "test")
_ROBOFLOW_COPY = re.compile(r"^(?P<source>.+)_(?:jpg|jpeg|png|bmp|webp)\.rf\.[A-Za-z0-9]+$", re.I)


@dataclass
class ImageCounts:
    """One image's object counts by class name, before mapping and dropping."""

    image: Path  # absolute
    rel: str  # path relative to the data set root, for ids and messages
    source: str  # the source photo: augmentation copies of one photo share it
    split: str | None  # the split folder it came from, if any
    counts: Counter


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
        raise VlmrlError(f"{root}: not a folder (give the data set's root folder)")
    if (root / "data.yaml").is_file() or (root / "data.yml").is_file() or _yolo_dirs(root):
        return "yolo"
    if _coco_files(root):
        return "coco"
    if _voc_files(root):
        return "voc"
    raise VlmrlError(
        f"{root}: found no YOLO (images/ + labels/), COCO (*.json) or VOC (*.xml) labels; "
        "point at the data set's root folder"
    )


def read_detections(
    root: str | Path,
    fmt: str = "auto",
    classes: list[str] | None = None,
    skip_bad: bool = False,
    skipped: list[str] | None = None,
) -> Iterator[ImageCounts]:
    """Yield each image's counts. ``skipped`` collects what ``skip_bad`` skipped (file:line why)."""
    root = _root(root)
    fmt = detect_format(root) if fmt == "auto" else fmt
    skipped = [] if skipped is None else skipped
    if fmt == "yolo":
        names = [c.strip().lower() for c in classes] if classes else _yaml_names(root)
        return _read_yolo(root, names, skip_bad, skipped)
    if fmt == "coco":
        return _read_coco(root, skip_bad, skipped)
    if fmt == "voc":
        return _read_voc(root, skip_bad, skipped)
    raise VlmrlError(f"unknown detection format {fmt!r}; use auto, yolo, coco or voc")


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


def _bad(message: str, skip_bad: bool, skipped: list[str]) -> None:
    if not skip_bad:
        raise VlmrlError(f"{message} (fix it, or pass --skip-bad to skip it and report it)")
    skipped.append(message)


def _split_of(rel: Path) -> str | None:
    first = rel.parts[0] if len(rel.parts) > 1 else None
    return {"valid": "val"}.get(first, first) if first in SPLIT_DIRS else None


def _whole_number(text: str) -> bool:
    """ASCII digits only, short enough for int(): '²'.isdigit() is True but int('²') fails."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def _box_problem(numbers: list[float]) -> str | None:
    """Why box coordinates and sizes cannot be used: not finite, or negative."""
    if not all(math.isfinite(v) for v in numbers):
        return "a coordinate or size is NaN or infinite"
    if any(v < 0 for v in numbers):
        return "a coordinate or size is negative"
    return None


def _image_in_root(root: Path, folders: tuple[Path, ...], file_name: str) -> tuple[Path | None, str]:
    """The image ``file_name`` names, found in the first of ``folders`` holding it, or None and why.

    Names are joined and normalised without following links, and must stay inside ``root``.
    """
    candidates = list(dict.fromkeys(Path(os.path.normpath(folder / file_name)) for folder in folders))
    inside = [c for c in candidates if c.is_relative_to(root)]
    if not inside:
        return None, f"file_name {file_name!r} leads outside the data set's root {root}"
    for image in inside:
        if image.is_file():
            return image, ""
    looked = ", ".join(str(c.parent) for c in inside)
    return None, f"image {file_name!r} not found (looked in {looked})"


# ---------------------------------------------------------------------- YOLO
def _yolo_dirs(root: Path) -> list[Path]:
    """Folders holding an ``images/`` + ``labels/`` pair: the root (flat) and split folders."""
    candidates = [root] + [root / s for s in SPLIT_DIRS]
    return [d for d in candidates if (d / "images").is_dir() and (d / "labels").is_dir()]


def _yaml_names(root: Path) -> list[str]:
    path = next((p for p in (root / "data.yaml", root / "data.yml") if os.path.lexists(p)), None)
    if path is None:
        raise VlmrlError(
            f"{root}: no data.yaml, so the YOLO class names are unknown; pass them in index "
            "order, e.g. --classes Ambulance,Bus,Car,Motorcycle,Truck"
        )
    try:
        data = read_yaml(path)
        data = {} if data is None else data  # an empty file
    except VlmrlError as e:
        raise VlmrlError(f"{e}; fix it or pass --classes") from None
    if not isinstance(data, dict):
        raise VlmrlError(f"{path}: expected a mapping with a 'names' key, got a YAML "
                         f"{type(data).__name__}; fix it or pass --classes")
    names = data.get("names")
    if isinstance(names, dict):
        names = _indexed_names(path, names)
    if not isinstance(names, list) or not names:
        raise VlmrlError(f"{path}: no 'names' list of classes; add one or pass --classes")
    for k, name in enumerate(names):
        if isinstance(name, bool) or not isinstance(name, (str, int)) or not str(name).strip():
            raise VlmrlError(f"{path}: names[{k}] is {repr(name)[:80]}, not a class name; give each class one "
                             "name (quote names YAML reads otherwise, e.g. 'no', 'on') or pass --classes")
    return [str(n).strip().lower() for n in names]


def _indexed_names(path: Path, names: dict) -> list:
    """``{0: car, 1: bus}`` → ``[car, bus]``; the keys must be exactly 0..n-1."""
    indexes = {}
    for key in names:
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and _whole_number(key))):
            raise VlmrlError(f"{path}: 'names' key {key!r} is not a class index; write names as a list, "
                             "or as 0: name, 1: name, ...; or pass --classes")
        indexes[int(key)] = names[key]
    if sorted(indexes) != list(range(len(indexes))):
        raise VlmrlError(f"{path}: 'names' keys are {sorted(indexes)}, not 0..{len(indexes) - 1}; "
                         "number the classes from 0 without gaps, or pass --classes")
    return [indexes[i] for i in range(len(indexes))]


def _read_yolo(root: Path, names: list[str], skip_bad: bool, skipped: list[str]) -> Iterator[ImageCounts]:
    dirs = _yolo_dirs(root)
    if not dirs:
        raise VlmrlError(f"{root}: no images/ + labels/ folders (flat or per split) found")
    for d in dirs:
        for image in sorted(p for p in (d / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            if not image.is_file():
                _bad(f"{path_problem(image) or f'{image} is not a file'}", skip_bad, skipped)
                continue
            label = d / "labels" / f"{image.stem}.txt"
            counts = _yolo_counts(label, names, skip_bad, skipped) if os.path.lexists(label) else Counter()
            if counts is None:
                continue
            rel = image.relative_to(root)
            yield ImageCounts(image, rel.as_posix(), source_name(image), _split_of(rel), counts)


def _yolo_counts(label: Path, names: list[str], skip_bad: bool, skipped: list[str]) -> Counter | None:
    """Counts of one label file; None when the file was skipped as bad."""
    try:
        text = read_text(label)
    except VlmrlError as e:
        _bad(str(e), skip_bad, skipped)
        return None
    counts: Counter = Counter()
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        problem = _yolo_line_problem(fields, len(names))
        if problem:
            _bad(f"{label}:{n}: {problem}: {line.strip()[:200]!r}", skip_bad, skipped)
            return None
        counts[names[int(fields[0])]] += 1
    return counts


def _yolo_line_problem(fields: list[str], n_classes: int) -> str | None:
    if len(fields) < 5 or (len(fields) > 5 and len(fields) % 2 == 0):
        return "expected 'class x_center y_center width height' (or a polygon)"
    if not _whole_number(fields[0]):
        return f"class index {fields[0][:20]!r} is not a whole number"
    try:
        numbers = [float(f) for f in fields[1:]]
    except ValueError:
        return "coordinates are not numbers"
    if int(fields[0]) >= n_classes:
        return (f"class index {fields[0]} but only {n_classes} class names are known "
                "(check data.yaml or --classes)")
    return _box_problem(numbers)


# ---------------------------------------------------------------------- COCO
def _coco_files(root: Path) -> list[Path]:
    files = sorted(root.glob("*.json")) + [f for s in SPLIT_DIRS for f in sorted((root / s).glob("*.json"))]
    files += sorted((root / "annotations").glob("*.json"))
    return [f for f in files if f.name != "stats.json"]


def _read_coco(root: Path, skip_bad: bool, skipped: list[str]) -> Iterator[ImageCounts]:
    files = _coco_files(root)
    if not files:
        raise VlmrlError(f"{root}: no COCO *.json annotation files found")
    for path in files:
        yield from _coco_file(root, path, skip_bad, skipped)


def _coco_tables(path: Path) -> tuple[dict, list, list]:
    """A COCO file's ``{category id: name}``, its images and its annotations (entries unchecked)."""
    try:
        data = read_json(path)
    except VlmrlError as e:
        raise VlmrlError(f"{e}; fix the annotation file, or move it out of the data set") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise VlmrlError(f"{path}: not a COCO annotation file: it needs lists 'images', 'annotations' "
                         "and 'categories'")
    categories = {}
    for k, c in enumerate(data["categories"]):
        if not (isinstance(c, dict) and _coco_id(c.get("id")) and _coco_id(c.get("name"))
                and str(c["name"]).strip()):
            raise VlmrlError(f"{path}: category #{k} must be {{\"id\": <number>, \"name\": <text>}}, "
                             f"got {str(c)[:80]}; fix the file")
        categories[c["id"]] = str(c["name"]).strip().lower()
    return categories, data["images"], data["annotations"]


def _coco_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _coco_file(root: Path, path: Path, skip_bad: bool, skipped: list[str]) -> Iterator[ImageCounts]:
    categories, image_rows, annotations = _coco_tables(path)
    images = {}
    for k, im in enumerate(image_rows):
        if isinstance(im, dict) and _coco_id(im.get("id")) and isinstance(im.get("file_name"), str):
            images[im["id"]] = im["file_name"]
        else:
            _bad(f"{path}: image #{k} must be an object with an 'id' and a 'file_name', got {str(im)[:80]}",
                 skip_bad, skipped)
    per_image: dict = {i: Counter() for i in images}
    bad_images = set()
    for k, ann in enumerate(annotations):
        problem = _annotation_problem(ann, images, categories)
        if problem:
            where = f"{path}: annotation #{k}" + (f" (id {ann.get('id')})" if isinstance(ann, dict) else "")
            _bad(f"{where}: {problem}", skip_bad, skipped)
            if isinstance(ann, dict) and _coco_id(ann.get("image_id")):
                bad_images.add(ann["image_id"])
        else:
            per_image[ann["image_id"]][categories[ann["category_id"]]] += 1
    for k, (image_id, file_name) in enumerate(images.items()):
        if image_id in bad_images:
            continue
        folders = (path.parent, path.parent / "images", root / "images", root / "JPEGImages")
        image, why = _image_in_root(root, folders, file_name)
        if image is None:
            _bad(f"{path}: image id {image_id}: {why}", skip_bad, skipped)
            continue
        rel = image.relative_to(root)
        yield ImageCounts(image, rel.as_posix(), source_name(image), _split_of(rel), per_image[image_id])


def _annotation_problem(ann, images: dict, categories: dict) -> str | None:
    if not isinstance(ann, dict):
        return f"expected an object with image_id, category_id and bbox, got {str(ann)[:80]}"
    if not _coco_id(ann.get("image_id")) or ann["image_id"] not in images:
        return f"image_id {str(ann.get('image_id'))[:40]} is not in 'images'"
    if not _coco_id(ann.get("category_id")) or ann["category_id"] not in categories:
        return f"category_id {str(ann.get('category_id'))[:40]} is not in 'categories'"
    box = ann.get("bbox")
    if box is None:
        return None
    if not (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        return f"bbox {str(box)[:80]} is not [x, y, width, height]"
    problem = _box_problem([float(v) for v in box])
    return f"bbox {box}: {problem}" if problem else None


# ---------------------------------------------------------------------- VOC
def _voc_files(root: Path) -> list[Path]:
    dirs = [root, root / "Annotations"] + [root / s for s in SPLIT_DIRS]
    return [f for d in dirs for f in sorted(d.glob("*.xml"))]


def _read_voc(root: Path, skip_bad: bool, skipped: list[str]) -> Iterator[ImageCounts]:
    files = _voc_files(root)
    if not files:
        raise VlmrlError(f"{root}: no VOC *.xml annotation files found")
    for path in files:
        try:
            tree = ET.parse(path).getroot()
        except ET.ParseError as e:
            _bad(f"{path}: not valid XML ({e})", skip_bad, skipped)
            continue
        except OSError:
            _bad(path_problem(path) or f"{path} cannot be read", skip_bad, skipped)
            continue
        names = [(obj.findtext("name") or "").strip().lower() for obj in tree.iter("object")]
        if "" in names or not (tree.findtext("filename") or "").strip():
            _bad(f"{path}: an <object> without <name>, or no <filename>", skip_bad, skipped)
            continue
        folder = path.parent.parent / "JPEGImages" if path.parent.name == "Annotations" else path.parent
        image, why = _image_in_root(root, (folder, folder / "images", root / "images", root / "JPEGImages"),
                                    tree.findtext("filename").strip())
        if image is None:
            _bad(f"{path}: {why}", skip_bad, skipped)
            continue
        rel = image.relative_to(root)
        yield ImageCounts(image, rel.as_posix(), source_name(image), _split_of(rel), Counter(names))
