"""Procedural traffic scenes: the embedded data set that lets the whole toolkit run offline.

A grey road with dashed lane markings and pixel noise, and on it objects drawn so each class is
recognisable at 112 px: a car is a red box with a cabin and two black wheels, a motorcycle a
small blue triangle, a bus a big yellow box with a row of windows, a bicycle two green rings.

Two layouts:

- ``grid``: one object per cell of a 4×4 grid (28 px cells at 112 px). A tiny model learns to
  count these in a couple of CPU minutes.
- ``free``: random positions and sizes, colour jitter, limited overlap (``max_overlap``: the
  largest fraction of an object's box that other boxes may cover). With more objects (e.g.
  ``image_size=224, count_range=(0, 6)``) it is learned gradually, which the demo needs.
  ``object_scale`` multiplies every box (the reasoning demo draws fewer, larger objects).

With ``attributes=True`` each object also gets a colour drawn independently of its class (from
:data:`PALETTE`) and a size, small or large, with a clear gap between the two (:data:`SIZE_SCALES`),
so that "How many red cars?" cannot be answered from the class alone. Without it, the random
draws, images and labels are exactly those of the earlier versions.

Scenes are written as ``images/`` + ``labels/`` (YOLO) + ``data.yaml``, the layout
``vlmtune data from-detections`` reads, so synthetic and real data take the same path, and
``objects/NAME.json`` beside them keeps each scene's object list (class, box in pixels, colour,
size; ``size`` is null without ``attributes``), which ``vlmtune data tasks`` reads. Each image's
randomness comes from ``(seed, index)``, so the result does not depend on the number of workers.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import json

import numpy as np
import yaml
from PIL import Image, ImageDraw

from vlmtune.errors import VlmtuneError
from vlmtune.tasks.counting import DEFAULT_CLASSES

GRID = 4
# Box size (width, height) of each class, in units of one grid cell (free layout: image/7).
SHAPES = {"car": (0.85, 0.6), "motorcycle": (0.5, 0.5), "bus": (1.0, 0.8), "bicycle": (0.85, 0.45)}
# The colour each class is painted without ``attributes`` (the name is recorded in the scene).
CLASS_COLOURS = {"car": "red", "motorcycle": "blue", "bus": "yellow", "bicycle": "green"}
PALETTE = {
    "red": (205, 35, 35), "blue": (40, 80, 220), "yellow": (235, 200, 30), "green": (40, 190, 60),
    "purple": (150, 60, 200),
}
# Scale ranges of the two sizes (free layout: times the class's box; grid: also divided by the
# largest, so a large object still fits its cell). The gap (0.75 to 1.1, areas 1:2.2) keeps
# "small" and "large" apart at a glance.
SIZE_SCALES = {"small": (0.6, 0.75), "large": (1.1, 1.35)}


@dataclass(frozen=True)
class SceneConfig:
    seed: int = 0
    image_size: int = 112
    layout: str = "grid"
    count_range: tuple[int, int] = (0, 4)
    classes: tuple[str, ...] = DEFAULT_CLASSES
    max_overlap: float = 0.1
    attributes: bool = False
    object_scale: float = 1.0  # free layout: every box times this (2.0: objects twice as wide and tall)

    def check(self) -> None:
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise VlmtuneError(f"synthetic scenes draw only {', '.join(SHAPES)}; not {', '.join(unknown)}")
        low, high = self.count_range
        if not 0 <= low <= high:
            raise VlmtuneError(f"count range {self.count_range}: need 0 <= low <= high")
        if self.layout not in ("grid", "free"):
            raise VlmtuneError(f"layout {self.layout!r}: choose grid or free")
        if self.layout == "grid" and high * len(self.classes) > GRID * GRID:
            raise VlmtuneError(
                f"the grid layout has {GRID * GRID} cells but up to {high * len(self.classes)} objects; "
                "lower the count range or use --layout free"
            )
        if not 0.25 <= self.object_scale <= 3.0:
            raise VlmtuneError(f"object scale {self.object_scale}: use 0.25 to 3 (1 is the usual size)")
        if self.object_scale != 1.0 and self.layout != "free":
            raise VlmtuneError("object scale applies to the free layout only (grid objects fill their cells)")
        if self.image_size < 32:
            raise VlmtuneError(f"image size {self.image_size}: use at least 32 px")


# ---------------------------------------------------------------------- drawing
def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def draw_object(
    draw: ImageDraw.ImageDraw, cls: str, box: tuple[float, ...], rng: np.random.Generator, jitter: int,
    colour: str | None = None,
) -> None:
    """Draw one object; ``colour`` (a :data:`PALETTE` name) replaces the class's own colour."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    paint = PALETTE[colour or CLASS_COLOURS[cls]]
    if cls == "car":
        body = _jitter(rng, paint, jitter)
        draw.rectangle((x0 + 0.25 * w, y0, x1 - 0.25 * w, y0 + 0.35 * h), fill=body)
        draw.rectangle((x0, y0 + 0.3 * h, x1, y1 - 0.2 * h), fill=body)
        r = 0.2 * h
        for cx in (x0 + 0.25 * w, x1 - 0.25 * w):
            draw.ellipse((cx - r, y1 - 2 * r, cx + r, y1), fill=(15, 15, 15))
    elif cls == "motorcycle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=_jitter(rng, paint, jitter))
    elif cls == "bus":
        draw.rectangle(box, fill=_jitter(rng, paint, jitter))
        pane = w / 4
        for k in range(3):
            wx = x0 + pane * (0.5 + k * 1.1)
            draw.rectangle((wx, y0 + 0.15 * h, wx + 0.7 * pane, y0 + 0.45 * h), fill=(170, 220, 250))
    elif cls == "bicycle":
        ring = _jitter(rng, paint, jitter)
        d, width = min(w / 2, h), max(1, round(min(w, h) / 6))
        for left in (x0, x1 - d):
            draw.ellipse((left, y1 - d, left + d, y1), outline=ring, width=width)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    grey = int(rng.integers(85, 125))
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    dash = max(4, size // 14)
    for _ in range(int(rng.integers(1, 3))):
        y = int(rng.integers(size // 8, size - size // 8))
        offset = int(rng.integers(0, 2 * dash))
        for x in range(-offset, size, 2 * dash):
            draw.rectangle((x, y, x + dash, y + max(1, size // 56)), fill=(230, 230, 230))
    return image


def _overlap(box: tuple[float, ...], others: list[tuple[float, ...]]) -> float:
    """Fraction of ``box`` covered by the others (summed; an upper bound when they overlap)."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    covered = 0.0
    for o in others:
        w = min(box[2], o[2]) - max(box[0], o[0])
        h = min(box[3], o[3]) - max(box[1], o[1])
        covered += max(w, 0) * max(h, 0)
    return covered / area


def _layout_boxes(
    objects: list[int], cfg: SceneConfig, rng: np.random.Generator, scales: list[float] | None = None
) -> list[tuple[int, tuple]]:
    """(object number, box) for each object that could be placed.

    ``scales`` (with ``attributes``) fixes each object's scale; without it the free layout draws
    one per object, as it always has.
    """
    size = cfg.image_size
    placed: list[tuple[int, tuple]] = []
    if cfg.layout == "grid":
        cell = size / GRID
        cells = rng.permutation(GRID * GRID)[: len(objects)]
        for i, (k, c) in enumerate(zip(objects, cells)):
            shrink = scales[i] / SIZE_SCALES["large"][1] if scales else 1.0
            w, h = (s * cell * 0.9 * shrink for s in SHAPES[cfg.classes[k]])
            cx = (c % GRID + 0.5) * cell + rng.uniform(-1, 1) * (cell - w) / 2
            cy = (c // GRID + 0.5) * cell + rng.uniform(-1, 1) * (cell - h) / 2
            placed.append((i, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
        return placed
    unit = size / 7 * cfg.object_scale
    for i, k in enumerate(objects):
        scale = scales[i] if scales else rng.uniform(0.75, 1.25)
        w, h = (s * unit * scale for s in SHAPES[cfg.classes[k]])
        for _ in range(60):
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            box = (x0, y0, x0 + w, y0 + h)
            others = [b for _, b in placed]
            fits = _overlap(box, others) <= cfg.max_overlap
            if fits and all(_overlap(b, [box]) <= cfg.max_overlap for b in others):
                placed.append((i, box))
                break
    return placed


def _attributes(n: int, rng: np.random.Generator) -> list[tuple[str, str, float]]:
    """(colour, size, scale) per object; the colour is drawn independently of the class."""
    colours, sizes = list(PALETTE), list(SIZE_SCALES)
    drawn = []
    for _ in range(n):
        colour = colours[int(rng.integers(len(colours)))]
        size = sizes[int(rng.integers(len(sizes)))]
        drawn.append((colour, size, float(rng.uniform(*SIZE_SCALES[size]))))
    return drawn


def draw_scene_objects(index: int, cfg: SceneConfig) -> tuple[Image.Image, list[dict]]:
    """Scene ``index``: the image and its objects ``{"class", "box", "colour", "size"}``.

    Same (seed, index), same scene. ``size`` is None without ``cfg.attributes``.
    """
    rng = np.random.default_rng([cfg.seed, index])
    low, high = cfg.count_range
    counts = rng.integers(low, high + 1, size=len(cfg.classes))
    objects = [k for k, n in enumerate(counts) for _ in range(n)]
    objects = [objects[i] for i in rng.permutation(len(objects))]
    attributes = _attributes(len(objects), rng) if cfg.attributes else None
    image = _background(rng, cfg.image_size)
    boxes = _layout_boxes(objects, cfg, rng, [a[2] for a in attributes] if attributes else None)
    draw = ImageDraw.Draw(image)
    jitter = 25 if cfg.layout == "free" else 10
    drawn = []
    for i, box in boxes:
        cls = cfg.classes[objects[i]]
        colour, size = attributes[i][:2] if attributes else (CLASS_COLOURS[cls], None)
        draw_object(draw, cls, box, rng, jitter, colour)
        drawn.append({"class": cls, "box": [float(v) for v in box], "colour": colour, "size": size})
    noise = rng.integers(-8, 9, size=(cfg.image_size, cfg.image_size, 1), dtype=np.int16)
    pixels = np.asarray(image, dtype=np.int16) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), drawn


def draw_scene(index: int, cfg: SceneConfig) -> tuple[Image.Image, list[tuple[int, tuple]]]:
    """Scene ``index``: the image and its (class index, box) list. Same (seed, index), same scene."""
    image, drawn = draw_scene_objects(index, cfg)
    return image, [(cfg.classes.index(o["class"]), tuple(o["box"])) for o in drawn]


def _write_range(out_dir: Path, start: int, stop: int, cfg: SceneConfig) -> None:
    size = cfg.image_size
    for index in range(start, stop):
        image, drawn = draw_scene_objects(index, cfg)
        name = f"scene_{index:06d}"
        image.save(out_dir / "images" / f"{name}.png", compress_level=1)
        rows = []
        for o in drawn:
            x0, y0, x1, y1 = o["box"]
            rows.append(f"{cfg.classes.index(o['class'])} {(x0 + x1) / 2 / size:.6f} "
                        f"{(y0 + y1) / 2 / size:.6f} {(x1 - x0) / size:.6f} {(y1 - y0) / size:.6f}")
        (out_dir / "labels" / f"{name}.txt").write_text("".join(r + "\n" for r in rows))
        scene = {"image": f"images/{name}.png", "width": size, "height": size, "objects": drawn}
        (out_dir / "objects" / f"{name}.json").write_text(json.dumps(scene) + "\n")


# ---------------------------------------------------------------------- data sets
def generate_scenes(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    image_size: int = 112,
    layout: str = "grid",
    count_range: tuple[int, int] = (0, 4),
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    workers: int = 2,
    max_overlap: float = 0.1,
    attributes: bool = False,
    object_scale: float = 1.0,
) -> Path:
    """Write ``n`` scenes as ``OUT/images``, ``OUT/labels`` (YOLO), ``OUT/objects`` (one JSON
    object list per scene) and ``OUT/data.yaml``.

    Small sets (under 200 images) are drawn in this process: a pool costs more than it saves.
    """
    cfg = SceneConfig(seed, image_size, layout, tuple(count_range), tuple(classes), max_overlap, attributes,
                      object_scale)
    cfg.check()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "objects").mkdir(parents=True, exist_ok=True)
    if workers <= 1 or n < 200:
        _write_range(out, 0, n, cfg)
    else:
        chunk = max(50, n // (workers * 8))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            jobs = [pool.submit(_write_range, out, s, min(s + chunk, n), cfg) for s in range(0, n, chunk)]
            for job in jobs:
                job.result()
    meta = {**asdict(cfg), "count_range": list(cfg.count_range), "classes": list(cfg.classes), "n": n}
    if not attributes:
        del meta["attributes"]  # data.yaml stays byte for byte what earlier versions wrote
    if object_scale == 1.0:
        del meta["object_scale"]
    (out / "data.yaml").write_text(
        yaml.safe_dump({"names": list(cfg.classes), "nc": len(cfg.classes), "synth": meta}, sort_keys=False)
    )
    return out


def scene_items(scenes_dir: str | Path, split: dict[str, float] | None = None) -> list[dict]:
    """Each scene's image path, counts (every class) and split: what SFT records are made from."""
    from vlmtune.data.detections import class_names, read_detections
    from vlmtune.data.pairs import DEFAULT_SPLIT, split_for

    classes = class_names(scenes_dir)
    return [
        {
            "image": str(item.image),
            "counts": {c: item.counts.get(c, 0) for c in classes},
            "split": split_for(item.source, split or DEFAULT_SPLIT),
        }
        for item in read_detections(scenes_dir)
    ]


def synth_pairs_file(
    out_dir: str | Path,
    n_images: int,
    seed: int = 0,
    image_size: int = 112,
    layout: str = "grid",
    count_range: tuple[int, int] = (0, 4),
    rejects_per_image: int = 1,
    workers: int = 2,
) -> Path:
    """Scenes in ``OUT/scenes`` and all their pairs (every split) in ``OUT/pairs.jsonl``."""
    from vlmtune.data.detections import read_detections
    from vlmtune.data.pairs import PairStats, build_pairs, write_pairs
    from vlmtune.tasks.counting import CountingTask

    out = Path(out_dir)
    scenes = generate_scenes(out / "scenes", n_images, seed, image_size, layout, count_range, workers=workers)
    task = CountingTask(DEFAULT_CLASSES)
    stats = PairStats(classes=list(task.classes))
    items = read_detections(scenes)
    records = build_pairs(items, task, stats, rejects_per_image=rejects_per_image, seed=seed)
    path = out / "pairs.jsonl"
    write_pairs(records, path)
    return path
