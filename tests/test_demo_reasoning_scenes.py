"""The reasoning demo's scene settings (layout, attributes, object scale) reach the scenes it draws."""

import json

import yaml

from vlmtune.data.synth import CLASS_COLOURS
from vlmtune.demo_reasoning import ReasoningSettings, make_scenes


def _scenes(path):
    meta = yaml.safe_load((path / "data.yaml").read_text())["synth"]
    objects = [o for f in sorted((path / "objects").glob("*.json")) for o in json.loads(f.read_text())["objects"]]
    return meta, objects


def test_default_scenes_are_free_with_attributes(tmp_path):
    meta, objects = _scenes(make_scenes(ReasoningSettings(out=tmp_path, n_scenes=6)).path)
    assert meta["layout"] == "free" and meta["attributes"] is True and "object_scale" not in meta
    assert objects and all(o["size"] in ("small", "large") for o in objects)


def test_grid_scenes_without_attributes_paint_each_class_its_colour(tmp_path):
    s = ReasoningSettings(out=tmp_path, n_scenes=6, layout="grid", attributes=False)
    meta, objects = _scenes(make_scenes(s).path)
    assert meta["layout"] == "grid" and "attributes" not in meta
    assert objects and all(o["size"] is None and o["colour"] == CLASS_COLOURS[o["class"]] for o in objects)


def test_object_scale_reaches_the_scenes_and_changes_the_stage(tmp_path):
    plain = make_scenes(ReasoningSettings(out=tmp_path / "a", n_scenes=4))
    big = make_scenes(ReasoningSettings(out=tmp_path / "b", n_scenes=4, object_scale=2.0))
    assert _scenes(big.path)[0]["object_scale"] == 2.0
    assert plain.key != big.key
