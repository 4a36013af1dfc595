"""Detection readers: YOLO (flat and Roboflow layouts), COCO, VOC; bad labels name file:line."""

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.data.detections import LabelBox, class_names, detect_format, read_boxes, read_detections, source_name
from vlmtune.errors import VlmtuneError


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def _yolo(folder: Path, labels: dict[str, str]) -> None:
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    for stem, text in labels.items():
        _image(folder / "images" / f"{stem}.jpg")
        if text is not None:
            (folder / "labels" / f"{stem}.txt").write_text(text)


def _by_name(items) -> dict[str, Counter]:
    return {Path(i.rel).name: i.counts for i in items}


def test_yolo_flat_layout_with_classes(tmp_path):
    _yolo(tmp_path, {"a": "0 0.5 0.5 0.1 0.1\n1 0.2 0.2 0.1 0.1\n0 0.1 0.1 0.1 0.1\n", "b": "", "c": None})
    items = list(read_detections(tmp_path, classes=["Car", "Bus"]))
    assert detect_format(tmp_path) == "yolo"
    assert _by_name(items) == {"a.jpg": Counter(car=2, bus=1), "b.jpg": Counter(), "c.jpg": Counter()}
    assert all(i.split is None and i.image.is_absolute() for i in items)


def test_yolo_roboflow_layout_reads_data_yaml_and_splits(tmp_path):
    (tmp_path / "data.yaml").write_text("names: [bus, car, motorbike]\nnc: 3\n")
    _yolo(tmp_path / "train", {"p1_jpg.rf.AAA": "2 0.5 0.5 0.2 0.2\n"})
    _yolo(tmp_path / "valid", {"p2_jpg.rf.BBB": "0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.3 0.3 \n"})
    items = sorted(read_detections(tmp_path), key=lambda i: i.rel)
    assert [(i.rel, i.split, i.source) for i in items] == [
        ("train/images/p1_jpg.rf.AAA.jpg", "train", "p1"),
        ("valid/images/p2_jpg.rf.BBB.jpg", "val", "p2"),
    ]
    assert items[1].counts == Counter(bus=1, car=1)
    assert class_names(tmp_path) == ["bus", "car", "motorbike"]


def test_yolo_polygon_rows_are_objects(tmp_path):
    _yolo(tmp_path, {"a": "0 0.1 0.1 0.2 0.1 0.2 0.2 0.1 0.2\n"})
    assert _by_name(read_detections(tmp_path, classes=["car"]))["a.jpg"] == Counter(car=1)


def test_yolo_without_names_asks_for_classes(tmp_path):
    _yolo(tmp_path, {"a": "0 0.5 0.5 0.1 0.1\n"})
    with pytest.raises(VlmtuneError, match="no data.yaml.*--classes"):
        read_detections(tmp_path)


@pytest.mark.parametrize("line, why", [
    ("5 0.5 0.5 0.1 0.1", "class index 5 but only 2"),
    ("car 0.5 0.5 0.1 0.1", "not a whole number"),
    ("0 0.5 0.5", "expected 'class"),
    ("0 0.5 x 0.1 0.1", "not numbers"),
])
def test_yolo_bad_line_names_file_and_line(tmp_path, line, why):
    _yolo(tmp_path, {"good": "0 0.5 0.5 0.1 0.1\n", "bad": f"0 0.5 0.5 0.1 0.1\n\n{line}\n"})
    with pytest.raises(VlmtuneError, match=rf"bad\.txt:3: .*{why}"):
        list(read_detections(tmp_path, classes=["car", "bus"]))
    skipped = []
    items = list(read_detections(tmp_path, classes=["car", "bus"], skip_bad=True, skipped=skipped))
    assert [Path(i.rel).name for i in items] == ["good.jpg"]
    assert len(skipped) == 1 and "bad.txt:3" in skipped[0]


def _coco(path: Path, images, annotations, categories) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def test_coco_roboflow_split_files(tmp_path):
    cats = [{"id": 0, "name": "vehicles"}, {"id": 1, "name": "Car"}, {"id": 2, "name": "Bus"}]
    for split, n_cars in (("train", 2), ("test", 0)):
        _image(tmp_path / split / "x_jpg.rf.1.jpg")
        anns = [{"id": k, "image_id": 7, "category_id": 1} for k in range(n_cars)]
        anns.append({"id": 99, "image_id": 7, "category_id": 2})
        _coco(tmp_path / split / "_annotations.coco.json", [{"id": 7, "file_name": "x_jpg.rf.1.jpg"}], anns, cats)
    assert detect_format(tmp_path) == "coco"
    items = sorted(read_detections(tmp_path), key=lambda i: i.rel)
    assert [(i.split, dict(i.counts)) for i in items] == [("test", {"bus": 1}), ("train", {"car": 2, "bus": 1})]
    assert items[0].image == (tmp_path / "test" / "x_jpg.rf.1.jpg").resolve()
    assert class_names(tmp_path) == ["vehicles", "car", "bus"]


