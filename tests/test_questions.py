"""`vlmtune data tasks`: counting records unchanged, leak-free splits, OOD axes, balance, stats, bad input."""

import json
import shutil
from collections import Counter, defaultdict

import pytest
from PIL import Image

from vlmtune.cli import main
from vlmtune.data.detection_scenes import read_detection_scenes
from vlmtune.data.detections import read_detections
from vlmtune.data.formats import iter_records
from vlmtune.data.pairs import DEFAULT_SPLIT, pairs_from_detections, split_for
from vlmtune.data.questions import BuildOptions, build_task_files, read_scenes, resolve_families
from vlmtune.data.synth import generate_scenes
from vlmtune.errors import VlmtuneError
from vlmtune.tasks.rewards import task_accuracy_reward


@pytest.fixture(scope="module")
def attribute_scenes(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp("attr"), 80, seed=7, image_size=224, layout="free",
                           count_range=(0, 4), attributes=True, workers=1)


@pytest.fixture(scope="module")
def built(attribute_scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    assert main(["data", "tasks", "--scenes", str(attribute_scenes), "--out", str(out), "--think"]) == 0
    files = {p.stem: list(iter_records(p)) for p in out.glob("*.jsonl")}
    return out, files


def test_count_records_are_todays_records(tmp_path):
    scenes = generate_scenes(tmp_path / "scenes", 40, seed=2, workers=1)
    paths, _ = pairs_from_detections(scenes, tmp_path / "pairs")
    today = {r.id: r.to_dict() for p in paths.values() for r in iter_records(p)}
    opts = BuildOptions(resolve_families(["count"]), ood_objects=10**6)
    paths, _ = build_task_files(read_scenes(scenes), tmp_path / "tasks", opts)
    built = {r.id: r for p in paths.values() for r in iter_records(p)}
    assert set(built) == set(today)
    for rid, record in built.items():
        task = record.metadata.pop("task")
        assert record.to_dict() == today[rid]
        assert task["family"] == "count" and task["answer"] == today[rid]["metadata"]["counts"]


def test_splits_are_leak_free_and_ood_files_hold_one_axis_each(built):
    _, files = built
    sources = {name: {r.metadata["source_image"] for r in records} for name, records in files.items()}
    assert {"train", "val", "test", "ood_objects", "ood_hops", "ood_phrasing"} <= set(files)
    assert not sources["train"] & (sources["val"] | sources["test"])
    assert not sources["val"] & sources["test"]
    assert not sources["ood_objects"] & (sources["train"] | sources["val"] | sources["test"])
    for name in ("ood_hops", "ood_phrasing", "ood_combos"):
        for record in files.get(name, []):
            assert split_for(record.metadata["source_image"], DEFAULT_SPLIT) == "test"
            assert record.metadata["task"]["axis"] == name[4:]
    assert all(r.metadata["task"]["hops"] > 3 for r in files["ood_hops"])
    assert all(r.metadata["task"]["hops"] <= 3 for r in files["train"])
    assert all(r.metadata["task"]["axis"] is None for r in files["train"])


def test_every_gold_answer_pays_and_every_rejected_does_not(built):
    _, files = built
    records = [r for group in files.values() for r in group]
    meta = [r.metadata for r in records]
    assert task_accuracy_reward([r.chosen for r in records], meta) == [1.0] * len(records)
    assert max(task_accuracy_reward([r.rejected for r in records], meta)) < 1.0
    assert all(r.chosen.startswith("<think>") and "<answer>" in r.chosen for r in records)


def test_answers_balanced_and_stats_written(built):
    out, files = built
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["families"]) == {"count", "compare", "arithmetic", "spatial", "attribute", "grounding",
                                      "list", "multihop"}
    answers = defaultdict(Counter)
    for name in ("train", "val", "test"):
        for r in files[name]:
            task = r.metadata["task"]
            if task["kind"] in ("integer", "verdict", "compound"):  # a compound balances on its verdict
                answer = task["answer"][2] if task["kind"] == "compound" else task["answer"]
                answers[task["family"]][str(answer)] += 1
    for family, counter in answers.items():
        # One record per question (--rejects 1), so records count questions.
        top = counter.most_common(2)
        assert top[0][1] <= 1.1 * top[1][1], (family, top)
        assert dict(counter) == stats["families"][family]["answers_in_distribution"]
    assert stats["families"]["multihop"]["hops"].keys() >= {"3", "4"}
    assert sum(stats["records_per_file"].values()) == sum(len(v) for v in files.values())


def test_a_familys_records_do_not_depend_on_the_others_asked(attribute_scenes, tmp_path):
    scenes = read_scenes(attribute_scenes)
    alone, _ = build_task_files(scenes, tmp_path / "alone", BuildOptions(resolve_families(["spatial"])))
    mixed, _ = build_task_files(scenes, tmp_path / "mixed", BuildOptions(resolve_families(["compare", "spatial"])))
    spatial = lambda paths: sorted(  # noqa: E731
        (r.id.split("#")[0], r.prompt_text(), r.chosen, r.rejected, r.metadata["split"])
        for p in paths.values() for r in iter_records(p) if r.metadata["task"]["family"] == "spatial")
    assert spatial(alone) and spatial(alone) == spatial(mixed)


def test_scenes_without_a_question_are_counted_not_dropped(tmp_path):
    scenes = generate_scenes(tmp_path / "plain", 12, seed=1, workers=1)  # no attributes
    opts = BuildOptions(resolve_families(["count", "attribute"]), ood_objects=10**6)
    _, stats = build_task_files(read_scenes(scenes), tmp_path / "a", opts)
    assert stats.no_question_per_family["attribute"] == 12
    with pytest.raises(VlmtuneError, match="no question could be posed on 12 scenes"):
        build_task_files(read_scenes(scenes), tmp_path / "b", BuildOptions(resolve_families(["attribute"])))


