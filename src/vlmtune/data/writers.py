"""Write preference records in any of the formats ``vlmtune.data.formats`` reads (its docstring says what each keeps).

Only standard JSON is written: a record holding NaN or an infinite number (which Python's ``json``
would write as the non-standard ``NaN`` / ``Infinity``) is refused with a message naming it.
Unpaired records (one answer and a label, for KTO) are written by ``vlmtune`` and ``trl`` only: the
other formats have no place for a label, so their writers refuse them with a message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from vlmtune.data.formats import FORMATS, non_finite_key, parts_text
from vlmtune.data.records import Message, PreferenceRecord
from vlmtune.errors import VlmtuneError

UNPAIRED_FORMATS = ("vlmtune", "trl")  # the formats with a place for an unpaired record's label


def write_records(records: Iterable[PreferenceRecord], path: str | Path, fmt: str) -> Path:
    """Write records in ``fmt``; JSON formats choose a ``.json`` array or ``.jsonl`` lines by suffix,
    ``hf`` a ``.parquet`` file or (any other name) a ``save_to_disk`` folder."""
    path = Path(path)
    if fmt not in FORMATS:
        raise VlmtuneError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    base = os.path.dirname(os.path.abspath(path))
    if fmt not in UNPAIRED_FORMATS:
        records = (_paired(r, fmt) for r in records)
    if fmt == "hf":
        return _write_hf(records, path, base)
    rows = ((r.id, _WRITERS[fmt](r, [_relative(p, base) for p in r.images])) for r in records)
    if path.suffix == ".json":
        # One row at a time, indented as json.dumps(rows, indent=1) would, so a bad row is named.
        texts = [_json(row, id_, indent=1).replace("\n", "\n ") for id_, row in rows]
        body = "[\n " + ",\n ".join(texts) + "\n]" if texts else "[]"
        path.write_text(body + "\n", encoding="utf-8")
    elif path.suffix in (".jsonl", ".ndjson"):
        with open(path, "w", encoding="utf-8") as f:
            for id_, row in rows:
                f.write(_json(row, id_) + "\n")
    else:
        raise VlmtuneError(f"{path}: name the output .json (one array) or .jsonl (one record a line)")
    return path


def _paired(record: PreferenceRecord, fmt: str) -> PreferenceRecord:
    if record.is_unpaired:
        raise VlmtuneError(f"record {record.id} has one answer (unpaired), which format {fmt} cannot hold (it "
                         f"holds pairs); write unpaired records as {' or '.join(UNPAIRED_FORMATS)}")
    return record


def _json(value, record_id: str, indent: int | None = None, name: str = "") -> str:
    """Standard JSON text of ``value`` (the record's key ``name``, or its row); VlmtuneError naming the
    record and key for NaN or Infinity."""
    try:
        return json.dumps(value, ensure_ascii=False, indent=indent, allow_nan=False)
    except ValueError:
        where = non_finite_key(value, name) or "a value"
        raise VlmtuneError(f"record {record_id}: {where} is NaN or infinite, which standard JSON cannot "
                         "hold; write null or a finite number there before saving") from None


def _relative(image: str, base: str) -> str:
    rel = os.path.relpath(image, base)
    return Path(rel).as_posix() if not rel.startswith("..") else image


def _tagged_prompt(messages: list[Message]) -> str:
    turns = [f"<|{m['role']}|>\n{parts_text(m['content'], ' ')}\n" for m in messages]
    return "".join(turns) + "<|assistant|>\n"


def _write_vlmtune(r: PreferenceRecord, images: list[str]) -> dict:
    return {**r.to_dict(), "images": images}


def _write_seed(r: PreferenceRecord, images: list[str]) -> dict:
    return {"id": r.id, "image_path": images[0] if len(images) == 1 else images,
            "prompt": _tagged_prompt(r.prompt), "chosen": r.chosen, "rejected": r.rejected,
            "metadata": r.metadata}


def _write_trl(r: PreferenceRecord, images: list[str]) -> dict:
    def answer(text: str) -> list[Message]:
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

    if r.is_unpaired:  # TRL's unpaired preference format, as its KTOTrainer reads it
        return {"id": r.id, "images": images, "prompt": r.prompt, "completion": answer(r.answer),
                "label": r.label, "metadata": r.metadata}
    return {"id": r.id, "images": images, "prompt": r.prompt, "chosen": answer(r.chosen),
            "rejected": answer(r.rejected), "metadata": r.metadata}


def _write_llamafactory(r: PreferenceRecord, images: list[str]) -> dict:
    messages, row = r.prompt, {"id": r.id}
    if messages and messages[0]["role"] == "system":
        row["system"] = parts_text(messages[0]["content"], "")
        messages = messages[1:]
    speaker = {"user": "human", "assistant": "gpt", "system": "system"}
    row["conversations"] = [{"from": speaker[m["role"]], "value": parts_text(m["content"], "")}
                            for m in messages]
    row.update(chosen={"from": "gpt", "value": r.chosen}, rejected={"from": "gpt", "value": r.rejected},
               images=images, metadata=r.metadata)
    return row


def _write_swift(r: PreferenceRecord, images: list[str]) -> dict:
    messages = [{"role": m["role"], "content": parts_text(m["content"], "")} for m in r.prompt]
    messages.append({"role": "assistant", "content": r.chosen})
    return {"id": r.id, "messages": messages, "rejected_response": r.rejected, "images": images,
            "metadata": r.metadata}


_WRITERS = {"vlmtune": _write_vlmtune, "seed": _write_seed, "trl": _write_trl,
            "llamafactory": _write_llamafactory, "swift": _write_swift}


def _write_hf(records: Iterable[PreferenceRecord], path: Path, base: str) -> Path:
    import datasets

    features = datasets.Features({
        "id": datasets.Value("string"), "images": datasets.List(datasets.Value("string")),
        "prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"), "metadata": datasets.Value("string"),
    })
    rows = [{"id": r.id, "images": [_relative(p, base) for p in r.images],
             "prompt": _json(r.prompt, r.id, name="prompt"), "chosen": r.chosen,
             "rejected": r.rejected, "metadata": _json(r.metadata, r.id, name="metadata")}
            for r in records]
    ds = datasets.Dataset.from_list(rows, features=features)
    if path.suffix == ".parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    return path
