"""Build a study: the data file's records plus both models' answers, into a new SQLite file.

Each side (A, B) is either a ``vlmtune infer`` answers file (JSONL rows ``{"id", "images",
"prompt", "answer", "metadata"}``, matched to records by ``id``) or a model to generate with.
A path is read as an answers file when it is a file whose first row has an ``"answer"`` key;
a folder or a hub name is a model.

Images are served only from the images root (``--images-root``, else the common folder of the
records' images; see ``vlmtune.study.images``): a record whose image lies outside it, links out of
it, is missing or is not an image file is refused here (with ``--skip-bad``: left out and logged),
and the web app checks each image again when asked for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError
from vlmtune.eval.answers import read_answers
from vlmtune.study.db import StudyItem, create_study
from vlmtune.study.images import images_root, resolve_image

log = logging.getLogger(__name__)

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
    """Why one of this record's images cannot be served from ``root``, or None."""
    for image in record.images:
        problem = resolve_image(image, root)[1]
        if problem is not None:
            return problem
    return None


def servable_records(records: list[PreferenceRecord], root: Path, data_path: Path,
                     skip_bad: bool) -> list[PreferenceRecord]:
    """The records whose images all pass ``resolve_image``; a failing one stops, or with skip_bad is logged."""
    kept = []
    for record in records:
        problem = image_problem(record, root)
        if problem is None:
            kept.append(record)
        elif skip_bad:
            log.warning("skipped %s record %r: %s", data_path, record.id, problem)
        else:
            raise VlmtuneError(f"{data_path} record {record.id!r}: {problem}; the study serves only image files "
                             "inside its images root: fix the record or its file, set --images-root to a folder "
                             "that holds it, or pass --skip-bad to leave the record out")
    return kept


def answers_for(source: str, adapter: str | None, records: list[PreferenceRecord],
                generate_answers: Generator, skip_bad: bool, side: str) -> dict[str, str]:
    """One side's answers for the records, from a file or by generating them."""
    if is_answers_file(source):
        if adapter:
            raise VlmtuneError(f"--{side.lower()}-adapter only applies to a model; {source} is an answers file")
        answers = read_answers(source)
        missing = [r.id for r in records if r.id not in answers]
        if missing and not skip_bad:
            raise VlmtuneError(f"{source}: no answer for {len(missing)} record(s), first {missing[0]!r}; "
                             "answer every record of --data (or pass --skip-bad to leave them out)")
        return answers
    if Path(source).is_file():
        raise VlmtuneError(f"{source}: neither a `vlmtune infer` answers file (JSONL rows with \"answer\") "
                         "nor a model folder")
    return dict(zip([r.id for r in records], generate_answers(source, adapter, records)))


def build_study(db_path: str | Path, name: str, data_path: str | Path, a: str, b: str,
                raters_per_item: int = 3, a_adapter: str | None = None, b_adapter: str | None = None,
                skip_bad: bool = False, generate_answers: Generator | None = None,
                images: str | Path | None = None) -> tuple[str, int]:
    """Create the study file; returns (admin token, number of items).

    ``images`` is the images root (``--images-root``); None derives it from the records.
    """
    from vlmtune.data.formats import read_records

    if Path(db_path).exists():
        raise VlmtuneError(f"{db_path} already exists; pick another --db or delete the old study first")
    if raters_per_item < 1:
        raise VlmtuneError(f"--raters-per-item must be at least 1, got {raters_per_item}")
    data_path = Path(data_path)
    records = read_records(data_path, skip_bad=skip_bad)
    root = images_root(records, images, fallback=data_path.resolve().parent)
    records = servable_records(records, root, data_path, skip_bad)
    generate_answers = generate_answers or generate_with_model
    answers_a = answers_for(a, a_adapter, records, generate_answers, skip_bad, "A")
    answers_b = answers_for(b, b_adapter, records, generate_answers, skip_bad, "B")
    items = []
    for record in records:
        if record.id in answers_a and record.id in answers_b:
            items.append(StudyItem(record, answers_a[record.id], answers_b[record.id], category_of(record)))
        else:
            log.warning("skipped %s record %r: no answer from one of the models", data_path, record.id)
    info = {"data": str(data_path.resolve()), "data_root": str(root), "model_a": _describe(a, a_adapter),
            "model_b": _describe(b, b_adapter)}
    return create_study(db_path, name, items, raters_per_item, info), len(items)


def _describe(source: str, adapter: str | None) -> str:
    return f"{source} + adapter {adapter}" if adapter else source


def generate_with_model(model_path: str, adapter: str | None, records: list[PreferenceRecord],
                        max_new_tokens: int = 128, batch_size: int = 4, loader: str = "transformers",
                        trust_remote_code: bool = False) -> list[str]:
    """Greedy answers of a model (with an optional adapter) to each record's prompt. ``loader`` and
    ``trust_remote_code`` as for ``vlmtune.eval.run.load_for_eval`` (the command line's flags)."""
    from vlmtune.eval.run import load_for_eval
    from vlmtune.generate import generate

    log.info("generating answers with %s%s for %d records", model_path, f" + {adapter}" if adapter else "",
             len(records))
    model, processor = load_for_eval(model_path, adapter=adapter, loader=loader, trust_remote_code=trust_remote_code)
    items = [(record.images, record.prompt) for record in records]
    return generate(model, processor, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
