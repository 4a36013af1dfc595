"""The one JSONL reader (line-numbered errors, the --skip-bad rule) and the infer answers file."""

from __future__ import annotations

import json
import logging

import pytest

from vlmtune.data.records import PreferenceRecord, user_prompt
from vlmtune.errors import VlmtuneError
from vlmtune.eval.answers import answer_rows, read_answers, write_answers
from vlmtune.jsonl import read_jsonl

GOOD = '{"id": "a", "text": "x"}'


def _file(tmp_path, *lines: str):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_rows_come_with_their_line_numbers_and_blank_lines_are_ignored(tmp_path):
    path = _file(tmp_path, GOOD, "", "   ", '{"id": "b"}')
    assert read_jsonl(path) == [(1, {"id": "a", "text": "x"}), (4, {"id": "b"})]


@pytest.mark.parametrize("line, problem", [
    ("{oops", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object, got list"),
    ('{"id": "b"}', "line 2: missing text"),
])
def test_a_bad_line_names_the_file_and_line(tmp_path, line, problem):
    path = _file(tmp_path, GOOD, line)
    with pytest.raises(VlmtuneError, match=f"rows.jsonl, {problem}") as e:
        read_jsonl(path, required=("id", "text"))
    assert "--skip-bad" not in str(e.value)  # the caller offers no skipping
    with pytest.raises(VlmtuneError, match=r"\(or pass --skip-bad to skip it\)"):
        read_jsonl(path, required=("id", "text"), skip_bad=False)


def test_skip_bad_keeps_the_good_lines_and_logs_each_skipped_one(tmp_path, caplog):
    path = _file(tmp_path, "{oops", GOOD, '{"id": "c"}')
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        rows = read_jsonl(path, required=("id", "text"), skip_bad=True)
    assert rows == [(2, {"id": "a", "text": "x"})]
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 2
    assert skipped[0].startswith(f"skipped {path}, line 1: not valid JSON")
    assert skipped[1] == f"skipped {path}, line 3: missing text"


def test_missing_and_non_utf8_files_are_errors_not_tracebacks(tmp_path):
    with pytest.raises(VlmtuneError, match="nothing.jsonl does not exist"):
        read_jsonl(tmp_path / "nothing.jsonl")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"id": "café"}\n'.encode("latin-1"))
    with pytest.raises(VlmtuneError, match="latin1.jsonl: not UTF-8 text"):
        read_jsonl(path)


def _record(i: int) -> PreferenceRecord:
    return PreferenceRecord(id=f"r{i}", images=[f"img{i}.png"], prompt=user_prompt(f"Count {i}."),
                            chosen="c", rejected="r", metadata={"counts": {"car": i}})


def test_answers_file_round_trip(tmp_path):
    records = [_record(0), _record(1)]
    rows = answer_rows(records, ["zero", "one"])
    path = tmp_path / "out" / "answers.jsonl"
    assert write_answers(rows, path) == 2
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert written[1] == {"id": "r1", "images": ["img1.png"], "prompt": json.loads(json.dumps(records[1].prompt)),
                          "answer": "one", "metadata": {"counts": {"car": 1}}}
    assert read_answers(path) == {"r0": "zero", "r1": "one"}


def test_samples_share_their_record_id_and_are_numbered(tmp_path):
    records = [_record(0), _record(1)]
    rows = answer_rows(records, ["a", "b", "c", "d", "e", "f"], num_samples=3)
    assert [(r["id"], r["metadata"]["sample"]) for r in rows] == [
        ("r0", 0), ("r0", 1), ("r0", 2), ("r1", 0), ("r1", 1), ("r1", 2)]
    assert "sample" not in records[0].metadata  # the record's own metadata is left alone
    with pytest.raises(ValueError, match="5 answers for 2 records x 3 samples"):
        answer_rows(records, ["a"] * 5, num_samples=3)
    # A sampled file has several answers per id: a reader wanting one answer per record refuses it.
    path = tmp_path / "sampled.jsonl"
    write_answers(rows, path)
    with pytest.raises(VlmtuneError, match=r"sampled.jsonl, line 2: id 'r0' appears twice"):
        read_answers(path)


def test_answers_rows_need_an_id_and_a_text_answer(tmp_path):
    path = _file(tmp_path, '{"id": "a", "answer": "x"}', '{"id": "b", "answer": 3}')
    with pytest.raises(VlmtuneError, match=r"rows.jsonl, line 2: an answers row needs \"id\" and a text \"answer\""):
        read_answers(path)
    path = _file(tmp_path, '{"id": "a", "answer": "x"}', "not json")
    with pytest.raises(VlmtuneError, match="rows.jsonl, line 2: not valid JSON"):
        read_answers(path)
