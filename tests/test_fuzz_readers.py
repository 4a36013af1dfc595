"""Property-based fuzzing of every reader of user files (issue 15): random bytes, truncated and mutated
valid files, and valid rows with one value swapped for arbitrary JSON. The only outcomes allowed are
records (or a check report, or detection counts, or a config) and a ``VlmtuneError``; any other
exception is a bug that would reach the user as a traceback."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmtune.config import load_config
from vlmtune.data.check import check_records
from vlmtune.data.detections import class_names, read_detections
from vlmtune.data.formats import read_records
from vlmtune.data.records import PreferenceRecord, user_prompt
from vlmtune.data.writers import write_records
from vlmtune.errors import VlmtuneError

# Sized so the whole module runs in about 15 s on one CPU core; every example reads a file several ways.
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PER_FORMAT = settings(FUZZ, max_examples=40)  # five formats each
JSON_FILES = {"vlmtune": "d.jsonl", "seed": "d.json", "trl": "d.jsonl", "llamafactory": "d.json", "swift": "d.jsonl"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from(["\ud800", "a\udc00b", "../../etc/passwd", "<image>", "<|user|>"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """``valid`` cut short, or with a few bytes replaced, inserted or deleted."""
    cut = st.integers(0, len(valid)).map(lambda n: valid[:n])
    edits = st.lists(st.tuples(st.integers(0, max(0, len(valid) - 1)), st.sampled_from(["set", "insert", "delete"]),
                               st.binary(min_size=1, max_size=3)), min_size=1, max_size=6)
    return cut | edits.map(lambda e: _apply(valid, e))


def _apply(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for pos, op, chunk in edits:
        pos = min(pos, len(out))
        if op == "set":
            out[pos:pos + len(chunk)] = chunk
        elif op == "insert":
            out[pos:pos] = chunk
        else:
            del out[pos:pos + len(chunk)]
    return bytes(out)


def file_bytes(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=600) | mutated(valid)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One folder with an image and a valid file in every JSON format (two records each)."""
    root = tmp_path_factory.mktemp("fuzz")
    Image.new("RGB", (16, 16), (10, 200, 10)).save(root / "img.png")
    records = [PreferenceRecord(f"r{i}", [str(root / "img.png")], user_prompt(f"Count {i}."), f"{i} cars.",
                                f"{i + 1} cars.", {"counts": {"car": i}}) for i in range(2)]
    for fmt, name in JSON_FILES.items():
        write_records(records, root / fmt / name, fmt)
        shutil.copy(root / "img.png", root / fmt / "img.png")
    return root


def read_all(path: Path, fmt: str | None) -> None:
    """Every entry point a user reaches a data file through; only VlmtuneError may escape."""
    for skip_bad in (False, True):
        try:
            records = read_records(path, fmt, skip_bad=skip_bad)
        except VlmtuneError:
            continue
        assert all(isinstance(r, PreferenceRecord) for r in records)
        if records:  # what was read can be written back as standard JSON
            write_records(records, path.parent / "out.jsonl", "vlmtune")
    try:
        report = check_records(path, fmt, workers=1)
    except VlmtuneError:
        return
    assert report.records_read >= report.bad_records >= 0


@pytest.mark.parametrize("fmt", list(JSON_FILES))
@PER_FORMAT
@given(data=st.data())
def test_json_readers_on_random_and_damaged_bytes(data_dir, fmt, data):
    path = data_dir / fmt / JSON_FILES[fmt]
    valid = (data_dir / fmt / f"valid-{path.name}")
    if not valid.exists():
        shutil.copy(path, valid)
    target = data_dir / fmt / f"fuzz{path.suffix}"
    target.write_bytes(data.draw(file_bytes(valid.read_bytes())))
    read_all(target, data.draw(st.sampled_from([fmt, None])))


def slots(value) -> list[tuple]:
    """Every ``(container, key)`` inside a parsed JSON value: the places a value can be swapped."""
    out, stack = [], [value]
    while stack:
        node = stack.pop()
        keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
        for key in keys:
            out.append((node, key))
            stack.append(node[key])
    return out


@pytest.mark.parametrize("fmt", list(JSON_FILES))
@PER_FORMAT
@given(data=st.data())
def test_json_readers_on_valid_rows_with_one_value_replaced(data_dir, fmt, data):
    path = data_dir / fmt / JSON_FILES[fmt]
    text = path.read_text()
    rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]
    for _ in range(data.draw(st.integers(1, 3))):  # any value at any depth: a key's, a turn's, a part's
        container, key = data.draw(st.sampled_from(slots(rows[0])))
        container[key] = data.draw(json_values)
    target = data_dir / fmt / f"struct{path.suffix}"
    body = json.dumps(rows) if path.suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    target.write_text(body)
    read_all(target, fmt)


