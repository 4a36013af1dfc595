"""The answers file: what ``vlmtune infer --data`` writes and ``vlmtune study create`` reads back.

One JSON object a line, one per answer::

    {"id": record id, "images": [paths], "prompt": the record's chat messages,
     "answer": the model's text, "metadata": the record's metadata}

With several samples per record (``infer --num-samples k``) the k rows share the record's id
and ``metadata["sample"]`` numbers them 0..k-1. A reader matches answers to records by id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError
from vlmtune.jsonl import read_jsonl

def answer_row(record: PreferenceRecord, answer: str, sample: int | None = None) -> dict[str, Any]:
    """The row of one answer to ``record``; ``sample`` numbers it among several samples."""
    metadata = dict(record.metadata)
    if sample is not None:
        metadata["sample"] = sample
    return {"id": record.id, "images": list(record.images), "prompt": record.prompt,
            "answer": answer, "metadata": metadata}


def answer_rows(records: Sequence[PreferenceRecord], answers: Sequence[str], num_samples: int = 1) -> list[dict]:
    """Rows for ``answers`` in the order ``generate`` returns them: ``num_samples`` per record."""
    if len(answers) != len(records) * num_samples:
        raise ValueError(f"{len(answers)} answers for {len(records)} records x {num_samples} samples")
    return [answer_row(records[i // num_samples], answer, i % num_samples if num_samples > 1 else None)
            for i, answer in enumerate(answers)]


def answer_line(row: dict[str, Any]) -> str:
    """One row as a line of the answers file."""
    return json.dumps(row) + "\n"


def write_answers(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write the rows to ``path`` (its folder made if needed); returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(answer_line(row))
            n += 1
    return n


def read_answers(path: str | Path) -> dict[str, str]:
    """``id -> answer`` from an answers file; one answer per id (a sampled file is refused)."""
    path = Path(path)
    answers: dict[str, str] = {}
    for line_no, row in read_jsonl(path):
        if "id" not in row or not isinstance(row.get("answer"), str):
            raise VlmtuneError(f"{path}, line {line_no}: an answers row needs \"id\" and a text \"answer\" "
                             "(the rows `vlmtune infer` writes)")
        key = str(row["id"])
        if key in answers:
            raise VlmtuneError(f"{path}, line {line_no}: id {key!r} appears twice; keep one answer per record")
        answers[key] = row["answer"]
    return answers
