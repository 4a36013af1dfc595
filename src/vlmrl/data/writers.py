"""Write preference records in any of the formats ``vlmrl.data.formats`` reads (its docstring says what each keeps)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from vlmrl.data.formats import FORMATS, parts_text
from vlmrl.data.records import Message, PreferenceRecord
from vlmrl.errors import VlmrlError


def write_records(records: Iterable[PreferenceRecord], path: str | Path, fmt: str) -> Path:
    """Write records in ``fmt``; JSON formats choose a ``.json`` array or ``.jsonl`` lines by suffix,
    ``hf`` a ``.parquet`` file or (any other name) a ``save_to_disk`` folder."""
    path = Path(path)
    if fmt not in FORMATS:
        raise VlmrlError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    base = os.path.dirname(os.path.abspath(path))
    if fmt == "hf":
        return _write_hf(records, path, base)
    rows = (_WRITERS[fmt](r, [_relative(p, base) for p in r.images]) for r in records)
    if path.suffix == ".json":
        path.write_text(json.dumps(list(rows), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    elif path.suffix in (".jsonl", ".ndjson"):
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        raise VlmrlError(f"{path}: name the output .json (one array) or .jsonl (one record a line)")
    return path


def _relative(image: str, base: str) -> str:
    rel = os.path.relpath(image, base)
    return Path(rel).as_posix() if not rel.startswith("..") else image


def _tagged_prompt(messages: list[Message]) -> str:
    turns = [f"<|{m['role']}|>\n{parts_text(m['content'], ' ')}\n" for m in messages]
    return "".join(turns) + "<|assistant|>\n"


def _write_vlmrl(r: PreferenceRecord, images: list[str]) -> dict:
    return {**r.to_dict(), "images": images}


def _write_seed(r: PreferenceRecord, images: list[str]) -> dict:
    return {"id": r.id, "image_path": images[0] if len(images) == 1 else images,
            "prompt": _tagged_prompt(r.prompt), "chosen": r.chosen, "rejected": r.rejected,
            "metadata": r.metadata}


def _write_trl(r: PreferenceRecord, images: list[str]) -> dict:
    def answer(text: str) -> list[Message]:
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

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


_WRITERS = {"vlmrl": _write_vlmrl, "seed": _write_seed, "trl": _write_trl,
            "llamafactory": _write_llamafactory, "swift": _write_swift}


def _write_hf(records: Iterable[PreferenceRecord], path: Path, base: str) -> Path:
    import datasets

    features = datasets.Features({
        "id": datasets.Value("string"), "images": datasets.List(datasets.Value("string")),
        "prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"), "metadata": datasets.Value("string"),
    })
    rows = [{"id": r.id, "images": [_relative(p, base) for p in r.images],
             "prompt": json.dumps(r.prompt, ensure_ascii=False), "chosen": r.chosen,
             "rejected": r.rejected, "metadata": json.dumps(r.metadata, ensure_ascii=False)}
            for r in records]
    ds = datasets.Dataset.from_list(rows, features=features)
    if path.suffix == ".parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    return path