@settings(FUZZ, max_examples=30)  # each example starts a datasets reader
@given(raw=st.binary(max_size=400))
def test_hf_parquet_reader_on_random_bytes(data_dir, raw):
    path = data_dir / "fuzz.parquet"
    path.write_bytes(raw)
    read_all(path, "hf")


# ---------------------------------------------------------------- detection labels


def detections_outcome(root: Path, fmt: str) -> None:
    for skip_bad in (False, True):
        try:
            names = class_names(root, fmt)
            items = list(read_detections(root, fmt, skip_bad=skip_bad, skipped=[]))
        except VlmtuneError:
            continue
        assert names is None or all(isinstance(n, str) for n in names)
        assert all(isinstance(i.counts, Counter) and i.image.is_file() for i in items)


@pytest.fixture(scope="module")
def yolo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("yolo")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    Image.new("RGB", (8, 8)).save(root / "images" / "a.png")
    (root / "data.yaml").write_text("names: [car, bus]\nnc: 2\n")
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.1 0.1\n")
    return root


@FUZZ
@given(data=st.data())
def test_yolo_label_file_and_data_yaml(yolo_dir, data):
    label = b"0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.1 0.1\n"
    names = b"names: [car, bus]\nnc: 2\n"
    which = data.draw(st.sampled_from(["label", "yaml"]))
    (yolo_dir / "labels" / "a.txt").write_bytes(data.draw(file_bytes(label)) if which == "label" else label)
    (yolo_dir / "data.yaml").write_bytes(data.draw(file_bytes(names)) if which == "yaml" else names)
    detections_outcome(yolo_dir, "yolo")


@FUZZ
@given(data=st.data())
def test_yolo_label_lines_of_arbitrary_tokens(yolo_dir, data):
    token = st.sampled_from(["0", "1", "2", "-1", "²", "٣", "nan", "inf", "-0.5", "0.5", "1e999", "1" * 30,
                             "1" * 5000, "x", "0x1", "1_0"])
    number = st.floats(allow_nan=True, allow_infinity=True).map(repr) | token
    box = st.tuples(token, number, number, number, number).map(" ".join)  # the shape of a real row
    lines = data.draw(st.lists(box | st.lists(token, max_size=9).map(" ".join), max_size=4))
    (yolo_dir / "labels" / "a.txt").write_text("\n".join(lines))
    (yolo_dir / "data.yaml").write_text("names: [car, bus]\n")
    detections_outcome(yolo_dir, "yolo")


COCO = {"images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3]}],
        "categories": [{"id": 1, "name": "car"}]}


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    Image.new("RGB", (8, 8)).save(root / "a.jpg")
    return root


@FUZZ
@given(data=st.data())
def test_coco_file_bytes_and_structure(coco_dir, data):
    coco = json.loads(json.dumps(COCO))
    if data.draw(st.booleans()):
        raw = data.draw(file_bytes(json.dumps(COCO).encode()))
    else:
        table = data.draw(st.sampled_from(["images", "annotations", "categories"]))
        entry = coco[table][0]
        key = data.draw(st.sampled_from(sorted(entry) + ["<entry>", "<table>"]))
        if key == "<entry>":
            coco[table][0] = data.draw(json_values)
        elif key == "<table>":
            coco[table] = data.draw(json_values)
        else:
            entry[key] = data.draw(json_values | st.sampled_from(["../../../../etc/passwd", "/etc/passwd"]))
        raw = json.dumps(coco).encode()
    (coco_dir / "ann.json").write_bytes(raw)
    detections_outcome(coco_dir, "coco")


@FUZZ
@given(raw=file_bytes(b"<annotation><filename>a.jpg</filename><object><name>car</name></object></annotation>"))
def test_voc_xml_bytes(coco_dir, raw):
    voc = coco_dir / "voc"
    voc.mkdir(exist_ok=True)
    shutil.copy(coco_dir / "a.jpg", voc / "a.jpg")
    (voc / "a.xml").write_bytes(raw)
    detections_outcome(voc, "voc")


# ---------------------------------------------------------------- config files


@FUZZ
@given(raw=file_bytes(b"model:\n  name_or_path: m\ndata:\n  train: t.jsonl\ntrain:\n  lr: 1.0e-5\n"))
def test_config_file_bytes(tmp_path, raw):
    path = tmp_path / "c.yaml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except VlmtuneError:
        pass
