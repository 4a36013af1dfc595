"""Hostile input to the data layer, as a user hits it (issue 15): every case is a clear error naming the
file and the line or record, or with --skip-bad a counted skip; never a traceback, never a silent pass."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vlmtune.cli import main
from vlmtune.data.check import check_records
from vlmtune.data.formats import read_records
from vlmtune.data.load import load_records
from vlmtune.data.records import PreferenceRecord, user_prompt
from vlmtune.data.writers import write_records
from vlmtune.errors import VlmtuneError

DEEP = "[" * 100_000 + "]" * 100_000


def seed_row(i: int, image: str = "img.png", **changes) -> dict:
    row = {"id": f"r{i}", "image_path": image, "prompt": "<|user|>\nCount the cars. <image>\n<|assistant|>\n",
           "chosen": f"There are {i} cars.", "rejected": f"There are {i + 1} cars."}
    return {**row, **changes}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "img.png")
    return tmp_path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# ---------------------------------------------------------------- 1. deeply nested JSON


def test_deep_json_line_in_data_check_names_the_line(folder, capsys):
    path = write_lines(folder / "d.jsonl", [seed_row(0), DEEP, seed_row(2)])
    code, out, _ = run(["data", "check", path, "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["records_read"] == 3 and report["bad_records"] == 1
    [problem] = report["problems"]
    assert problem["location"] == f"{path}:2" and problem["kind"] == "malformed-json"
    assert "nested too deeply" in problem["message"] and "fix or delete the line" in problem["message"]


def test_deep_json_array_in_data_check_is_a_whole_file_problem(folder, capsys):
    path = folder / "d.json"
    path.write_text(DEEP)
    code, out, _ = run(["data", "check", path, "--json", "--format", "seed"], capsys)
    [problem] = json.loads(out)["problems"]
    assert code == 1 and problem["location"] == str(path) and "nested too deeply" in problem["message"]


def test_deep_json_in_data_convert_is_an_error_naming_the_line(folder, capsys):
    path = write_lines(folder / "d.jsonl", [seed_row(0), DEEP])
    code, _, err = run(["data", "convert", path, folder / "out.jsonl", "--to", "trl"], capsys)
    assert code == 2 and f"error: {path}:2: line 2 is not readable JSON: nested too deeply" in err
    assert not (folder / "out.jsonl").exists()


def test_deep_json_in_training_data_stops_before_the_model_loads(folder, capsys):
    data = write_lines(folder / "d.jsonl", [seed_row(0), DEEP])
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": str(folder / "no-model")},
                                      "data": {"train": str(data)}, "train": {"output_dir": str(folder / "run")}}))
    code, _, err = run(["train", "--config", config], capsys)
    assert code == 2 and f"{data}:2: malformed-json: line 2 is not readable JSON: nested too deeply" in err
    data.write_text('{"id": ' + DEEP + "}\n")
    code, _, err = run(["train", "--config", config], capsys)
    assert code == 2 and f"{data} cannot be read as data" in err
    assert f"{data}:1: cannot tell the data format: line 1 is not readable JSON: nested too deeply" in err


def test_deep_coco_file_in_from_detections(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ann.json").write_text('{"images": ' + DEEP + "}")
    code, _, err = run(["data", "from-detections", tmp_path / "d", "--out", tmp_path / "o",
                        "--source-format", "coco"], capsys)
    assert code == 2 and "ann.json: not readable JSON: nested too deeply" in err


# ---------------------------------------------------------------- 2. from-detections


def yolo_set(root: Path, labels: dict[str, bytes], names="names: [car, bus]\n") -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    if names is not None:
        (root / "data.yaml").write_bytes(names.encode() if isinstance(names, str) else names)
    for stem, text in labels.items():
        Image.new("RGB", (8, 8)).save(root / "images" / f"{stem}.png")
        (root / "labels" / f"{stem}.txt").write_bytes(text)
    return root


def table_row(out: str, label: str) -> list[str]:
    """The cells of the printed table row that starts with ``label``."""
    [line] = [line for line in out.splitlines() if line.startswith(f"│ {label} ")]
    return [cell.strip() for cell in line.strip("│").split("│")]


def from_detections(root: Path, out: Path, *extra) -> list[str]:
    return ["data", "from-detections", root, "--out", out, "--split", "train=1", *extra]


BAD_LABELS = [
    (b"\xc2\xb2 0.5 0.5 0.1 0.1\n", r"bad.txt:1: class index '²' is not a whole number"),
    (b"0 0.5 0.5 0.1 0.1\n0 0.5 \xff 0.1 0.1\n", r"bad.txt: not UTF-8 text: byte 0xff at byte offset 24 (line 2)"),
    (b"0 nan 0.5 0.1 0.1\n", "bad.txt:1: a coordinate or size is NaN or infinite"),
    (b"0 0.5 0.5 inf 0.1\n", "bad.txt:1: a coordinate or size is NaN or infinite"),
    (b"0 -0.5 0.5 0.1 0.1\n", "bad.txt:1: a coordinate or size is negative"),
    (b"0 0.5 0.5 0.1 -0.1\n", "bad.txt:1: a coordinate or size is negative"),
    (b"1" * 5000 + b" 0.5 0.5 0.1 0.1\n", "bad.txt:1: class index '11111111111111111111' is not a whole number"),
]


@pytest.mark.parametrize("label, message", BAD_LABELS, ids=["superscript-class", "utf8", "nan", "inf",
                                                           "negative-x", "negative-h", "5000-digit-class"])
def test_bad_yolo_label_is_an_error_then_a_counted_skip(tmp_path, capsys, label, message):
    root = yolo_set(tmp_path / "d", {"good": b"0 0.5 0.5 0.1 0.1\n1 0.2 0.2 0.1 0.1\n", "bad": label})
    code, _, err = run(from_detections(root, tmp_path / "o"), capsys)
    assert code == 2 and message in err and "--skip-bad" in err
    code, out, _ = run(from_detections(root, tmp_path / "o", "--skip-bad"), capsys)
    assert code == 0 and message in out
    assert table_row(out, "skipped (bad labels)") == ["skipped (bad labels)", "1", "0"]
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["skipped_count"] == 1 and message in stats["skipped"][0]
    assert stats["images"] == {"train": 1}


@pytest.mark.parametrize("names, message", [
    (b"names: [car, \xff]\n", "data.yaml: not UTF-8 text: byte 0xff at byte offset 13 (invalid start byte)"),
    ("- car\n- bus\n", "data.yaml: expected a mapping with a 'names' key, got a YAML list"),
    ("names: {a: car, b: bus}\n", "data.yaml: 'names' key 'a' is not a class index"),
    ("names: {0: car, 2: bus}\n", "data.yaml: 'names' keys are [0, 2], not 0..1"),
    ("names: [car, [bus, truck]]\n", "data.yaml: names[1] is ['bus', 'truck'], not a class name"),
    ("names: [car, {bus: 1}]\n", "data.yaml: names[1] is {'bus': 1}, not a class name"),
    ("names: [car, no]\n", "data.yaml: names[1] is False, not a class name"),
    ("names: " + "[" * 5000 + "]" * 5000 + "\n", "data.yaml: not readable YAML: nested too deeply"),
], ids=["utf8", "list", "non-integer-keys", "gap-in-keys", "list-name", "mapping-name", "yaml-bool", "deep"])
def test_unreadable_class_names_are_an_error(tmp_path, capsys, names, message):
    root = yolo_set(tmp_path / "d", {"a": b"0 0.5 0.5 0.1 0.1\n"}, names=names)
    code, _, err = run(from_detections(root, tmp_path / "o", "--skip-bad"), capsys)
    assert code == 2 and message in err and "--classes" in err
    assert not (tmp_path / "o").exists()


def test_dataset_root_that_is_a_symlink_loop(tmp_path, capsys):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    code, _, err = run(from_detections(tmp_path / "loop", tmp_path / "o"), capsys)
    assert code == 2 and "loop is a symbolic link that loops" in err


def test_label_file_that_is_a_symlink_loop_is_not_an_empty_image(tmp_path, capsys):
    root = yolo_set(tmp_path / "d", {"good": b"0 0.5 0.5 0.1 0.1\n"})
    Image.new("RGB", (8, 8)).save(root / "images" / "bad.png")
    os.symlink(root / "labels" / "bad.txt", root / "labels" / "bad.txt")
    code, _, err = run(from_detections(root, tmp_path / "o"), capsys)
    assert code == 2 and "bad.txt is a symbolic link that loops" in err


def coco_set(root: Path, images: list, annotations: list, files=("a.jpg",)) -> Path:
    root.mkdir(parents=True)
    for name in files:
        Image.new("RGB", (8, 8)).save(root / name)
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}]}
    (root / "ann.json").write_text(json.dumps(coco))
    return root


GOOD_IMAGE = {"id": 1, "file_name": "a.jpg"}
GOOD_ANN = {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}


@pytest.mark.parametrize("images, annotations, message", [
    ([GOOD_IMAGE, {"id": 2, "file_name": "b.jpg"}], [GOOD_ANN],
     "ann.json: image id 2: image 'b.jpg' not found"),
    ([GOOD_IMAGE, {"id": 2, "file_name": "../../../../etc/passwd"}], [GOOD_ANN],
     "ann.json: image id 2: file_name '../../../../etc/passwd' leads outside the data set's root"),
    ([GOOD_IMAGE, {"id": 2, "file_name": "/etc/passwd"}], [GOOD_ANN],
     "ann.json: image id 2: file_name '/etc/passwd' leads outside the data set's root"),
    ([GOOD_IMAGE], [GOOD_ANN, "not an object"],
     "ann.json: annotation #1: expected an object with image_id, category_id and bbox, got not an object"),
    ([GOOD_IMAGE, {"id": 2, "file_name": "b.jpg"}], [GOOD_ANN, {**GOOD_ANN, "id": 11, "image_id": 2,
                                                                "bbox": [1, float("nan"), 2, 2]}],
     "ann.json: annotation #1 (id 11): bbox [1, nan, 2, 2]: a coordinate or size is NaN or infinite"),
    ([GOOD_IMAGE, ["not", "an", "image"]], [GOOD_ANN],
     "ann.json: image #1 must be an object with an 'id' and a 'file_name'"),
], ids=["missing-image", "traversal", "absolute", "annotation-not-object", "nan-box", "image-not-object"])
def test_bad_coco_entry_is_an_error_then_a_counted_skip(tmp_path, capsys, images, annotations, message):
    root = coco_set(tmp_path / "d", images, annotations, files=("a.jpg", "b.jpg") if "nan" in message else ("a.jpg",))
    code, _, err = run(from_detections(root, tmp_path / "o"), capsys)
    assert code == 2 and message in err
    code, out, _ = run(from_detections(root, tmp_path / "o", "--skip-bad"), capsys)
    assert code == 0 and message in out and table_row(out, "skipped (bad labels)")[1] == "1"
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["skipped_count"] == 1 and stats["images"] == {"train": 1}
    [record] = read_records(tmp_path / "o" / "train.jsonl")
    assert record.images == [str((root / "a.jpg").resolve())]


def tasks_from_detections(root: Path, out: Path, *extra) -> list[str]:
    return ["data", "tasks", "--detections", root, "--out", out, "--families", "count", "--split", "test=1",
            "--min-area", "0", *extra]


@pytest.mark.parametrize("case", ["coco-traversal", "yolo-nan"])
def test_data_tasks_detections_refuses_what_from_detections_refuses(tmp_path, capsys, case):
    if case == "coco-traversal":
        root = coco_set(tmp_path / "d", [GOOD_IMAGE, {"id": 2, "file_name": "../../../../etc/passwd"}], [GOOD_ANN])
        message = "ann.json: image id 2: file_name '../../../../etc/passwd' leads outside the data set's root"
    else:
        root = yolo_set(tmp_path / "d", {"good": b"0 0.5 0.5 0.1 0.1\n", "bad": b"0 nan 0.5 0.1 0.1\n"})
        message = "bad.txt:1: a coordinate or size is NaN or infinite"
    errors = []
    for argv in (from_detections(root, tmp_path / "o1"), tasks_from_detections(root, tmp_path / "o2")):
        code, _, err = run(argv, capsys)
        assert code == 2
        errors.append(err)
    assert errors[0] == errors[1] and message in errors[1] and "--skip-bad" in errors[1]
    code, out, _ = run(tasks_from_detections(root, tmp_path / "o2", "--skip-bad"), capsys)
    assert code == 0 and "skipped: " in out  # rich folds the long line; stats.json holds it whole
    stats = json.loads((tmp_path / "o2" / "stats.json").read_text())
    assert stats["scenes"] == 1 and len(stats["skipped"]) == 1 and message in stats["skipped"][0]


def test_coco_file_with_invalid_utf8(tmp_path, capsys):
    root = coco_set(tmp_path / "d", [GOOD_IMAGE], [GOOD_ANN])
    text = b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": "\xff"}]}'
    (root / "ann.json").write_bytes(text)
    code, _, err = run(from_detections(root, tmp_path / "o"), capsys)
    assert code == 2 and f"ann.json: not UTF-8 text: byte 0xff at byte offset {text.index(0xff)}" in err


def test_voc_image_outside_the_root_or_missing(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "a.jpg")
    for name, filename in (("a", "a.jpg"), ("b", "../../../etc/passwd"), ("c", "c.jpg")):
        (tmp_path / "d" / f"{name}.xml").write_text(
            f"<annotation><filename>{filename}</filename><object><name>car</name></object></annotation>")
    code, out, _ = run(from_detections(tmp_path / "d", tmp_path / "o", "--skip-bad"), capsys)
    assert code == 0 and "b.xml: file_name '../../../etc/passwd' leads outside" in out
    assert "c.xml: image 'c.jpg' not found" in out
    assert json.loads((tmp_path / "o" / "stats.json").read_text())["skipped_count"] == 2


# ---------------------------------------------------------------- 3. NaN and Infinity


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_metadata_is_a_problem_in_data_check(folder, capsys, number):
    line = json.dumps(seed_row(1))[:-1] + f', "metadata": {{"score": {number}}}}}'
    path = write_lines(folder / "d.jsonl", [seed_row(0), line])
    code, out, _ = run(["data", "check", path], capsys)
    assert code == 1 and f"{path}:2: non-finite-number: 'metadata.score' is NaN or infinite" in out
    code, _, err = run(["data", "convert", path, folder / "o.jsonl", "--to", "vlmtune"], capsys)
    assert code == 2 and f"{path}:2: 'metadata.score' is NaN or infinite" in err


def test_writers_never_write_nan(tmp_path):
    record = PreferenceRecord("r7", [], user_prompt("q", 0), "a", "b", {"scores": [1.0, float("inf")]})
    for name in ("o.jsonl", "o.json"):
        with pytest.raises(VlmtuneError, match=r"record r7: metadata\.scores\[1\] is NaN or infinite"):
            write_records([record], tmp_path / name, "vlmtune")
    with pytest.raises(VlmtuneError, match=r"record r7: metadata\.scores\[1\]"):
        write_records([record], tmp_path / "o.parquet", "hf")
    with pytest.raises(VlmtuneError, match=r"record r7: metadata\.scores\[1\]"):
        write_records([record], tmp_path / "o.json", "seed")


# ---------------------------------------------------------------- 4. images the processor refuses


def test_extreme_aspect_ratio_fails_data_check_and_training_data(folder, capsys):
    Image.new("RGB", (2, 600)).save(folder / "thin.png")
    path = write_lines(folder / "d.jsonl", [seed_row(0), seed_row(1, "thin.png")])
    code, out, _ = run(["data", "check", path], capsys)
    thin = folder / "thin.png"
    assert code == 1 and f"{path}:2: image-shape: {thin} is 2x600 pixels, an aspect ratio of 300:1" in out
    with pytest.raises(VlmtuneError, match=r"d\.jsonl:2: image-shape"):
        load_records(path)


def test_aspect_ratio_of_exactly_200_passes(folder):
    Image.new("RGB", (3, 600)).save(folder / "thin.png")
    assert check_records(write_lines(folder / "d.jsonl", [seed_row(0, "thin.png")])).ok


def test_very_large_image_is_a_warning_not_a_failure(folder, capsys, caplog):
    Image.new("L", (4100, 4097)).save(folder / "big.png")
    path = write_lines(folder / "d.jsonl", [seed_row(0), seed_row(1, "big.png")])
    code, out, _ = run(["data", "check", path], capsys)
    assert code == 0 and f"{path}:2: warning: large-image: {folder / 'big.png'} is 4100x4097 pixels" in out
    assert "no problems found" in out and "1 warning(s)" in out
    assert len(load_records(path)) == 2
    assert any("large-image" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_processor_error_during_encoding_names_the_record_and_image(tiny_model_dir, folder):
    from transformers import AutoProcessor

    from vlmtune.batch import encode_record

    Image.new("RGB", (600, 2)).save(folder / "wide.png")
    record = PreferenceRecord("scene-7#0", [str(folder / "wide.png")], user_prompt("Count."), "a", "b")
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    with pytest.raises(VlmtuneError, match=r"record scene-7#0: the model's processor cannot encode it "
                                         r"\(absolute aspect ratio .*\); images: .*wide\.png \(600x2\)"):
        encode_record(record, processor, max_length=256)


# ---------------------------------------------------------------- 5. messages that say what is wrong


def test_invalid_utf8_in_a_json_array_is_named_not_no_record(folder, capsys):
    path = folder / "d.json"
    text = b'[{"id": "r0", "image_path": "img.png", "prompt": "\xff"}]'
    path.write_bytes(text)
    code, out, _ = run(["data", "check", path, "--json"], capsys)
    [problem] = json.loads(out)["problems"]
    assert code == 1 and f"not UTF-8 text: byte 0xff at byte offset {text.index(0xff)}" in problem["message"]
    assert "no JSON record" not in problem["message"]


def test_symlink_loop_is_named_not_no_such_file(folder, capsys):
    os.symlink(folder / "loop.jsonl", folder / "loop.jsonl")
    code, _, err = run(["data", "check", folder / "loop.jsonl"], capsys)
    assert code == 2 and "loop.jsonl is a symbolic link that loops" in err and "no such file" not in err
    os.symlink(folder / "loop.png", folder / "loop.png")
    path = write_lines(folder / "d.jsonl", [seed_row(0, "loop.png")])
    code, out, _ = run(["data", "check", path], capsys)
    assert code == 1 and "missing-image: " in out and "loop.png is a symbolic link that loops" in out


def test_lone_surrogate_escape_is_refused_not_a_crash_when_written(folder, capsys):
    line = json.dumps(seed_row(1, chosen="a\ud800"))  # json writes the escape \ud800, no pair
    path = write_lines(folder / "d.jsonl", [seed_row(0), line])
    code, out, _ = run(["data", "check", path], capsys)
    assert code == 1 and f"{path}:2: malformed-json: line 2 is not readable JSON: a string holds the " \
        "escape \\ud800, half of a UTF-16 surrogate pair" in out
    code, _, err = run(["data", "convert", path, folder / "o.jsonl", "--to", "trl"], capsys)
    assert code == 2 and f"{path}:2: line 2 is not readable JSON" in err


# ---------------------------------------------------------------- 6. config files


def test_config_with_invalid_utf8_names_the_file_and_byte_offset(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    text = b"model:\n  name_or_path: m\xe9\ndata:\n  train: t.jsonl\n"
    path.write_bytes(text)
    code, _, err = run(["config", "validate", path], capsys)
    assert code == 2 and f"error: {path}: not UTF-8 text: byte 0xe9 at byte offset {text.index(0xe9)} (line 2)" in err
    code, _, err = run(["train", "--config", path], capsys)
    assert code == 2 and f"byte offset {text.index(0xe9)}" in err


def test_config_nested_too_deeply(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    code, _, err = run(["config", "validate", path], capsys)
    assert code == 2 and "c.yaml: not readable YAML: nested too deeply" in err


# ---------------------------------------------------------------- 8. logging, not stderr


def test_skip_bad_reader_logs_instead_of_printing(folder, caplog):
    path = write_lines(folder / "d.jsonl", [seed_row(0), "{oops", seed_row(2)])
    skipped = []
    records = read_records(path, skip_bad=True, skipped=skipped)
    assert [r.id for r in records] == ["r0", "r2"] and [p.location for p in skipped] == [f"{path}:2"]
    [message] = [r for r in caplog.records if r.name == "vlmtune.data.formats"]
    assert message.levelno == logging.WARNING and f"skipped {path}:2: malformed-json" in message.getMessage()


def test_convert_skip_bad_counts_what_it_skipped(folder, capsys):
    path = write_lines(folder / "d.jsonl", [seed_row(0), "{oops", seed_row(2, metadata={"x": 1})])
    code, out, err = run(["data", "convert", path, folder / "o.jsonl", "--to", "trl", "--skip-bad"], capsys)
    assert code == 0 and "wrote 2 records" in out and "skipped 1 bad record(s) (listed above): malformed-json 1" in out
    assert f"skipped {path}:2: malformed-json" in err


def test_doctests_of_the_new_rules_pass():
    import doctest

    import vlmtune.data.check as check
    import vlmtune.data.formats as formats

    for module in (check, formats):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0


def test_a_pipe_or_device_is_refused_instead_of_blocking_or_reading_forever(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.jsonl")
    code, out, _ = run(["data", "check", tmp_path / "pipe.jsonl"], capsys)
    assert code == 1 and "pipe.jsonl is not a regular file" in out
    os.symlink("/dev/zero", tmp_path / "c.yaml")
    code, _, err = run(["config", "validate", tmp_path / "c.yaml"], capsys)
    assert code == 2 and "c.yaml is not a regular file" in err
