"""Synthetic scenes: deterministic, labels true to the drawing, read back like real data."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from vlmtune.cli import main
from vlmtune.data.detections import read_detections
from vlmtune.data.formats import iter_records
from vlmtune.data.synth import SceneConfig, draw_scene, generate_scenes, scene_items
from vlmtune.errors import VlmtuneError
from vlmtune.tasks.counting import DEFAULT_CLASSES, CountingTask


def _boxes(label_file, size):
    rows = [list(map(float, line.split())) for line in label_file.read_text().splitlines()]
    return [(int(k), ((x - w / 2) * size, (y - h / 2) * size, (x + w / 2) * size, (y + h / 2) * size))
            for k, x, y, w, h in rows]


def test_same_seed_and_index_same_scene():
    cfg = SceneConfig(seed=1)
    a, boxes_a = draw_scene(5, cfg)
    b, boxes_b = draw_scene(5, cfg)
    c, _ = draw_scene(6, cfg)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and boxes_a == boxes_b
    assert not np.array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("cls, colour", [("car", (205, 35, 35)), ("motorcycle", (40, 80, 220)),
                                         ("bus", (235, 200, 30)), ("bicycle", (40, 190, 60))])
def test_each_class_is_drawn_in_its_colour_inside_its_box(cls, colour):
    cfg = SceneConfig(seed=0, classes=(cls,), count_range=(1, 1))
    image, [(_, box)] = draw_scene(0, cfg)
    x0, y0, x1, y1 = (round(v) for v in box)
    pixels = np.asarray(image, dtype=float)[y0:y1, x0:x1].reshape(-1, 3)
    near = np.abs(pixels - np.array(colour)).max(axis=1) < 45
    assert near.mean() > 0.1
    outside = np.asarray(image, dtype=float).copy()
    outside[max(y0 - 1, 0):y1 + 2, max(x0 - 1, 0):x1 + 2] = 0  # the box, and PIL's edge pixels
    assert (np.abs(outside.reshape(-1, 3) - np.array(colour)).max(axis=1) < 45).sum() == 0


def test_grid_scenes_labels_and_yaml(tmp_path):
    out = generate_scenes(tmp_path / "g", 12, seed=0, workers=1)
    names = yaml.safe_load((out / "data.yaml").read_text())["names"]
    assert names == list(DEFAULT_CLASSES)
    assert Image.open(out / "images" / "scene_000000.png").size == (112, 112)
    cells = set()
    for label in sorted((out / "labels").glob("*.txt")):
        boxes = _boxes(label, 112)
        per_class = [sum(1 for k, _ in boxes if k == c) for c in range(4)]
        assert all(0 <= n <= 4 for n in per_class)
        centres = {(int((b[0] + b[2]) / 2 // 28), int((b[1] + b[3]) / 2 // 28)) for _, b in boxes}
        assert len(centres) == len(boxes)  # one object per cell
        cells |= centres
        assert all(0 <= v <= 112 for _, b in boxes for v in b)
    assert len(cells) > 8
    items = scene_items(out)
    assert len(items) == 12 and set(items[0]["counts"]) == set(DEFAULT_CLASSES)
    assert {i["split"] for i in items} <= {"train", "val", "test"}


def test_free_layout_respects_overlap_and_range(tmp_path):
    out = generate_scenes(tmp_path / "f", 20, seed=2, image_size=224, layout="free", count_range=(0, 6),
                          workers=1, max_overlap=0.1)
    totals = []
    for label in (out / "labels").glob("*.txt"):
        boxes = [b for _, b in _boxes(label, 224)]
        totals.append(len(boxes))
        for i, a in enumerate(boxes):
            area = (a[2] - a[0]) * (a[3] - a[1])
            for b in boxes[:i] + boxes[i + 1:]:
                w = min(a[2], b[2]) - max(a[0], b[0])
                h = min(a[3], b[3]) - max(a[1], b[1])
                assert max(w, 0) * max(h, 0) / area <= 0.1 + 1e-3
    assert max(totals) > 12  # crowded scenes do get placed


def test_parallel_generation_matches_serial(tmp_path):
    a = generate_scenes(tmp_path / "a", 200, seed=4, image_size=32, workers=1, count_range=(0, 2))
    b = generate_scenes(tmp_path / "b", 200, seed=4, image_size=32, workers=2, count_range=(0, 2))
    for sub, pattern in (("labels", "*.txt"), ("images", "*.png")):
        files = sorted((a / sub).glob(pattern))
        assert len(files) == 200
        assert all(f.read_bytes() == (b / sub / f.name).read_bytes() for f in files)


def test_bad_configurations_are_refused(tmp_path):
    with pytest.raises(VlmtuneError, match="grid layout has 16 cells"):
        generate_scenes(tmp_path, 1, count_range=(0, 6))
    with pytest.raises(VlmtuneError, match="draw only"):
        generate_scenes(tmp_path, 1, classes=("car", "tram"))
    with pytest.raises(VlmtuneError, match="count range"):
        generate_scenes(tmp_path, 1, count_range=(3, 1))


def test_synth_pairs_file_records_match_labels(synth_pairs_file):
    rows = list(iter_records(synth_pairs_file))
    assert len(rows) == 24
    labels = {item.image.as_posix(): item.counts for item in read_detections(synth_pairs_file.parent / "scenes")}
    task = CountingTask()
    for r in rows:
        gold = {c: labels[r.images[0]].get(c, 0) for c in DEFAULT_CLASSES}
        assert r.metadata["counts"] == gold and r.chosen == task.render(gold) and r.rejected != r.chosen


def test_cli_synth_with_pairs(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--n", "10", "--pairs", "--split", "train=1"]) == 0
    assert "wrote 10 scenes" in capsys.readouterr().out
    assert len((out / "pairs" / "train.jsonl").read_text().splitlines()) == 10
    assert json.loads((out / "pairs" / "stats.json").read_text())["classes"] == list(DEFAULT_CLASSES)
    assert main(["data", "synth", "--out", str(out), "--count-range", "4"]) == 2
