"""Every bad-input rule of `vlmtune data check`, on real bad files, plus load_records and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.cli import main
from vlmtune.data.check import check_records, image_problem
from vlmtune.data.load import load_records
from vlmtune.errors import VlmtuneError


def jpeg(path: Path, size: int = 32, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    im = Image.new("RGB", (size, size))
    im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size * size)])
    im.save(path, quality=90)
    return path


def row(i: int, image: str = "img.jpg", **changes) -> dict:
    base = {"id": f"r{i}", "image_path": image,
            "prompt": "<|user|>\nPlease count the number of vehicles you see. <image>\n<|assistant|>\n",
            "chosen": f"There are {i} cars.", "rejected": f"There are {i + 1} cars."}
    return {**base, **changes}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    jpeg(tmp_path / "img.jpg")
    return tmp_path


def only_problem(report, kind: str, location: str):
    assert [p.kind for p in report.problems] == [kind], report.problems
    assert report.problems[0].location == location
    return report.problems[0]


def test_clean_file_has_no_problems(folder):
    report = check_records(jsonl(folder / "d.jsonl", [row(0), row(1)]))
    assert report.ok and report.format == "seed"
    assert (report.records_read, report.ok_records, report.bad_records) == (2, 2, 0)


def test_malformed_json_line(folder):
    path = jsonl(folder / "d.jsonl", [row(0), '{"id": "r1", "image_path": \n'])
    problem = only_problem(check_records(path), "malformed-json", f"{path}:2")
    assert "fix or delete the line" in problem.message


def test_malformed_json_array_names_the_line(folder):
    path = folder / "d.json"
    path.write_text('[\n{"image_path": "img.jpg",\n "prompt": oops}\n]')
    report = check_records(path, fmt="seed")
    assert report.problems[0].kind == "malformed-json" and report.problems[0].location == f"{path}:3"


def test_missing_key(folder):
    bad = row(1)
    del bad["rejected"]
    path = jsonl(folder / "d.jsonl", [row(0), bad])
    problem = only_problem(check_records(path), "missing-key", f"{path}:2")
    assert "rejected" in problem.message


def test_unknown_format(folder):
    path = jsonl(folder / "d.jsonl", [{"question": "q"}])
    problem = only_problem(check_records(path), "unknown-format", str(path))
    assert "seed" in problem.message and "llamafactory" in problem.message


def test_missing_image_file(folder):
    path = jsonl(folder / "d.jsonl", [row(0, image="nope.jpg")])
    problem = only_problem(check_records(path), "missing-image", f"{path}:1")
    assert str(folder / "nope.jpg") in problem.message


def test_non_image_file(folder):
    (folder / "notes.jpg").write_text("this is not a picture")
    path = jsonl(folder / "d.jsonl", [row(0, image="notes.jpg")])
    problem = only_problem(check_records(path), "unreadable-image", f"{path}:1")
    assert "not an image" in problem.message


def test_truncated_jpeg(folder):
    data = (folder / "img.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    path = jsonl(folder / "d.jsonl", [row(0), row(1, image="cut.jpg")])
    problem = only_problem(check_records(path), "unreadable-image", f"{path}:2")
    assert "truncated" in problem.message
    assert check_records(path, check_images=False).ok  # only decoding finds it


def test_image_count_mismatch(folder):
    path = jsonl(folder / "d.jsonl", [row(0, prompt="<|user|>\n<image> and <image>?\n<|assistant|>\n")])
    problem = only_problem(check_records(path), "image-count", f"{path}:1")
    assert "2 image slot(s)" in problem.message and "1 image(s)" in problem.message


def test_empty_answer(folder):
    path = jsonl(folder / "d.jsonl", [row(0, chosen="  ")])
    only_problem(check_records(path), "empty-answer", f"{path}:1")


def test_chosen_equals_rejected(folder):
    path = jsonl(folder / "d.jsonl", [row(0, rejected="There are 0 cars.")])
    only_problem(check_records(path), "same-answers", f"{path}:1")


def test_duplicate_id(folder):
    path = jsonl(folder / "d.jsonl", [row(0), row(1, id="r0")])
    problem = only_problem(check_records(path), "duplicate-id", f"{path}:2")
    assert f"{path}:1" in problem.message


def test_duplicate_content(folder):
    path = jsonl(folder / "d.jsonl", [row(0), row(0, id="other")])
    problem = only_problem(check_records(path), "duplicate-content", f"{path}:2")
    assert f"{path}:1" in problem.message


def test_text_longer_than_the_limit(folder):
    path = jsonl(folder / "d.jsonl", [row(0, prompt="Count.", chosen="x" * 50)])
    assert check_records(path, max_chars=60).ok
    problem = only_problem(check_records(path, max_chars=40), "too-long", f"{path}:1")
    assert "'chosen' is 50 characters (limit 40)" in problem.message


def test_literal_tags_left_in_a_message_prompt(folder):
    trl = {"images": ["img.jpg"], "prompt": [{"role": "user", "content": "<image> How many?"}],
           "chosen": [{"role": "assistant", "content": "Two."}],
           "rejected": [{"role": "assistant", "content": "Six."}]}
    path = jsonl(folder / "d.jsonl", [trl])
    problem = only_problem(check_records(path), "literal-tag", f"{path}:1")
    assert "<image>" in problem.message


def test_wrong_value_type(folder):
    path = jsonl(folder / "d.jsonl", [row(0, chosen=3)])
    only_problem(check_records(path), "bad-value", f"{path}:1")


def test_json_array_locations_are_indexes(folder):
    path = folder / "d.json"
    path.write_text(json.dumps([row(0), row(1, chosen="")]))
    only_problem(check_records(path), "empty-answer", f"{path}[1]")


def test_all_problems_are_reported_in_one_pass(folder):
    path = jsonl(folder / "d.jsonl", [row(0), "{broken\n", row(2, image="gone.jpg"), row(3, chosen=""),
                                      row(4, id="r0")])
    report = check_records(path)
    assert [(p.location, p.kind) for p in report.problems] == [
        (f"{path}:2", "malformed-json"), (f"{path}:3", "missing-image"),
        (f"{path}:4", "empty-answer"), (f"{path}:5", "duplicate-id")]
    assert (report.records_read, report.bad_records, report.ok_records) == (5, 4, 1)


def test_worker_pool_finds_the_same_bad_images(tmp_path):
    """Enough images to use worker processes: the result equals the in-process check."""
    good = jpeg(tmp_path / "g.jpg", size=8)
    data = good.read_bytes()
    rows = []
    for i in range(300):
        p = tmp_path / f"i{i}.jpg"
        p.write_bytes(data[:-40] if i in (7, 250) else data)
        rows.append(row(i, image=p.name))
    path = jsonl(tmp_path / "d.jsonl", rows)
    pooled = check_records(path, workers=2)
    assert [p.location for p in pooled.problems] == [f"{path}:8", f"{path}:251"]
    assert pooled.problems == check_records(path, workers=1).problems


def test_image_problem_accepts_a_png_and_names_a_missing_file(tmp_path):
    Image.new("L", (5, 5)).save(tmp_path / "a.png")
    assert image_problem(str(tmp_path / "a.png")) is None
    kind, message = image_problem(str(tmp_path / "zz.png"))
    assert kind == "missing-image" and "not found" in message


# ---------------------------------------------------------------- load_records


def test_load_records_raises_with_the_problems(folder):
    path = jsonl(folder / "d.jsonl", [row(0), row(1, chosen="")])
    with pytest.raises(VlmtuneError, match=r"1 problem\(s\) in 1 of 2 records:\n.*d.jsonl:2: empty-answer"):
        load_records(path)


def test_load_records_skip_bad_keeps_good_records_and_logs_why(folder, caplog):
    path = jsonl(folder / "d.jsonl", [row(0), row(1, chosen=""), row(2), row(3, id="r0")])
    records = load_records(path, skip_bad=True)
    assert [r.id for r in records] == ["r0", "r2"]
    [message] = [r.getMessage() for r in caplog.records if r.name == "vlmtune.data.load"]
    assert "skipped 2 of 4 records" in message and "empty-answer" in message and "duplicate-id" in message


def test_load_records_lists_twenty_problems_then_a_count(folder):
    path = jsonl(folder / "d.jsonl", [row(i, chosen="") for i in range(25)])
    with pytest.raises(VlmtuneError) as e:
        load_records(path)
    assert str(e.value).count("empty-answer") == 20 and "... and 5 more" in str(e.value)


def test_load_records_cannot_skip_an_unreadable_file(folder):
    path = jsonl(folder / "d.jsonl", [{"question": "q"}])
    with pytest.raises(VlmtuneError, match="cannot tell the data format"):
        load_records(path, skip_bad=True)


# ---------------------------------------------------------------- CLI


def test_cli_check_clean_file_exits_0(folder, capsys):
    assert main(["data", "check", str(jsonl(folder / "d.jsonl", [row(0)]))]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "records ok" in out


def test_cli_check_reports_problems_and_a_summary(folder, capsys):
    path = jsonl(folder / "d.jsonl", [row(0), row(1, chosen=""), "{x\n"])
    assert main(["data", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: empty-answer" in out and f"{path}:3: malformed-json" in out
    assert "records bad" in out and "2 problem(s) found" in out


def test_cli_check_json_report(folder, capsys):
    path = jsonl(folder / "d.jsonl", [row(0, prompt="Count."), row(1, prompt="Count.", chosen="x" * 30)])
    assert main(["data", "check", str(path), "--json", "--max-chars", "20", "--format", "seed"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"too-long": 1} and report["bad_records"] == 1
    assert report["problems"][0]["location"] == f"{path}:2"


def test_cli_check_missing_file_exits_2(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "absent.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_help_works(capsys):
    for argv in (["data", "--help"], ["data", "check", "--help"], ["data", "convert", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "--max-chars" in capsys.readouterr().out