def test_coco_unknown_category_is_an_error(tmp_path):
    _image(tmp_path / "images" / "a.jpg")
    _coco(tmp_path / "ann.json", [{"id": 1, "file_name": "a.jpg"}],
          [{"id": 5, "image_id": 1, "category_id": 9}], [{"id": 1, "name": "car"}])
    with pytest.raises(VlmtuneError, match=r"ann\.json: annotation #0 \(id 5\): category_id 9"):
        list(read_detections(tmp_path))
    (tmp_path / "ann.json").write_text("{not json")
    with pytest.raises(VlmtuneError, match=r"ann\.json: not valid JSON: .* at column 2; fix the annotation file"):
        list(read_detections(tmp_path, "coco"))


def _voc(path: Path, filename: str, names: list[str]) -> None:
    objects = "".join(f"<object><name>{n}</name><bndbox/></object>" for n in names)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{filename}</filename>{objects}</annotation>")


def test_voc_annotations_folder_and_beside_images(tmp_path):
    _image(tmp_path / "JPEGImages" / "a.jpg")
    _voc(tmp_path / "Annotations" / "a.xml", "a.jpg", ["car", "Car", "bus"])
    assert detect_format(tmp_path) == "voc"
    [item] = read_detections(tmp_path)
    assert item.counts == Counter(car=2, bus=1) and item.image == (tmp_path / "JPEGImages" / "a.jpg").resolve()

    other = tmp_path / "roboflow"
    _image(other / "valid" / "b.jpg")
    _voc(other / "valid" / "b.xml", "b.jpg", ["bicycle"])
    [item] = read_detections(other)
    assert item.split == "val" and item.counts == Counter(bicycle=1)


def test_voc_bad_xml(tmp_path):
    _image(tmp_path / "a.jpg")
    _voc(tmp_path / "a.xml", "a.jpg", ["car"])
    (tmp_path / "b.xml").write_text("<annotation><filename>b.jpg")
    with pytest.raises(VlmtuneError, match=r"b\.xml: not valid XML"):
        list(read_detections(tmp_path))
    skipped = []
    assert len(list(read_detections(tmp_path, skip_bad=True, skipped=skipped))) == 1 and len(skipped) == 1


def test_unknown_folder_contents(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VlmtuneError, match="found no YOLO"):
        detect_format(tmp_path)
    with pytest.raises(VlmtuneError, match="not a folder"):
        detect_format(tmp_path / "notes.txt")
    with pytest.raises(VlmtuneError, match="missing: no such file or folder"):
        detect_format(tmp_path / "missing")


def test_source_name_of_roboflow_copies():
    assert source_name(Path("00dea1edf14f09ab_jpg.rf.KJ730oDTFPdXdJxvSLnX.jpg")) == "00dea1edf14f09ab"
    assert source_name(Path("a_b_png.rf.3f17c8790a68659d.png")) == "a_b"
    assert source_name(Path("plain.jpg")) == "plain"


def test_real_sets_read(shared_data):
    items = list(read_detections(shared_data / "highway-od-40"))
    assert len(items) == 251 and all(i.split == "test" for i in items)
    total = sum((i.counts for i in items), Counter())
    assert set(total) == {"bus", "car", "motorbike", "person", "truck"}


def test_doctests_pass():
    import doctest

    import vlmtune.data.detections as detections
    import vlmtune.data.label_values as label_values

    for module in (detections, label_values):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- boxes: the one reader counts come from


def test_yolo_boxes_are_fractions_and_counting_opens_no_image(tmp_path):
    _yolo(tmp_path, {"a": "1 0.5 0.5 0.2 0.4\n0 0.1 0.2 0.3 0.1 0.2 0.4\n"})
    [item] = read_boxes(tmp_path, classes=["car", "bus"])
    # centre (0.5, 0.5), size 0.2 x 0.4; the polygon (0.1, 0.2) (0.3, 0.1) (0.2, 0.4) spans x 0.1-0.3, y 0.1-0.4
    assert item.boxes == [LabelBox("bus", (0.4, 0.3, 0.6, 0.7)), LabelBox("car", (0.1, 0.1, 0.3, 0.4))]
    assert item.size is None and item.counts() == Counter(bus=1, car=1)
    (tmp_path / "images" / "a.jpg").write_bytes(b"not an image")  # counting never reads it
    assert [i.counts for i in read_detections(tmp_path, classes=["car", "bus"])] == [Counter(bus=1, car=1)]
    with pytest.raises(VlmtuneError, match=r"a\.jpg: not an image PIL can read .*pass --skip-bad"):
        list(read_boxes(tmp_path, classes=["car", "bus"], sizes=True))
    skipped = []
    assert list(read_boxes(tmp_path, classes=["car", "bus"], skip_bad=True, skipped=skipped, sizes=True)) == []
    assert len(skipped) == 1 and "a.jpg: not an image PIL can read" in skipped[0]


def test_yolo_sizes_come_from_the_image_header(tmp_path):
    _yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": None})
    items = list(read_boxes(tmp_path, classes=["car"], sizes=True))
    assert [(Path(i.rel).name, i.size, len(i.boxes)) for i in items] == [("a.jpg", (8, 8), 1), ("b.jpg", (8, 8), 0)]


