"""Pair building: rejected strategies, determinism, leak-free split, the from-detections command."""

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from vlmtune.cli import main
from vlmtune.data.detections import ImageCounts
from vlmtune.data.pairs import (
    STRATEGIES, PairStats, build_pairs, parse_mapping, parse_split, parse_strategies, rejected_answer, split_for,
)
from vlmtune.errors import VlmtuneError
from vlmtune.tasks.counting import CountingTask

TASK = CountingTask()
COUNT_CASES = [
    {"car": 0, "motorcycle": 0, "bus": 0, "bicycle": 0},
    {"car": 2, "motorcycle": 2, "bus": 2, "bicycle": 2},
    {"car": 1, "motorcycle": 0, "bus": 3, "bicycle": 0},
    {"car": 9, "motorcycle": 1, "bus": 0, "bicycle": 4},
]


@pytest.mark.parametrize("strategy", ["off_by_one", "off_by_k", "total_only", "random"])
def test_strategy_never_equals_chosen(strategy):
    for counts in COUNT_CASES:
        for seed in range(50):
            rejected = rejected_answer(counts, TASK, strategy, random.Random(seed))
            assert rejected != TASK.render(counts)
            parsed = TASK.parse(rejected)
            if strategy == "total_only":
                assert parsed.total == sum(counts.values())
            else:
                assert parsed.mentions_every_class and parsed.counts != counts


def test_strategy_sizes_of_error():
    counts = COUNT_CASES[3]
    for seed in range(50):
        for strategy, allowed in (("off_by_one", {1}), ("off_by_k", {2, 3})):
            wrong = TASK.parse(rejected_answer(counts, TASK, strategy, random.Random(seed))).counts
            diffs = [abs(wrong[c] - counts[c]) for c in counts if wrong[c] != counts[c]]
            assert len(diffs) == 1 and diffs[0] in allowed and min(wrong.values()) >= 0


def test_swap_exchanges_two_different_counts_and_declines_when_all_equal():
    for seed in range(30):
        wrong = TASK.parse(rejected_answer(COUNT_CASES[2], TASK, "swap", random.Random(seed))).counts
        assert sorted(wrong.values()) == sorted(COUNT_CASES[2].values()) and wrong != COUNT_CASES[2]
    assert rejected_answer(COUNT_CASES[1], TASK, "swap", random.Random(0)) is None


def _item(name: str, **counts) -> ImageCounts:
    return ImageCounts(Path(f"/data/{name}.jpg"), f"{name}.jpg", name.split("_jpg")[0], None, Counter(counts))


def _build(items, **kw):
    stats = PairStats(classes=list(TASK.classes))
    return list(build_pairs(items, TASK, stats, **kw)), stats


def test_swap_only_falls_back_to_nothing_rather_than_a_duplicate():
    records, stats = _build([_item("same", car=1, motorcycle=1, bus=1, bicycle=1)], strategies=("swap",))
    assert records == [] and stats.images["train"] + stats.images["val"] + stats.images["test"] == 1
    records, _ = _build([_item("same", car=1, motorcycle=1, bus=1, bicycle=1)], strategies=("swap", "off_by_one"))
    assert [r.metadata["strategy"] for r in records] == ["off_by_one"]


def test_pairs_per_image_are_distinct_and_metadata_complete():
    items = [_item(f"img{k}", car=k % 3, bus=k % 2, motorcycle=1) for k in range(20)]
    records, stats = _build(items, rejects_per_image=4, split={"train": 1.0})
    by_image = defaultdict(list)
    for r in records:
        by_image[r.images[0]].append(r)
        assert r.chosen == TASK.render(r.metadata["counts"]) and r.rejected != r.chosen
        assert set(r.metadata) == {"counts", "classes", "source_image", "split", "strategy"}
        assert r.metadata["split"] == "train" and r.image_slots() == 1
    assert all(len(v) == 4 and len({r.rejected for r in v}) == 4 for v in by_image.values())
    assert sum(stats.pairs.values()) == 80 and stats.objects["motorcycle"] == 20
    assert len({r.id for r in records}) == 80


def test_deterministic_and_independent_of_order():
    items = [_item(f"img{k}", car=k % 4, bicycle=k % 3) for k in range(30)]
    a, _ = _build(items, rejects_per_image=2, seed=3)
    b, _ = _build(list(reversed(items)), rejects_per_image=2, seed=3)
    c, _ = _build(items, rejects_per_image=2, seed=4)
    key = lambda rs: sorted(json.dumps(r.to_dict(), sort_keys=True) for r in rs)  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)
    assert {r.prompt_text() for r in a} > {"<image> Please count the number of vehicles you see."}


