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

Scenes are written as ``images/`` + ``labels/`` (YOLO) + ``data.yaml``, the layout
``vlmrl data from-detections`` reads, so synthetic and real data take the same path. Each image's
randomness comes from ``(seed, index)``, so the result does not depend on the number of workers.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from vlmrl.errors import VlmrlError
from vlmrl.tasks.counting import DEFAULT_CLASSES

GRID = 4
# Box size (width, height) of each class, in units of one grid cell (free layout: image/7).
SHAPES = {"car": (0.85, 0.6), "motorcycle": (0.5, 0.5), "bus": (1.0, 0.8), "bicycle": (0.85, 0.45)}


@dataclass(frozen=True)
class SceneConfig:
    seed: int = 0
    image_size: int = 112
    layout: str = "grid"
    count_range: tuple[int, int] = (0, 4)
    classes: tuple[str, ...] = DEFAULT_CLASSES
    max_overlap: float = 0.1

    def check(self) -> None:
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise VlmrlError(f"synthetic scenes draw only {', '.join(SHAPES)}; not {', '.join(unknown)}")
        low, high = self.count_range
        if not 0 <= low <= high:
            raise VlmrlError(f"count range {self.count_range}: need 0 <= low <= high")
        if self.layout not in ("grid", "free"):
            raise VlmrlError(f"layout {self.layout!r}: choose grid or free")
        if self.layout == "grid" and high * len(self.classes) > GRID * GRID:
            raise VlmrlError(
                f"the grid layout has {GRID * GRID} cells but up to {high * len(self.classes)} objects; "
                "lower the count range or use --layout free"
            )
        if self.image_size < 32:
            raise VlmrlError(f"image size {self.image_size}: use at least 32 px")


# ---------------------------------------------------------------------- drawing
def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def draw_object(
    draw: ImageDraw.ImageDraw, cls: str, box: tuple[float, ...], rng: np.random.Generator, jitter: int
) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if cls == "car":
        red = _jitter(rng, (205, 35, 35), jitter)
        draw.rectangle((x0 + 0.25 * w, y0, x1 - 0.25 * w, y0 + 0.35 * h), fill=red)
        draw.rectangle((x0, y0 + 0.3 * h, x1, y1 - 0.2 * h), fill=red)
        r = 0.2 * h
        for cx in (x0 + 0.25 * w, x1 - 0.25 * w):
            draw.ellipse((cx - r, y1 - 2 * r, cx + r, y1), fill=(15, 15, 15))
    elif cls == "motorcycle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=_jitter(rng, (40, 80, 220), jitter))
    elif cls == "bus":
        draw.rectangle(box, fill=_jitter(rng, (235, 200, 30), jitter))
        pane = w / 4
        for k in range(3):
            wx = x0 + pane * (0.5 + k * 1.1)
            draw.rectangle((wx, y0 + 0.15 * h, wx + 0.7 * pane, y0 + 0.45 * h), fill=(170, 220, 250))
    elif cls == "bicycle":
        green = _jitter(rng, (40, 190, 60), jitter)
        d, width = min(w / 2, h), max(1, round(min(w, h) / 6))
        for left in (x0, x1 - d):
            draw.ellipse((left, y1 - d, left + d, y1), outline=green, width=width)


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


