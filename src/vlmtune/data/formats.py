"""Read preference data in the formats of the field, all through `PreferenceRecord` (writers: ``vlmtune.data.writers``).

Formats (names as given to ``--from`` / ``--to``):

- ``vlmtune``: the project's own; one ``PreferenceRecord.to_dict()`` per JSONL line. Keeps everything.
  An unpaired record (for KTO) has ``completion`` and ``label`` (true: desirable) instead of
  ``chosen`` and ``rejected``.
- ``seed``: ``{"image_path", "prompt", "chosen", "rejected"}`` where ``prompt`` is tagged text,
  ``"<|user|>\\nCount the vehicles. <image>\\n<|assistant|>\\n"``. Role tags and ``<image>`` are
  parsed into chat messages (the model's own template is applied later); untagged text is one
  user turn. ``image_path`` is a path or a list of paths.
- ``trl``: TRL's conversational vision preference format: ``images``, ``prompt`` a message list,
  ``chosen`` / ``rejected`` one-message lists ``[{"role": "assistant", "content": [...]}]``; or
  TRL's unpaired preference format (KTO): ``prompt``, ``completion`` (one assistant message) and
  ``label`` (true: desirable), in which ``prompt`` and ``completion`` may also be plain text (TRL's
  standard form; ``<image>`` in the prompt text marks an image).
- ``llamafactory``: LLaMA-Factory's ShareGPT ranking format: ``conversations``
  (``{"from": "human", "value": "<image>..."}``), ``chosen`` / ``rejected`` ``{"from": "gpt",
  "value": ...}``, ``images``, optional ``system``.
- ``swift``: ms-swift's RLHF format: ``messages`` ending with the chosen assistant turn,
  ``rejected_response``, ``images``.
- ``hf``: a ``datasets`` folder (``save_to_disk``) or a ``.parquet`` file with the canonical
  columns; ``prompt`` and ``metadata`` are JSON strings.

What each format keeps. ``vlmtune``, ``trl`` and ``hf`` keep a record exactly. Only ``vlmtune`` and
``trl`` hold unpaired records; the writers of the others refuse them. Where the target
format has no place for them, ``id`` and ``metadata`` travel as extra keys (``"id"``,
``"metadata"``), so every round trip keeps them (LLaMA-Factory and ms-swift ignore extra keys).
The text formats (seed, llamafactory, swift) write ``<image>`` tags into text, so they cannot keep
whitespace at the ends of a text part, nor the boundary between two adjacent text parts (they
become one part). Other keys a row may carry are not read. Images must be file paths (embedded
image bytes are refused with a message). When a prompt has no image slot, its images go first in
the first user turn, as TRL does.

Relative image paths resolve against the data file's folder; records hold absolute paths.
Writers store paths relative to the output's folder when the image lies under it.
JSON writers pick a ``.json`` array or ``.jsonl`` lines by the output suffix.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.data.records import Message, PreferenceRecord, unpaired
from vlmtune.data.text_files import BadText, decode_utf8, parse_json, read_text, require_file, require_path
from vlmtune.errors import VlmtuneError

log = logging.getLogger(__name__)

FORMATS: dict[str, str] = {
    "vlmtune": "id, images, prompt (messages), chosen, rejected (or completion, label), metadata",
    "seed": "image_path, prompt (tagged text), chosen, rejected",
    "trl": "images, prompt, chosen, rejected (message lists), or prompt, completion, label (unpaired)",
    "llamafactory": "conversations, chosen, rejected ({from, value}), images",
    "swift": "messages (last turn = chosen), rejected_response, images",
    "hf": "a datasets folder or .parquet file with id, images, prompt, chosen, rejected, metadata",
}
IMAGE_TAG = "<image>"
_ROLE_TAG = re.compile(r"<\|(system|user|assistant)\|>")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data: where (``file:line`` or ``file[index]``), what, what to do."""

    location: str
    kind: str
    message: str