def test_split_follows_fractions_and_is_stable():
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    splits = Counter(split_for(f"photo{k}", fractions) for k in range(5000))
    assert abs(splits["train"] / 5000 - 0.8) < 0.03 and abs(splits["test"] / 5000 - 0.1) < 0.02
    assert split_for("photo1", fractions) == split_for("photo1", dict(fractions))


def test_option_parsers():
    assert parse_split("train=0.5,test=0.5") == {"train": 0.5, "test": 0.5}
    assert parse_split("keep") is None
    assert parse_mapping(["motorbike=motorcycle", "Auto=car,lorry=truck"]) == {
        "motorbike": "motorcycle", "auto": "car", "lorry": "truck"}
    assert parse_strategies("swap, random") == ("swap", "random")
    for bad in (lambda: parse_split("train=0.5"), lambda: parse_split("train:1"),
                lambda: parse_mapping(["motorbike"]), lambda: parse_strategies("flip")):
        with pytest.raises(VlmtuneError):
            bad()
    assert set(STRATEGIES) == {"off_by_one", "off_by_k", "swap", "total_only", "random"}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_vehicles_openimages_needs_classes_then_splits_without_leaks(shared_data, tmp_path, capsys):
    root = str(shared_data / "vehicles-openimages")
    assert main(["data", "from-detections", root, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no data.yaml" in err and "--classes Ambulance,Bus,Car,Motorcycle,Truck" in err and "Traceback" not in err

    out = tmp_path / "pairs"
    argv = ["data", "from-detections", root, "--out", str(out), "--classes", "Ambulance,Bus,Car,Motorcycle,Truck",
            "--map", "ambulance=car", "--count", "car,motorcycle,bus,truck", "--rejects-per-image", "2"]
    assert main(argv) == 0
    assert "pairs per strategy" in capsys.readouterr().out
    rows = {split: _read(out / f"{split}.jsonl") for split in ("train", "val", "test")}
    split_of_source = defaultdict(set)
    for split, records in rows.items():
        for r in records:
            split_of_source[r["metadata"]["source_image"]].add(split)
            assert r["metadata"]["split"] == split
    assert len(split_of_source) == 63 and all(len(s) == 1 for s in split_of_source.values())
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["images"].values()) == 126 and sum(stats["pairs_per_split"].values()) == 252
    assert stats["objects"]["car"] == 150 + 18  # ambulances mapped onto cars
    assert stats["classes"] == ["car", "motorcycle", "bus", "truck"] and stats["ignored_objects"] == {}
    first = (out / "train.jsonl").read_text()
    assert main(argv) == 0 and (out / "train.jsonl").read_text() == first  # deterministic


def test_cli_highway_drop_and_map(shared_data, tmp_path, capsys):
    out = tmp_path / "hw"
    argv = ["data", "from-detections", str(shared_data / "highway-od-40"), "--out", str(out),
            "--drop", "person", "--map", "motorbike=motorcycle", "--format", "trl", "--split", "keep"]
    assert main(argv) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["classes"] == ["bus", "car", "motorcycle", "truck"]
    assert stats["dropped_objects"] == {"person": 40} and stats["images"] == {"test": 251}
    rows = _read(out / "test.jsonl")
    assert len(rows) == 251 and "motorcycle" in rows[0]["chosen"][0]["content"][0]["text"]
    assert main(argv[:3] + ["--map", "motorbke=motorcycle", "--out", str(out)]) == 2
    assert "no class motorbke" in capsys.readouterr().err


def test_cli_bad_label_line_and_skip_bad(tmp_path, capsys):
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "labels").mkdir()
    for stem, text in (("a", "0 0.5 0.5 0.1 0.1\n"), ("b", "0 0.5 0.5 0.1 0.1\n7 0.5 0.5 0.1 0.1\n")):
        (tmp_path / "d" / "images" / f"{stem}.jpg").write_bytes(b"")
        (tmp_path / "d" / "labels" / f"{stem}.txt").write_text(text)
    argv = ["data", "from-detections", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--classes", "car"]
    assert main(argv) == 2
    assert "b.txt:2: class index 7" in capsys.readouterr().err
    assert main(argv + ["--skip-bad", "--split", "train=1"]) == 0
    assert "skipped 1 bad label" in capsys.readouterr().out
    assert len(_read(tmp_path / "o" / "train.jsonl")) == 1
