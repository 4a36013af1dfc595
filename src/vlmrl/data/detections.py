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
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

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
    root = Path(root).resolve()
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
    root = Path(root).resolve()
    fmt = detect_format(root) if fmt == "auto" else fmt
    if classes:
        return [c.strip().lower() for c in classes]
    if fmt == "yolo":
        return _yaml_names(root)
    if fmt == "coco":
        names: list[str] = []
        for path in _coco_files(root):
            try:
                categories = sorted(json.loads(path.read_text())["categories"], key=lambda c: c["id"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise VlmrlError(f"{path}: not a COCO annotation file ({type(e).__name__}: {e})") from None
            names += [str(c["name"]).strip().lower() for c in categories]
        return list(dict.fromkeys(names))
    return None


def _bad(message: str, skip_bad: bool, skipped: list[str]) -> None:
    if not skip_bad:
        raise VlmrlError(f"{message} (fix it, or pass --skip-bad to skip it and report it)")
    skipped.append(message)


def _split_of(rel: Path) -> str | None:
    first = rel.parts[0] if len(rel.parts) > 1 else None
    return {"valid": "val"}.get(first, first) if first in SPLIT_DIRS else None


# ---------------------------------------------------------------------- YOLO
def _yolo_dirs(root: Path) -> list[Path]:
    """Folders holding an ``images/`` + ``labels/`` pair: the root (flat) and split folders."""
    candidates = [root] + [root / s for s in SPLIT_DIRS]
    return [d for d in candidates if (d / "images").is_dir() and (d / "labels").is_dir()]


def _yaml_names(root: Path) -> list[str]:
    path = next((p for p in (root / "data.yaml", root / "data.yml") if p.is_file()), None)
    if path is None:
        raise VlmrlError(
            f"{root}: no data.yaml, so the YOLO class names are unknown; pass them in index "
            "order, e.g. --classes Ambulance,Bus,Car,Motorcycle,Truck"
        )
    try:
        names = (yaml.safe_load(path.read_text()) or {}).get("names")
    except yaml.YAMLError as e:
        raise VlmrlError(f"{path}: not valid YAML ({e}); fix it or pass --classes") from None
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    if not isinstance(names, list) or not names:
        raise VlmrlError(f"{path}: no 'names' list of classes; add one or pass --classes")
    return [str(n).strip().lower() for n in names]


def _read_yolo(root: Path, names: list[str], skip_bad: bool, skipped: list[str]) -> Iterator[ImageCounts]:
    dirs = _yolo_dirs(root)
    if not dirs:
        raise VlmrlError(f"{root}: no images/ + labels/ folders (flat or per split) found")
    for d in dirs:
        for image in sorted(p for p in (d / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            label = d / "labels" / f"{image.stem}.txt"
            counts = _yolo_counts(label, names, skip_bad, skipped) if label.is_file() else Counter()
            if counts is None:
                continue
            rel = image.relative_to(root)
            yield ImageCounts(image, rel.as_posix(), source_name(image), _split_of(rel), counts)


def _yolo_counts(label: Path, names: list[str], skip_bad: bool, skipped: list[str]) -> Counter | None:
    """Counts of one label file; None when the file was skipped as bad."""
    counts: Counter = Counter()
    for n, line in enumerate(label.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        problem = _yolo_line_problem(fields, len(names))
        if problem:
            _bad(f"{label}:{n}: {problem}: {line.strip()!r}", skip_bad, skipped)
            return None
        counts[names[int(fields[0])]] += 1
    return counts


def _yolo_line_problem(fields: list[str], n_classes: int) -> str | None:
    if len(fields) < 5 or (len(fields) > 5 and len(fields) % 2 == 0):
        return "expected 'class x_center y_center width height' (or a polygon)"
    if not fields[0].isdigit():
        return f"class index {fields[0]!r} is not a whole number"
    try:
        [float(f) for f in fields[1:]]
    except ValueError:
        return "coordinates are not numbers"
    if int(fields[0]) >= n_classes:
        return (f"class index {fields[0]} but only {n_classes} class names are known "
                "(check data.yaml or --classes)")
    return None


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


def _coco_file(root: Path, path: Path, skip_bad: bool, skipped: list[str]) -> Iterator[ImageCounts]:
    try:
        data = json.loads(path.read_text())
        categories = {c["id"]: str(c["name"]).strip().lower() for c in data["categories"]}
        images = {im["id"]: im["file_name"] for im in data["images"]}
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise VlmrlError(f"{path}: not a COCO annotation file ({type(e).__name__}: {e})") from None
    per_image: dict = {i: Counter() for i in images}
    bad_images = set()
    for k, ann in enumerate(annotations):
        where = f"{path}: annotation #{k} (id {ann.get('id')})"
        if ann.get("image_id") not in images:
            _bad(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'", skip_bad, skipped)
        elif ann.get("category_id") not in categories:
            _bad(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'", skip_bad, skipped)
            bad_images.add(ann["image_id"])
        else:
            per_image[ann["image_id"]][categories[ann["category_id"]]] += 1
    for image_id, file_name in images.items():
        if image_id in bad_images:
            continue
        image = _find_image(path.parent, root, file_name)
        rel = image.relative_to(root) if image.is_relative_to(root) else Path(image.name)
        yield ImageCounts(image, rel.as_posix(), source_name(image), _split_of(rel), per_image[image_id])


def _find_image(folder: Path, root: Path, file_name: str) -> Path:
    for base in (folder, folder / "images", root / "images", root / "JPEGImages"):
        if (base / file_name).is_file():
            return (base / file_name).resolve()
    return (folder / file_name).resolve()


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
        names = [(obj.findtext("name") or "").strip().lower() for obj in tree.iter("object")]
        if "" in names or tree.findtext("filename") is None:
            _bad(f"{path}: an <object> without <name>, or no <filename>", skip_bad, skipped)
            continue
        folder = path.parent.parent / "JPEGImages" if path.parent.name == "Annotations" else path.parent
        image = _find_image(folder, root, tree.findtext("filename").strip())
        rel = image.relative_to(root) if image.is_relative_to(root) else Path(image.name)
        yield ImageCounts(image, rel.as_posix(), source_name(image), _split_of(rel), Counter(names))