class _RecordProblem(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


# ---------------------------------------------------------------- detection


def detect_format(path: str | Path) -> str:
    """The format name of a data file or folder, from its first readable record."""
    path = Path(path)
    require_path(path)
    if path.is_dir() or path.suffix == ".parquet":
        return "hf"
    found, unreadable = "it has no JSON record", None
    for _, _, row in _json_rows(path):
        if isinstance(row, Problem):  # detect from the first readable record; the check reports this one
            unreadable = unreadable or row
            continue
        fmt = _format_of_row(row) if isinstance(row, dict) else None
        if fmt:
            return fmt
        found = (f"its first record has keys {sorted(row)}" if isinstance(row, dict)
                 else f"its first record is a JSON {type(row).__name__}, not an object")
        break
    else:
        if unreadable is not None:  # say why no record could be read, not just "no record"
            raise VlmtuneError(f"{unreadable.location}: cannot tell the data format: {unreadable.message}")
    expected = "; ".join(f"{name} ({keys})" for name, keys in FORMATS.items())
    raise VlmtuneError(f"{path}: cannot tell the data format: {found}. Expected one of: {expected}. "
                     f"Pass the format explicitly (--format / --from) if it is one of these.")


def _format_of_row(row: dict[str, Any]) -> str | None:
    if "label" in row and "completion" in row:  # unpaired (KTO): ours has messages and a text answer
        return "vlmtune" if isinstance(row.get("prompt"), list) and isinstance(row["completion"], str) else "trl"
    if "conversations" in row:
        return "llamafactory"
    if "messages" in row or "rejected_response" in row:
        return "swift"
    if "image_path" in row or isinstance(row.get("prompt"), str):
        return "seed"
    if isinstance(row.get("prompt"), list):
        lists = isinstance(row.get("chosen"), list) or isinstance(row.get("completion"), list)
        return "trl" if lists or "image" in row else "vlmtune"
    return None


# ---------------------------------------------------------------- reading


def iter_entries(path: str | Path, fmt: str | None = None
                 ) -> Iterator[tuple[int, str, PreferenceRecord | Problem]]:
    """Every row of the file as ``(index, location, record or problem)``; never raises on bad rows.

    ``index`` is -1 for a problem with the whole file (unknown format, malformed JSON array).
    JSONL is read line by line. `iter_records` and `vlmtune.data.check` are built on this.
    """
    path = Path(path)
    if fmt is None:
        try:
            fmt = detect_format(path)
        except VlmtuneError as e:
            yield -1, str(path), Problem(str(path), "unknown-format", str(e))
            return
    if fmt not in FORMATS:
        raise VlmtuneError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    require_path(path)
    if (fmt == "hf") != (path.is_dir() or path.suffix == ".parquet"):
        raise VlmtuneError(f"{path}: format hf means a datasets folder or a .parquet file, the other "
                         f"formats a .json or .jsonl file; pick the format that fits the path")
    base = os.path.dirname(os.path.abspath(path))
    rows = _hf_rows(path) if fmt == "hf" else _json_rows(path)
    for index, location, row in rows:
        if isinstance(row, Problem):
            yield index, location, row
            continue
        try:
            if not isinstance(row, dict):
                raise _RecordProblem("bad-value", f"a record must be a JSON object, got {type(row).__name__}")
            yield index, location, _PARSERS[fmt](row, base, f"{path.stem}-{index}")
        except _RecordProblem as p:
            yield index, location, Problem(location, p.kind, f"{p.message} [format {fmt}]")


def iter_records(path: str | Path, fmt: str | None = None, skip_bad: bool = False,
                 skipped: list[Problem] | None = None) -> Iterator[PreferenceRecord]:
    """Records of a data file, streamed. Raises VlmtuneError on the first bad row unless ``skip_bad``,
    which skips it, logs a warning saying why and appends it to ``skipped``."""
    for index, location, item in iter_entries(path, fmt):
        if isinstance(item, PreferenceRecord):
            yield item
        elif skip_bad and index >= 0:
            log.warning("skipped %s: %s: %s", location, item.kind, item.message)
            if skipped is not None:
                skipped.append(item)
        else:
            raise VlmtuneError(f"{location}: {item.message} (or pass --skip-bad to skip bad records)")


def read_records(path: str | Path, fmt: str | None = None, skip_bad: bool = False,
                 skipped: list[Problem] | None = None) -> list[PreferenceRecord]:
    return list(iter_records(path, fmt, skip_bad, skipped))


def _json_rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    """Raw rows of a JSON array or JSONL file, malformed ones as Problems."""
    require_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    except OSError as e:
        raise VlmtuneError(f"{path} cannot be read ({e.strerror or e}); check its permissions") from None
    if head.startswith(b"["):
        yield from _json_array_rows(path)
        return
    index = offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            location = f"{path}:{lineno}"
            try:
                row = parse_json(decode_utf8(raw, start))
            except BadText as e:
                row = Problem(location, "malformed-json", f"line {lineno} is {e}; fix or delete the line")
            yield index, location, row
            index += 1


def _json_array_rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    try:
        data = parse_json(read_text(path))
    except VlmtuneError as e:
        message = str(e).removeprefix(f"{path}: ")
        line = re.search(r"\bline (\d+)", message)
        where = f"{path}:{line[1]}" if line else str(path)
        yield -1, where, Problem(where, "malformed-json",
                                 f"the file is {message}; fix it, or write one record per line "
                                 f"(JSONL) so one bad line spoils only itself")
        return
    for index, row in enumerate(data):
        yield index, f"{path}[{index}]", row


def _hf_rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    import datasets
    import pyarrow

    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise VlmtuneError(f"{path}: not a datasets folder written by save_to_disk ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            raise VlmtuneError(f"{path} holds splits {list(ds)}; pass one split's folder, "
                             f"e.g. {path / next(iter(ds))}")
    try:
        if not path.is_dir():
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        for index, row in enumerate(ds):
            yield index, f"{path}[{index}]", row
    except pyarrow.ArrowException as e:
        raise VlmtuneError(f"{path}: cannot read it as Parquet ({e}); is the file complete?") from e


# ---------------------------------------------------------------- row parsers


def _parse_vlmtune(row: dict, base: str, default_id: str) -> PreferenceRecord:
    answers = ("completion", "label") if "label" in row else ("chosen", "rejected")
    _require(row, ("id", "images", "prompt", *answers), "vlmtune")
    prompt = row["prompt"]
    if isinstance(prompt, str):  # hf stores the messages as a JSON string
        try:
            prompt = parse_json(prompt)
        except BadText as e:
            raise _RecordProblem("bad-value", f"'prompt' is not a JSON message list ({e})") from None
    metadata = row.get("metadata")
    if isinstance(metadata, str):
        try:
            metadata = parse_json(metadata)
        except BadText as e:
            raise _RecordProblem("bad-value", f"'metadata' is not a JSON object ({e})") from None
    record_id, images, messages = _id(row, default_id), _images(row["images"], base), _messages(prompt, tags=False)
    if "label" in row:
        return _unpaired_record(record_id, images, messages, _text(row, "completion"), row, metadata)
    return _record(record_id, images, messages, _text(row, "chosen"), _text(row, "rejected"), metadata)


def _parse_seed(row: dict, base: str, default_id: str) -> PreferenceRecord:
    _require(row, ("image_path", "prompt", "chosen", "rejected"), "seed")
    images = _images(row["image_path"], base)
    prompt = _place_images(parse_tagged_prompt(_text(row, "prompt")), len(images))
    return _record(_id(row, default_id), images, prompt, _text(row, "chosen"),
                   _text(row, "rejected"), row.get("metadata"))


def _parse_trl(row: dict, base: str, default_id: str) -> PreferenceRecord:
    _require(row, ("prompt", "completion", "label") if "label" in row else ("prompt", "chosen", "rejected"), "trl")
    images = _images(row.get("images", row.get("image")), base)
    if "label" in row and isinstance(row["prompt"], str):  # TRL's standard (text) unpaired form
        prompt = _place_images(parse_tagged_prompt(row["prompt"]), len(images))
    else:
        prompt = _place_images(_messages(row["prompt"], tags=False), len(images))
    if "label" in row:
        return _unpaired_record(_id(row, default_id), images, prompt, _answer(row, "completion"), row,
                                row.get("metadata"))
    return _record(_id(row, default_id), images, prompt, _answer(row, "chosen"),
                   _answer(row, "rejected"), row.get("metadata"))


def _parse_llamafactory(row: dict, base: str, default_id: str) -> PreferenceRecord:
    _require(row, ("conversations", "chosen", "rejected"), "llamafactory")
    turns = row["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t and "value" in t
                                              for t in turns):
        raise _RecordProblem("bad-value", "'conversations' must be a list of {\"from\", \"value\"} turns")
    messages = []
    for turn in turns:
        role = _SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise _RecordProblem("bad-value", f"unknown speaker {turn['from']!r}; use human, gpt or system")
        messages.append({"role": role, "content": turn["value"]})
    if row.get("system"):
        messages.insert(0, {"role": "system", "content": row["system"]})
    images = _images(row.get("images"), base)
    prompt = _place_images(_messages(messages, tags=True), len(images))
    return _record(_id(row, default_id), images, prompt, _sharegpt_answer(row, "chosen"),
                   _sharegpt_answer(row, "rejected"), row.get("metadata"))


def _parse_swift(row: dict, base: str, default_id: str) -> PreferenceRecord:
    _require(row, ("messages", "rejected_response"), "swift")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
            or messages[-1].get("role") != "assistant":
        raise _RecordProblem("bad-value", "'messages' must end with the chosen assistant turn")
    chosen = parts_text(_parts(messages[-1].get("content"), tags=False), "")
    images = _images(row.get("images"), base)
    prompt = _place_images(_messages(messages[:-1], tags=True), len(images))
    return _record(_id(row, default_id), images, prompt, chosen,
                   _text(row, "rejected_response"), row.get("metadata"))


_PARSERS = {"vlmtune": _parse_vlmtune, "seed": _parse_seed, "trl": _parse_trl,
            "llamafactory": _parse_llamafactory, "swift": _parse_swift, "hf": _parse_vlmtune}


def parse_tagged_prompt(text: str) -> list[Message]:
    """``"<|system|>..<|user|>..<image>..<|assistant|>\\n"`` → chat messages; untagged text is a
    user turn. The trailing empty assistant tag (the generation cue) is dropped."""
    pieces = _ROLE_TAG.split(text)
    if len(pieces) == 1:
        return [{"role": "user", "content": text_to_parts(text)}]
    if pieces[0].strip():
        raise _RecordProblem("bad-prompt", f"prompt has text before its first role tag: "
                             f"{pieces[0].strip()[:60]!r}; start it with <|user|> or drop the tags")
    messages = [{"role": role, "content": text_to_parts(body)}
                for role, body in zip(pieces[1::2], pieces[2::2])]
    if messages[-1]["role"] == "assistant":
        if messages[-1]["content"]:
            raise _RecordProblem("bad-prompt", "prompt ends with assistant text; the answer belongs "
                                 "in chosen / rejected, the prompt should end with <|assistant|>")
        messages.pop()
    return messages


def text_to_parts(text: str) -> list[dict[str, Any]]:
    """``"Count these. <image>"`` → ``[{"type": "text", "text": "Count these."}, {"type": "image"}]``."""
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(text.split(IMAGE_TAG)):
        if i:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def parts_text(parts: list[dict[str, Any]], sep: str) -> str:
    return sep.join(IMAGE_TAG if p["type"] == "image" else p["text"] for p in parts)


def _messages(messages: Any, tags: bool) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise _RecordProblem("bad-value", "the prompt must be a non-empty list of {role, content} messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise _RecordProblem("bad-value", f"bad prompt message {str(m)[:80]}; each needs a role "
                                 "(system, user or assistant) and a content")
        out.append({"role": m["role"], "content": _parts(m.get("content"), tags)})
    return out


def _parts(content: Any, tags: bool) -> list[dict[str, Any]]:
    """Message content (text, or a list of parts) → parts with only ``type`` and ``text``."""
    if isinstance(content, str):
        return text_to_parts(content) if tags else [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _RecordProblem("bad-value", f"message content must be text or a list of parts, "
                             f"got {type(content).__name__}")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise _RecordProblem("bad-value", f"bad content part {str(part)[:80]}; expected "
                                 '{"type": "image"} or {"type": "text", "text": ...}')
    return parts


def _place_images(messages: list[Message], n_images: int) -> list[Message]:
    """With images but no image slot anywhere, the images go first in the first user turn."""
    if n_images == 0 or any(p["type"] == "image" for m in messages for p in m["content"]):
        return messages
    for m in messages:
        if m["role"] == "user":
            m["content"] = [{"type": "image"} for _ in range(n_images)] + m["content"]
            return messages
    raise _RecordProblem("bad-prompt", "the prompt has no user turn to put the images in")


def _images(value: Any, base: str) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise _RecordProblem("bad-value", "images must be a file path or a list of file paths "
                             f"(embedded image bytes are not read), got {str(value)[:80]}")
    return [os.path.normpath(os.path.join(base, os.path.expanduser(v))) for v in values]


def _require(row: dict, keys: tuple[str, ...], fmt: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise _RecordProblem("missing-key", f"missing key(s) {', '.join(missing)}: format {fmt} needs "
                             f"{FORMATS[fmt]}; add them, or pass --format if the format was misread")


def _id(row: dict, default_id: str) -> str:
    value = row.get("id")
    return default_id if value is None or value == "" else str(value)


def _text(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise _RecordProblem("bad-value", f"'{key}' must be text, got {type(value).__name__}")
    return value


def _answer(row: dict, key: str) -> str:
    """A TRL answer: ``[{"role": "assistant", "content": ...}]`` (or plain text)."""
    value = row[key]
    if isinstance(value, str):
        return value
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant"):
        raise _RecordProblem("bad-value", f"'{key}' must be one assistant message, "
                             '[{"role": "assistant", "content": ...}]')
    return parts_text(_parts(value[0].get("content"), tags=False), "")


def _sharegpt_answer(row: dict, key: str) -> str:
    value = row[key]
    if isinstance(value, dict) and isinstance(value.get("value"), str):
        return value["value"]
    if isinstance(value, str):
        return value
    raise _RecordProblem("bad-value", f"'{key}' must be {{\"from\": \"gpt\", \"value\": ...}}")


def _unpaired_record(id_: str, images: list[str], prompt: list[Message], completion: str, row: dict,
                     metadata: Any) -> PreferenceRecord:
    """A record with one answer; ``row["label"]`` must be a JSON boolean (true: desirable)."""
    label = row["label"]
    if not isinstance(label, bool):
        raise _RecordProblem("bad-value", f"'label' must be true (a desirable answer) or false (an undesirable "
                             f"one), got {label!r}")
    checked = _record(id_, images, prompt, "", "", metadata)
    return unpaired(checked.id, images, prompt, completion, label, checked.metadata)


def _record(id_: Any, images: list[str], prompt: list[Message], chosen: str, rejected: str,
            metadata: Any) -> PreferenceRecord:
    if metadata is not None and not isinstance(metadata, dict):
        raise _RecordProblem("bad-value", f"'metadata' must be an object, got {type(metadata).__name__}")
    where = non_finite_key(metadata or {}, "metadata")
    if where:
        raise _RecordProblem("non-finite-number", f"'{where}' is NaN or infinite, which standard JSON "
                             "cannot hold (other tools refuse the file); write null or a finite number")
    return PreferenceRecord(str(id_), images, prompt, chosen, rejected, dict(metadata or {}))


def non_finite_key(value: Any, name: str) -> str | None:
    """The dotted key (under ``name``) of the first NaN or infinite number in ``value``, walked
    without recursion; None when every number is finite.

    >>> non_finite_key({"counts": {"car": 2}, "scores": [0.5, float("nan")]}, "metadata")
    'metadata.scores[1]'
    """
    stack = [(value, name)]
    while stack:
        node, key = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            return key
        if isinstance(node, dict):
            stack.extend((v, f"{key}.{k}" if key else str(k)) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((v, f"{key}[{i}]") for i, v in reversed(list(enumerate(node))))
    return None
