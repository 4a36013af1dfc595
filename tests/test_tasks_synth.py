"""Synthetic scenes for reasoning tasks: old settings unchanged to the byte, attributes as promised."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from vlmtune.data.synth import PALETTE, SIZE_SCALES, SHAPES, SceneConfig, draw_scene_objects, generate_scenes

# sha256 over (relative path, bytes) of images/, labels/ and data.yaml, written by the code
# before this change (commit ba26c09) for these exact settings: the regression reference.
BEFORE = {
    "grid": ({"seed": 3}, "7490574653df7ae19d9db87da2223c937d971d01dc307ec1f4457ca64466c877"),
    "free": ({"seed": 5, "image_size": 224, "layout": "free", "count_range": (0, 6)},
             "2c8bc9bef61d6bbeb692c9ac71d6a2a982cc6b5e428fbc93321272a6822e171e"),
}


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.relative_to(out).parts[0] != "objects":
            h.update(p.relative_to(out).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_old_settings_write_the_same_bytes(tmp_path):
    for name, (settings, digest) in BEFORE.items():
        out = generate_scenes(tmp_path / name, 6, workers=1, **settings)
        assert _digest(out) == digest, name


def test_object_lists_match_the_yolo_labels(tmp_path):
    out = generate_scenes(tmp_path / "s", 5, seed=1, image_size=224, layout="free", attributes=True, workers=1)
    for label in sorted((out / "labels").glob("*.txt")):
        scene = json.loads((out / "objects" / f"{label.stem}.json").read_text())
        rows = [line.split() for line in label.read_text().splitlines()]
        assert len(rows) == len(scene["objects"])
        for row, obj in zip(rows, scene["objects"]):
            x0, y0, x1, y1 = obj["box"]
            assert int(row[0]) == ["car", "motorcycle", "bus", "bicycle"].index(obj["class"])
            assert abs(float(row[1]) - (x0 + x1) / 2 / 224) < 1e-5
        assert (out / scene["image"]).is_file()


def test_attribute_colours_are_independent_of_class_and_drawn():
    cfg = SceneConfig(seed=2, image_size=224, layout="free", count_range=(2, 4), attributes=True)
    pairs = Counter()
    for index in range(40):
        image, objects = draw_scene_objects(index, cfg)
        pixels = np.asarray(image, dtype=float)
        for o in objects:
            pairs[(o["class"], o["colour"])] += 1
            x0, y0, x1, y1 = (round(v) for v in o["box"])
            inside = pixels[y0:y1, x0:x1].reshape(-1, 3)
            near = np.abs(inside - np.array(PALETTE[o["colour"]])).max(axis=1) < 60
            assert near.mean() > 0.05, (index, o)  # the object is painted its recorded colour
    # Every class shows at least three colours: the colour does not give the class away.
    for cls in SHAPES:
        assert len({c for (k, c) in pairs if k == cls}) >= 3


def test_sizes_have_a_clear_gap():
    cfg = SceneConfig(seed=4, image_size=224, layout="free", count_range=(2, 3), attributes=True)
    ratios = {"small": [], "large": []}
    for index in range(30):
        for o in draw_scene_objects(index, cfg)[1]:
            x0, y0, x1, y1 = o["box"]
            ratios[o["size"]].append((x1 - x0) / (SHAPES[o["class"]][0] * 224 / 7))
    assert max(ratios["small"]) <= SIZE_SCALES["small"][1] + 1e-9
    assert min(ratios["large"]) >= SIZE_SCALES["large"][0] - 1e-9
    assert SIZE_SCALES["large"][0] / SIZE_SCALES["small"][1] > 1.4


def test_grid_attributes_fit_their_cells():
    cfg = SceneConfig(seed=0, attributes=True)
    for index in range(10):
        for o in draw_scene_objects(index, cfg)[1]:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 112 and 0 <= y0 < y1 <= 112


def _width(obj: dict) -> float:
    return obj["box"][2] - obj["box"][0]


def test_object_scale_multiplies_every_box():
    base = SceneConfig(seed=6, image_size=112, layout="free", count_range=(1, 1), attributes=True)
    big = SceneConfig(seed=6, image_size=112, layout="free", count_range=(1, 1), attributes=True, object_scale=2.0)
    for index in range(5):
        small_objects, big_objects = draw_scene_objects(index, base)[1], draw_scene_objects(index, big)[1]
        assert len(small_objects) == len(big_objects) == 4
        for a, b in zip(small_objects, big_objects):  # same classes and scales, drawn twice as large
            assert (a["class"], a["size"]) == (b["class"], b["size"])
            assert abs(_width(b) - 2 * _width(a)) < 1e-6


def test_object_scale_is_checked(tmp_path):
    import pytest

    from vlmtune.errors import VlmtuneError

    with pytest.raises(VlmtuneError, match="object scale 5"):
        generate_scenes(tmp_path / "a", 1, layout="free", object_scale=5)
    with pytest.raises(VlmtuneError, match="free layout only"):
        generate_scenes(tmp_path / "b", 1, object_scale=2.0)
