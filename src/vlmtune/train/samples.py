"""Samples while training (``train.sample_every``): the model's greedy answers to a fixed set of held-out items.

Every ``train.sample_every`` steps, and once at the end, the loop answers the same
``train.sample_count`` items (the first of ``data.eval``, else of ``data.train``) and hands the answers
here. Each item becomes one row of ``OUTPUT/training_samples.jsonl``: ``step``, ``id``, ``image`` (first
image path), ``prompt`` (text), ``answer``, ``gold`` (the task's gold answer, else the chosen one),
``family`` (the task family, None without a task), ``reward`` (the task's score, None without a task)
and ``correct`` (full marks, None without a task). ``OUTPUT/samples.html`` is then rewritten from the
whole file (``samples_html``), and TensorBoard gets the step's rows as a markdown table (``samples``)
and, on the first write, the items' images (``samples/images``).

On resume the rows after the checkpoint's step are dropped first, so the page keeps every earlier step
and shows none that the resumed run will redo. Only the main process writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError
from vlmtune.jsonl import read_jsonl

ROWS_FILE = "training_samples.jsonl"
PAGE_FILE = "samples.html"
COLUMNS = ("id", "answer", "gold", "reward")


def fixed_items(eval_records: list, train_records: list, count: int) -> list:
    """The items a run samples: the first ``count`` of the held-out records, else of the training ones."""
    return list((eval_records or train_records)[:count])


def sample_rows(step: int, records: list, answers: list[str]) -> list[dict[str, Any]]:
    """One row per record: its answer at ``step``, the gold answer and the task's score of the answer."""
    return [_row(step, record, answer) for record, answer in zip(records, answers, strict=True)]


def _row(step: int, record, answer: str) -> dict[str, Any]:
    from vlmtune.eval.tasks import gold_text, has_task
    from vlmtune.tasks.core import task_meta, task_of

    row = {"step": step, "id": record.id, "image": record.images[0] if record.images else None,
           "prompt": record.prompt_text(), "answer": answer, "gold": record.chosen,
           "family": None, "reward": None, "correct": None}
    if has_task(record.metadata):
        meta = task_meta(record.metadata)
        reward = float(task_of(record.metadata).score(answer, meta))
        row.update(gold=gold_text(meta) or record.chosen, family=meta.get("family"), reward=reward,
                   correct=reward >= 1.0)
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (TensorBoard's text tab renders it): id, answer, gold, reward.

    >>> print(markdown_table([{"id": "a", "answer": "2 | 3", "gold": "2", "reward": 0.5}]))
    | id | answer | gold | reward |
    |---|---|---|---|
    | a | 2 \\| 3 | 2 | 0.50 |
    """
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_cell(row["id"]), _cell(row["answer"]), _cell(row["gold"]),
                 "–" if row["reward"] is None else f"{row['reward']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(text: Any) -> str:
    """A table cell: one line, its pipes escaped, so model output cannot break the table."""
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


def latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the last sampling step."""
    last = max((row["step"] for row in rows), default=None)
    return [row for row in rows if row["step"] == last]


def read_sample_rows(path: Path) -> list[dict[str, Any]]:
    """``training_samples.jsonl``'s rows in file order; a row without step, id or answer is an error."""
    rows = []
    for line_no, row in read_jsonl(path):
        if not isinstance(row.get("step"), int) or "id" not in row or not isinstance(row.get("answer"), str):
            raise VlmtuneError(f"{path}, line {line_no}: not a training sample (step, id and answer are needed); "
                             "it is written by `vlmtune train` with train.sample_every: delete it or rerun")
        rows.append(row)
    return rows


class SampleLog:
    """Appends each sampling step to ``training_samples.jsonl`` and rewrites ``samples.html`` from it."""

    def __init__(self, run_dir: Path, start_step: int):
        self.rows_path = Path(run_dir) / ROWS_FILE
        self.page_path = Path(run_dir) / PAGE_FILE
        self.rows = read_sample_rows(self.rows_path) if self.rows_path.is_file() else []
        kept = [row for row in self.rows if row["step"] <= start_step]  # a resumed run redoes the later steps
        if len(kept) != len(self.rows):
            self.rows = kept
            self._write_rows()

    @property
    def images_logged(self) -> bool:
        """Whether an earlier part of this run (before a resume) already sent the images to TensorBoard."""
        return bool(self.rows)

    def add(self, rows: list[dict[str, Any]], title: str) -> None:
        """Keep one step's rows and rewrite the page, newest step first."""
        from vlmtune.train.checkpoint import naming_unwritable
        from vlmtune.train.samples_html import samples_page

        self.rows += rows
        self._write_rows()
        with naming_unwritable(self.page_path, self.page_path.parent):
            self.page_path.write_text(samples_page(self.rows, title), encoding="utf-8")

    def _write_rows(self) -> None:
        import json

        from vlmtune.train.checkpoint import naming_unwritable  # torch: not for the report, which only reads

        text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in self.rows)
        with naming_unwritable(self.rows_path, self.rows_path.parent):
            self.rows_path.write_text(text, encoding="utf-8")