def _layout_boxes(objects: list[int], cfg: SceneConfig, rng: np.random.Generator) -> list[tuple[int, tuple]]:
    """(class index, box) for each object that could be placed."""
    size = cfg.image_size
    placed: list[tuple[int, tuple]] = []
    if cfg.layout == "grid":
        cell = size / GRID
        cells = rng.permutation(GRID * GRID)[: len(objects)]
        for k, c in zip(objects, cells):
            w, h = (s * cell * 0.9 for s in SHAPES[cfg.classes[k]])
            cx = (c % GRID + 0.5) * cell + rng.uniform(-1, 1) * (cell - w) / 2
            cy = (c // GRID + 0.5) * cell + rng.uniform(-1, 1) * (cell - h) / 2
            placed.append((k, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
        return placed
    unit = size / 7
    for k in objects:
        scale = rng.uniform(0.75, 1.25)
        w, h = (s * unit * scale for s in SHAPES[cfg.classes[k]])
        for _ in range(60):
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            box = (x0, y0, x0 + w, y0 + h)
            others = [b for _, b in placed]
            fits = _overlap(box, others) <= cfg.max_overlap
            if fits and all(_overlap(b, [box]) <= cfg.max_overlap for b in others):
                placed.append((k, box))
                break
    return placed


def draw_scene(index: int, cfg: SceneConfig) -> tuple[Image.Image, list[tuple[int, tuple]]]:
    """Scene ``index``: the image and its (class index, box) list. Same (seed, index), same scene."""
    rng = np.random.default_rng([cfg.seed, index])
    low, high = cfg.count_range
    counts = rng.integers(low, high + 1, size=len(cfg.classes))
    objects = [k for k, n in enumerate(counts) for _ in range(n)]
    objects = [objects[i] for i in rng.permutation(len(objects))]
    image = _background(rng, cfg.image_size)
    boxes = _layout_boxes(objects, cfg, rng)
    draw = ImageDraw.Draw(image)
    jitter = 25 if cfg.layout == "free" else 10
    for k, box in boxes:
        draw_object(draw, cfg.classes[k], box, rng, jitter)
    noise = rng.integers(-8, 9, size=(cfg.image_size, cfg.image_size, 1), dtype=np.int16)
    pixels = np.asarray(image, dtype=np.int16) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), boxes


def _write_range(out_dir: Path, start: int, stop: int, cfg: SceneConfig) -> None:
    size = cfg.image_size
    for index in range(start, stop):
        image, boxes = draw_scene(index, cfg)
        image.save(out_dir / "images" / f"scene_{index:06d}.png", compress_level=1)
        rows = [
            f"{k} {(b[0] + b[2]) / 2 / size:.6f} {(b[1] + b[3]) / 2 / size:.6f} "
            f"{(b[2] - b[0]) / size:.6f} {(b[3] - b[1]) / size:.6f}"
            for k, b in boxes
        ]
        (out_dir / "labels" / f"scene_{index:06d}.txt").write_text("".join(r + "\n" for r in rows))


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
) -> Path:
    """Write ``n`` scenes as ``OUT/images``, ``OUT/labels`` (YOLO) and ``OUT/data.yaml``.

    Small sets (under 200 images) are drawn in this process: a pool costs more than it saves.
    """
    cfg = SceneConfig(seed, image_size, layout, tuple(count_range), tuple(classes), max_overlap)
    cfg.check()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    if workers <= 1 or n < 200:
        _write_range(out, 0, n, cfg)
    else:
        chunk = max(50, n // (workers * 8))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            jobs = [pool.submit(_write_range, out, s, min(s + chunk, n), cfg) for s in range(0, n, chunk)]
            for job in jobs:
                job.result()
    meta = {**asdict(cfg), "count_range": list(cfg.count_range), "classes": list(cfg.classes), "n": n}
    (out / "data.yaml").write_text(
        yaml.safe_dump({"names": list(cfg.classes), "nc": len(cfg.classes), "synth": meta}, sort_keys=False)
    )
    return out


def scene_items(scenes_dir: str | Path, split: dict[str, float] | None = None) -> list[dict]:
    """Each scene's image path, counts (every class) and split: what SFT records are made from."""
    from vlmrl.data.detections import class_names, read_detections
    from vlmrl.data.pairs import DEFAULT_SPLIT, split_for

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
    from vlmrl.data.detections import read_detections
    from vlmrl.data.pairs import PairStats, build_pairs, write_pairs
    from vlmrl.tasks.counting import CountingTask

    out = Path(out_dir)
    scenes = generate_scenes(out / "scenes", n_images, seed, image_size, layout, count_range, workers=workers)
    task = CountingTask(DEFAULT_CLASSES)
    stats = PairStats(classes=list(task.classes))
    items = read_detections(scenes)
    records = build_pairs(items, task, stats, rejects_per_image=rejects_per_image, seed=seed)
    path = out / "pairs.jsonl"
    write_pairs(records, path)
    return path