def test_coco_boxes_use_the_stated_size_else_the_header_and_keep_crowd_and_boxless(tmp_path):
    Image.new("RGB", (50, 20)).save(tmp_path / "a.jpg")
    Image.new("RGB", (50, 20)).save(tmp_path / "b.jpg")
    images = [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 200}, {"id": 2, "file_name": "b.jpg"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 20, 20]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 100], "iscrowd": 1},
            {"id": 3, "image_id": 1, "category_id": 2},
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [5, 2, 10, 4]}]
    _coco(tmp_path / "ann.json", images, anns, [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}])
    a, b = read_boxes(tmp_path)
    # a: stated 100 x 200 (not the file's 50 x 20); [10, 20, 20, 20] spans x 10-30, y 20-40
    assert a.size == (100, 200)
    assert a.boxes == [LabelBox("car", (0.1, 0.1, 0.3, 0.2)), LabelBox("car", (0.0, 0.0, 0.5, 0.5), crowd=True),
                       LabelBox("bus", None)]
    # b: no stated size, so the file's 50 x 20; [5, 2, 10, 4] spans x 5-15, y 2-6
    assert b.size == (50, 20) and b.boxes == [LabelBox("bus", (0.1, 0.1, 0.3, 0.3))]
    assert [i.counts for i in read_detections(tmp_path)] == [Counter(car=2, bus=1), Counter(bus=1)]


@pytest.mark.parametrize("change, why", [
    ({"iscrowd": "yes"}, "iscrowd yes is not 0 or 1"),
    ({"bbox": [1, 1, 10 ** 400, 2]}, "a coordinate or size is too large"),
    ({"bbox": [1e308, 1, 1e308, 2]}, "a coordinate or size is too large"),
])
def test_coco_bad_crowd_flag_or_huge_box(tmp_path, change, why):
    _image(tmp_path / "a.jpg")
    _coco(tmp_path / "ann.json", [{"id": 1, "file_name": "a.jpg"}],
          [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], **change}], [{"id": 1, "name": "car"}])
    with pytest.raises(VlmtuneError, match=rf"ann\.json: annotation #0 \(id 5\): .*{why}"):
        list(read_detections(tmp_path))


def test_coco_box_on_an_unreadable_image_without_a_stated_size(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    _coco(tmp_path / "ann.json", [{"id": 1, "file_name": "a.jpg"}],
          [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}], [{"id": 1, "name": "car"}])
    with pytest.raises(VlmtuneError, match=r"a\.jpg: not an image PIL can read"):
        list(read_detections(tmp_path))


def _voc_boxes(path: Path, bndbox: str, size: str = "<size><width>100</width><height>50</height></size>") -> None:
    path.write_text(f"<annotation><filename>a.jpg</filename>{size}"
                    f"<object><name>car</name><bndbox>{bndbox}</bndbox></object></annotation>")


def test_voc_boxes_are_fractions_of_the_stated_size(tmp_path):
    _image(tmp_path / "a.jpg")
    _voc_boxes(tmp_path / "a.xml", "<xmin>10</xmin><ymin>5</ymin><xmax>30.5</xmax><ymax>25</ymax>")
    [item] = read_boxes(tmp_path)
    assert item.size == (100, 50) and item.boxes == [LabelBox("car", (0.1, 0.1, 0.305, 0.5))]
    _voc_boxes(tmp_path / "a.xml", "<xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax>", size="")
    [item] = read_boxes(tmp_path)  # no <size>: the image file's 8 x 8
    assert item.size == (8, 8) and item.boxes == [LabelBox("car", (0.125, 0.25, 0.375, 0.5))]


@pytest.mark.parametrize("bndbox, why", [
    ("<xmin>1</xmin><ymin>2</ymin><xmax>3</xmax>", "<bndbox> needs numbers <xmin>, <ymin>, <xmax> and <ymax>"),
    ("<xmin>1</xmin><ymin>2</ymin><xmax>x</xmax><ymax>4</ymax>", "<bndbox> needs numbers"),
    ("<xmin>1</xmin><ymin>nan</ymin><xmax>3</xmax><ymax>4</ymax>", "a coordinate or size is NaN or infinite"),
    ("<xmin>-1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax>", "a coordinate or size is negative"),
    ("<xmin>5</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax>", "xmax or ymax is below xmin or ymin"),
], ids=["missing-tag", "not-a-number", "nan", "negative", "max-below-min"])
def test_voc_bad_box_names_the_file_and_object(tmp_path, bndbox, why):
    _image(tmp_path / "a.jpg")
    _voc_boxes(tmp_path / "a.xml", bndbox)
    with pytest.raises(VlmtuneError, match=rf"a\.xml: <object> #0: {why}"):
        list(read_detections(tmp_path))
    skipped = []
    assert list(read_detections(tmp_path, skip_bad=True, skipped=skipped)) == [] and len(skipped) == 1
