"""Samples while training (``train.sample_every``): the fixed items, their scores, the markdown table,
``samples.html`` (newest first, escaped, images embedded), TensorBoard, resume, and the compare report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.config import validate_config
from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError
from vlmtune.report.html import training_samples_html
from vlmtune.report.inputs import RunResult
from vlmtune.train.loop import Trainer
from vlmtune.train.samples import (PAGE_FILE, ROWS_FILE, SampleLog, fixed_items, latest_rows, markdown_table,
                                 read_sample_rows, sample_rows)
from vlmtune.train.samples_html import samples_page, step_summary

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many cars?"}]}]
COUNTS = {"car": 2, "bus": 0}


def count_record(record_id: str, image: str) -> PreferenceRecord:
    return PreferenceRecord(record_id, [image], PROMPT, "There are 2 cars, 0 buses in the image.",
                            "There are 3 cars, 0 buses in the image.", {"counts": COUNTS, "classes": list(COUNTS)})


def plain_record(record_id: str, image: str) -> PreferenceRecord:
    return PreferenceRecord(record_id, [image], PROMPT, "a red car", "a blue car", {})


@pytest.fixture
def image(tmp_path) -> str:
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    return str(path)


def test_the_items_are_the_first_of_the_eval_data_else_of_the_training_data():
    assert fixed_items(["e1", "e2", "e3"], ["t1", "t2"], 2) == ["e1", "e2"]
    assert fixed_items([], ["t1", "t2", "t3"], 2) == ["t1", "t2"]
    assert fixed_items(["e1"], ["t1"], 8) == ["e1"]


def test_rows_are_scored_by_the_records_task_and_unscored_without_one(image):
    records = [count_record("right", image), count_record("wrong", image), plain_record("free", image)]
    answers = ["There are 2 cars, 0 buses in the image.", "There are 5 cars, 0 buses in the image.", "a car"]
    rows = sample_rows(7, records, answers)
    assert [r["step"] for r in rows] == [7, 7, 7]
    assert (rows[0]["reward"], rows[0]["correct"], rows[0]["family"]) == (1.0, True, "count")
    assert (rows[1]["reward"], rows[1]["correct"]) == (0.0, False)
    assert rows[0]["gold"] == "There are 2 cars, 0 buses in the image."  # the count task's own text
    assert (rows[2]["reward"], rows[2]["correct"], rows[2]["family"], rows[2]["gold"]) == (None, None, None, "a red car")
    assert rows[2]["prompt"] == "<image> How many cars?" and rows[2]["image"] == image


def test_the_markdown_table_keeps_model_output_inside_its_cells():
    rows = [{"id": "a", "answer": "2 | 3\nmore", "gold": "2", "reward": 0.25},
            {"id": "b", "answer": "", "gold": "x", "reward": None}]
    assert markdown_table(rows).splitlines() == [
        "| id | answer | gold | reward |",
        "|---|---|---|---|",
        "| a | 2 \\| 3 more | 2 | 0.25 |",
        "| b | (empty) | x | – |",
    ]


def _row(step, record_id, answer, image, reward=None):
    return {"step": step, "id": record_id, "image": image, "prompt": "How many?", "answer": answer, "gold": "2",
            "family": None if reward is None else "count", "reward": reward,
            "correct": None if reward is None else reward >= 1.0}


def test_the_page_shows_the_newest_step_first_escapes_text_and_embeds_images(image):
    rows = [_row(2, "a", "<script>alert(1)</script>", image, 0.0), _row(4, "a", "2 & more", image, 1.0)]
    page = samples_page(rows, "<b>run</b>")
    assert [int(s) for s in re.findall(r'data-step="(\d+)"', page)] == [4, 2]
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "2 &amp; more" in page and "&lt;b&gt;run&lt;/b&gt;" in page
    assert "<script" not in page  # no script at all, and the policy forbids one
    assert "default-src 'none'" in page
    assert page.count("data:image/jpeg;base64,") == 2  # each step's card has the image inline
    assert "src=\"file:" not in page and "src=\"/" not in page


def test_a_missing_image_is_named_on_its_card(tmp_path):
    page = samples_page([_row(1, "a", "2", str(tmp_path / "gone.png"))], "run")
    assert "image not readable" in page and "gone.png" in page


def test_the_step_summary_counts_right_answers_among_the_scored():
    rows = [{"reward": 1.0, "correct": True}, {"reward": 0.5, "correct": False}, {"reward": None, "correct": None}]
    assert step_summary(rows) == "3 items · mean reward 0.75 · 1 of 2 right"
    assert step_summary([{"reward": None, "correct": None}]) == "1 items"


def test_a_resumed_log_keeps_the_earlier_steps_and_drops_the_later_ones(tmp_path, image):
    log = SampleLog(tmp_path, start_step=0)
    assert not log.images_logged
    for step in (2, 4, 6):
        log.add([_row(step, "a", f"answer {step}", image, 1.0)], "run")
    resumed = SampleLog(tmp_path, start_step=4)  # the checkpoint is step 4: step 6 will be redone
    assert resumed.images_logged
    assert [r["step"] for r in read_sample_rows(tmp_path / ROWS_FILE)] == [2, 4]
    resumed.add([_row(6, "a", "answer 6 again", image, 0.0)], "run")
    page = (tmp_path / PAGE_FILE).read_text()
    assert [int(s) for s in re.findall(r'data-step="(\d+)"', page)] == [6, 4, 2]
    assert "answer 6 again" in page and "answer 6<" not in page


def test_a_bad_samples_file_is_named_with_its_line(tmp_path):
    path = tmp_path / ROWS_FILE
    path.write_text(json.dumps({"step": 1, "id": "a", "answer": "x"}) + "\n" + json.dumps({"id": "b"}) + "\n")
    with pytest.raises(VlmtuneError, match=rf"{ROWS_FILE}, line 2: not a training sample"):
        read_sample_rows(path)


def test_the_compare_report_shows_each_runs_latest_samples(tmp_path, image):
    run = tmp_path / "dpo"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    (run / ROWS_FILE).write_text("".join(json.dumps(r) + "\n" for r in [
        _row(1, "a", "old answer", image, 0.0), _row(3, "a", "new <answer>", image, 1.0)]))
    html = training_samples_html([RunResult("base", tmp_path / "base"),
                                  RunResult("dpo", tmp_path / "dpo-eval", run / "metrics.jsonl")])
    assert "new &lt;answer&gt;" in html and "old answer" not in html
    assert "step 3" in html and "dpo" in html
    assert training_samples_html([RunResult("base", tmp_path / "base")]) == ""
    assert latest_rows([]) == []


def _raw(model_dir, data, out, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "max_length": 128},
        "online": {"max_new_tokens": 8},
        "train": {"output_dir": str(out), "lr": 1e-2, "max_steps": 3, "batch_size": 2, "schedule": "constant",
                  "progress": False, "sample_every": 2, "sample_count": 3, **train},
    }


def _board(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    board.Reload()
    return board


def test_a_training_run_samples_every_n_steps_and_at_the_end(tiny_model_dir, synth_pairs_file, tmp_path):
    run = tmp_path / "run"
    Trainer(validate_config(_raw(tiny_model_dir, synth_pairs_file, run))).train()
    rows = read_sample_rows(run / ROWS_FILE)
    assert [r["step"] for r in rows] == [2, 2, 2, 3, 3, 3]  # every 2 steps, and the last (3)
    first_ids = [json.loads(line)["id"] for line in synth_pairs_file.read_text().splitlines()[:3]]
    assert [r["id"] for r in rows[:3]] == [r["id"] for r in rows[3:]] == first_ids  # the same items
    assert all(r["family"] == "count" and 0.0 <= r["reward"] <= 1.0 for r in rows)
    page = (run / PAGE_FILE).read_text()
    assert [int(s) for s in re.findall(r'data-step="(\d+)"', page)] == [3, 2]
    board = _board(run)
    assert [e.step for e in board.Tensors("samples/text_summary")] == [2, 3]
    images = [tag for tag in board.Tags()["images"] if tag.startswith("samples/")]
    assert len(images) == 3 and all(len(board.Images(tag)) == 1 for tag in images)  # once


def test_sampling_is_off_by_default_and_with_zero(tiny_model_dir, synth_pairs_file, tmp_path):
    for name, extra in (("default", {"sample_every": None}), ("zero", {"sample_every": 0})):
        run = tmp_path / name
        Trainer(validate_config(_raw(tiny_model_dir, synth_pairs_file, run, max_steps=1, **extra))).train()
        assert not (run / ROWS_FILE).exists() and not (run / PAGE_FILE).exists()


def test_a_resumed_run_keeps_the_earlier_samples(tiny_model_dir, synth_pairs_file, tmp_path):
    run = tmp_path / "run"
    Trainer(validate_config(_raw(tiny_model_dir, synth_pairs_file, run, max_steps=2, sample_count=2))).train()
    config = validate_config(_raw(tiny_model_dir, synth_pairs_file, run, max_steps=4, sample_count=2))
    Trainer(config, resume=True).train()
    assert [r["step"] for r in read_sample_rows(run / ROWS_FILE)] == [2, 2, 4, 4]
    page = (run / PAGE_FILE).read_text()
    assert [int(s) for s in re.findall(r'data-step="(\d+)"', page)] == [4, 2]