def test_bad_input_messages(tmp_path, capsys):
    assert main(["data", "tasks", "--scenes", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--families", "count,colours"]) == 2
    err = capsys.readouterr().err
    assert "unknown family 'colours'" in err and "count, compare, arithmetic" in err
    assert main(["data", "tasks", "--scenes", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no objects/*.json scene files" in capsys.readouterr().err
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / "a.json").write_text("{}")
    (tmp_path / "data.yaml").write_text("names: [car]\n")
    assert main(["data", "tasks", "--scenes", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "a.json: not a scene file" in capsys.readouterr().err


def test_yolo_labels_give_the_same_scenes(attribute_scenes):
    from_labels = {s.source: s for s in read_detection_scenes(attribute_scenes)}
    for scene in read_scenes(attribute_scenes)[:20]:
        twin = from_labels[scene.source]
        assert [o.cls for o in twin.objects] == [o.cls for o in scene.objects]
        for a, b in zip(twin.objects, scene.objects):
            assert max(abs(u - v) for u, v in zip(a.box, b.box)) < 0.01
            assert a.colour is None  # labels carry no colour


def test_copies_of_one_photo_share_a_split(attribute_scenes, tmp_path):
    root = tmp_path / "rf"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    shutil.copy(attribute_scenes / "data.yaml", root)
    for k in range(12):
        for copy in ("AAA", "BBB"):
            name = f"photo{k}_jpg.rf.{copy}"
            shutil.copy(attribute_scenes / "images" / f"scene_{k:06d}.png", root / "images" / f"{name}.png")
            shutil.copy(attribute_scenes / "labels" / f"scene_{k:06d}.txt", root / "labels" / f"{name}.txt")
    out = tmp_path / "out"
    assert main(["data", "tasks", "--detections", str(root), "--out", str(out), "--families", "count,compare",
                 "--ood-objects", "100"]) == 0
    split_of = defaultdict(set)
    for path in out.glob("*.jsonl"):
        for r in iter_records(path):
            split_of[r.metadata["source_image"]].add(r.metadata["split"])
    assert len(split_of) == 12
    for splits in split_of.values():  # one split per photo; its OOD questions only from test photos
        assert len(splits & {"train", "val", "test"}) == 1
        assert "test" in splits or not any(s.startswith("ood_") for s in splits)


def test_coco_crowd_tiny_and_boxless_objects_skip_the_image(tmp_path):
    coco = {
        "categories": [{"id": 1, "name": "Car"}, {"id": 2, "name": "Bus"}],
        "images": [{"id": k, "file_name": f"{name}.jpg", "width": 100, "height": 100}
                   for k, name in enumerate("abcd", start=1)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 10, 30, 30]},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 1},
            {"id": 4, "image_id": 3, "category_id": 1, "bbox": [10, 10, 1, 1]},
            {"id": 5, "image_id": 4, "category_id": 2},
        ],
    }
    for name in "abcd":  # the labels' stated size, not the file's, is what boxes are read against
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.jpg")
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    skipped = []
    scenes = read_detection_scenes(tmp_path, skipped=skipped)
    assert [s.source for s in scenes] == ["a"]
    assert scenes[0].objects[1].box == (60.0, 10.0, 90.0, 40.0) and scenes[0].classes == ("car", "bus")
    assert (scenes[0].width, scenes[0].height) == (100, 100)
    assert skipped == ["b.jpg: skipped, it holds a crowd annotation",
                       "c.jpg: skipped, it holds 1 tiny box(es) (under 0.0005 of the image)",
                       "d.jpg: skipped, it holds 1 object(s) without a box"]


def test_yolo_scene_boxes_are_pixels_of_the_image_read_from_its_header(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (200, 100)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels" / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n")
    [scene] = read_detection_scenes(tmp_path, classes=["Car", "Bus"], keep=["BUS"])
    # centre (100, 50), size 40 x 40 pixels
    assert (scene.width, scene.height, scene.classes) == (200, 100, ("bus",))
    assert [(o.cls, o.box) for o in scene.objects] == [("bus", (80.0, 30.0, 120.0, 70.0))]
    with pytest.raises(VlmtuneError, match=r"--keep: no class lorry in the data \(its classes: car, bus\)"):
        read_detection_scenes(tmp_path, classes=["car", "bus"], keep=["lorry"])


def test_no_usable_image_is_an_error_that_names_the_first_skip(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (100, 100)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.01 0.01\n")
    with pytest.raises(VlmtuneError, match=r"no labelled image to pose questions about; 1 skipped, the first: "
                                         r"images/a.png: skipped, it holds 1 tiny box"):
        read_detection_scenes(tmp_path, classes=["car"])


def test_real_labels_give_scenes_whose_objects_are_the_counted_ones(shared_data):
    root = shared_data / "highway-od-40"
    counts = {i.rel: i.counts for i in read_detections(root)}
    skipped = []
    scenes = read_detection_scenes(root, skipped=skipped)
    assert len(scenes) + len(skipped) == len(counts) == 251 and len(scenes) > 200
    for scene in scenes:
        assert Counter(o.cls for o in scene.objects) == counts[scene.rel]
        assert (scene.width, scene.height) == (640, 640)
        assert all(-1 < v < 641 for o in scene.objects for v in o.box)
