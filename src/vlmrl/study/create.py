"""Build a study: the data file's records plus both models' answers, into a new SQLite file.

Each side (A, B) is either a ``vlmrl infer`` answers file (JSONL rows ``{"id", "images",
"prompt", "answer", "metadata"}``, matched to records by ``id``) or a model to generate with.
A path is read as an answers file when it is a file whose first row has an ``"answer"`` key;
a folder or a hub name is a model.

Images are served only from the data set's folder (the folder of the data file), so a record
whose image lies outside it is refused here, and one that escapes it through a symlink is
refused by the web app when asked for.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from vlmrl.data.records import PreferenceRecord
from vlmrl.errors import VlmrlError
from vlmrl.eval.answers import read_answers
from vlmrl.study.db import StudyItem, create_study

Generator = Callable[[str, str | None, list[PreferenceRecord]], list[str]]


def is_answers_file(source: str) -> bool:
    """True when ``source`` is a file whose first JSON row carries an ``"answer"``."""
    path = Path(source)
    if not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and "answer" in row
    return False


def category_of(record: PreferenceRecord) -> str:
    """metadata["category"], else metadata["strategy"], else "all"."""
    for key in ("category", "strategy"):
        value = record.metadata.get(key)
        if isinstance(value, str) and value:
            return value
    return "all"


def image_problem(record: PreferenceRecord, root: Path) -> str | None:
    """Why this record's images cannot be served from ``root``, or None."""
    for image in record.images:
        path = Path(os.path.normpath(os.path.join(root, image)))
        if not path.is_relative_to(root):
            return f"image {image} lies outside the data folder {root}"
        if not path.is_file():
            return f"image {image} does not exist"
    return None


def answers_for(source: str, adapter: str | None, records: list[PreferenceRecord],
                generate_answers: Generator, skip_bad: bool, side: str) -> dict[str, str]:
    """One side's answers for the records, from a file or by generating them."""
    if is_answers_file(source):
        if adapter:
            raise VlmrlError(f"--{side.lower()}-adapter only applies to a model; {source} is an answers file")
        answers = read_answers(source)
        missing = [r.id for r in records if r.id not in answers]
        if missing and not skip_bad:
            raise VlmrlError(f"{source}: no answer for {len(missing)} record(s), first {missing[0]!r}; "
                             "answer every record of --data (or pass --skip-bad to leave them out)")
        return answers
    if Path(source).is_file():
        raise VlmrlError(f"{source}: neither a `vlmrl infer` answers file (JSONL rows with \"answer\") "
                         "nor a model folder")
    return dict(zip([r.id for r in records], generate_answers(source, adapter, records)))


def build_study(db_path: str | Path, name: str, data_path: str | Path, a: str, b: str,
                raters_per_item: int = 3, a_adapter: str | None = None, b_adapter: str | None = None,
                skip_bad: bool = False, generate_answers: Generator | None = None) -> tuple[str, int]:
    """Create the study file; returns (admin token, number of items)."""
    from vlmrl.data.formats import read_records

    if Path(db_path).exists():
        raise VlmrlError(f"{db_path} already exists; pick another --db or delete the old study first")
    if raters_per_item < 1:
        raise VlmrlError(f"--raters-per-item must be at least 1, got {raters_per_item}")
    data_path = Path(data_path)
    root = data_path.resolve().parent
    records = []
    for record in read_records(data_path, skip_bad=skip_bad):
        problem = image_problem(record, root)
        if problem is None:
            records.append(record)
        elif skip_bad:
            print(f"skipped {data_path} record {record.id!r}: {problem}", file=sys.stderr)
        else:
            raise VlmrlError(f"{data_path} record {record.id!r}: {problem}; the study serves images only "
                             "from the data file's folder (or pass --skip-bad)")
    generate_answers = generate_answers or generate_with_model
    answers_a = answers_for(a, a_adapter, records, generate_answers, skip_bad, "A")
    answers_b = answers_for(b, b_adapter, records, generate_answers, skip_bad, "B")
    items = []
    for record in records:
        if record.id in answers_a and record.id in answers_b:
            items.append(StudyItem(record, answers_a[record.id], answers_b[record.id], category_of(record)))
        else:
            print(f"skipped {data_path} record {record.id!r}: no answer from one of the models", file=sys.stderr)
    info = {"data": str(data_path.resolve()), "data_root": str(root), "model_a": _describe(a, a_adapter),
            "model_b": _describe(b, b_adapter)}
    return create_study(db_path, name, items, raters_per_item, info), len(items)


def _describe(source: str, adapter: str | None) -> str:
    return f"{source} + adapter {adapter}" if adapter else source


def generate_with_model(model_path: str, adapter: str | None, records: list[PreferenceRecord],
                        max_new_tokens: int = 128, batch_size: int = 4) -> list[str]:
    """Greedy answers of a model (with an optional adapter) to each record's prompt."""
    from vlmrl.eval.run import load_for_eval
    from vlmrl.generate import generate

    model, processor = load_for_eval(model_path, adapter=adapter)
    items = [(record.images, record.prompt) for record in records]
    return generate(model, processor, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
