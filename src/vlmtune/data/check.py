"""Every rule a preference record must pass, with the message that says what to do.

`check_records` reads a whole file and reports *all* problems in one pass (``vlmtune data check``);
`scan` is the pass itself, which ``data.load.load_records`` (what training and evaluation call)
runs keeping the good records.

Records with one answer (unpaired, for KTO) pass only when the check is for KTO (``kto=True``:
``data check --for kto``, ``train --algo kto``); otherwise each is an ``unpaired`` problem. Pairs
pass either way (a KTO run splits each into two unpaired records).

Image files are decoded in a pool of worker processes while the records stream by. A truncated
JPEG is only caught by decoding it, so each image is loaded, JPEGs at 1/8 scale (``draft``),
which reads every byte of the file at a fraction of the cost of a full decode.

Images are also held to what the model's image processor accepts. The Qwen-VL processors
(transformers' ``qwen2_vl`` ``smart_resize``, which Qwen2-VL, Qwen2.5-VL and Qwen3-VL share) refuse
an image whose longer side is more than :data:`MAX_ASPECT_RATIO` times its shorter side; they
accept every other size, scaling a small image up to ``min_pixels`` and a large one down to
``max_pixels``. A large image is still decoded at full size on every use before it is scaled
down (121 megapixels hold 363 MB as RGB, and more as the float tensor the processor resizes), so
an image above :data:`LARGE_IMAGE_PIXELS` (4096 x 4096, the largest ``max_pixels`` of the
families, Qwen3-VL's) is a warning: reported, not counted as a bad record.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmtune.data.formats import Problem, detect_format, iter_entries
from vlmtune.data.records import PreferenceRecord
from vlmtune.data.text_files import path_problem, require_path
from vlmtune.errors import VlmtuneError

DEFAULT_MAX_CHARS = 4000
MAX_ASPECT_RATIO = 200
LARGE_IMAGE_PIXELS = 4096 * 4096
PROBLEM_KINDS = {
    "unknown-format": "the file's format could not be told",
    "malformed-json": "a line or file that is not valid JSON",
    "missing-key": "a record lacks a key its format needs",
    "bad-value": "a key holds the wrong type of value",
    "bad-prompt": "a prompt whose role tags cannot be read",
    "missing-image": "an image file that does not exist",
    "unreadable-image": "an image file that is not an image, or is truncated or corrupt",
    "image-shape": f"an image the model's processor refuses (aspect ratio above {MAX_ASPECT_RATIO})",
    "image-count": "image slots in the prompt differ from the images listed",
    "empty-answer": "chosen or rejected (an unpaired record's completion) is empty",
    "unpaired": "a record with one answer (completion, label), outside a check for KTO",
    "same-answers": "chosen and rejected are the same text",
    "duplicate-id": "an id used by an earlier record",
    "duplicate-content": "the same images, prompt, chosen and rejected as an earlier record",
    "too-long": "a text longer than --max-chars",
    "literal-tag": "a prompt text that still holds <image> or a role tag",
    "non-finite-number": "NaN or Infinity in metadata, which standard JSON cannot hold",
}
WARNING_KINDS = {
    "large-image": f"an image above {LARGE_IMAGE_PIXELS:,} pixels: usable, but slow and memory-hungry",
}
_LITERAL_TAGS = ("<image>", "<|user|>", "<|assistant|>", "<|system|>")
_POOL_MIN_IMAGES = 256  # below this, starting worker processes costs more than it saves
_CHUNK = 256
_SHOWN = 20


@dataclass
class CheckReport:
    path: str
    format: str | None
    records_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    bad_records: int = 0
    warnings: list[Problem] = field(default_factory=list)  # WARNING_KINDS: reported, records kept

    @property
    def ok_records(self) -> int:
        return self.records_read - self.bad_records

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems).most_common())

    def warning_counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.warnings).most_common())

    def to_dict(self) -> dict:
        def rows(problems: list[Problem]) -> list[dict]:
            return [{"location": p.location, "kind": p.kind, "message": p.message} for p in problems]

        return {"path": self.path, "format": self.format, "records_read": self.records_read,
                "ok_records": self.ok_records, "bad_records": self.bad_records,
                "counts": self.counts(), "problems": rows(self.problems),
                "warning_counts": self.warning_counts(), "warnings": rows(self.warnings)}


def check_records(path: str | Path, fmt: str | None = None, max_chars: int = DEFAULT_MAX_CHARS,
                  check_images: bool = True, workers: int = 2, kto: bool = False) -> CheckReport:
    """Read every record of ``path`` and report all problems (see PROBLEM_KINDS); ``kto``: unpaired
    records are allowed."""
    report, _, _ = scan(path, fmt, max_chars, check_images, workers, keep=False, kto=kto)
    return report


def problem_lines(problems: list[Problem], shown: int = _SHOWN) -> str:
    lines = [f"  {p.location}: {p.kind}: {p.message}" for p in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more")
    return "\n".join(lines)


def image_problem(path: str) -> tuple[str, str] | None:
    """``(kind, message)`` when the image at ``path`` cannot be used, or is a warning's size
    (``large-image``); None when it decodes and fits the processor."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # reported as large-image
            with Image.open(path) as im:
                width, height = im.size
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))  # JPEG only
                im.load()
    except FileNotFoundError:
        return "missing-image", f"image file not found: {path}"
    except UnidentifiedImageError:
        return "unreadable-image", f"{path} is not an image file PIL can read; replace it or drop the record"
    except Image.DecompressionBombError as e:
        return "unreadable-image", (f"{path} is too large for PIL to open ({e}); downscale it "
                                    "or drop the record")
    except (OSError, SyntaxError, ValueError) as e:
        return "unreadable-image", f"{path} is truncated or corrupt ({e}); replace it or drop the record"
    return shape_problem(path, width, height)


def shape_problem(path: str, width: int, height: int) -> tuple[str, str] | None:
    """``image-shape`` when the Qwen-VL processors refuse a ``width`` x ``height`` image,
    ``large-image`` when it is usable but above LARGE_IMAGE_PIXELS, else None.

    >>> shape_problem("a.png", 2, 600)[0], shape_problem("a.png", 2, 400), shape_problem("a.png", 5000, 4000)[0]
    ('image-shape', None, 'large-image')
    """
    if min(width, height) < 1:
        return "image-shape", f"{path} is {width}x{height} pixels: it has no pixels; replace it or drop the record"
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        return "image-shape", (
            f"{path} is {width}x{height} pixels, an aspect ratio of {ratio:.0f}:1; the Qwen-VL image "
            f"processors refuse images whose longer side is more than {MAX_ASPECT_RATIO} times the "
            "shorter; crop or pad it, or drop the record")
    if width * height > LARGE_IMAGE_PIXELS:
        return "large-image", (
            f"{path} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels): the processor "
            f"scales it down, but it is decoded at full size on every use ({width * height * 3 / 2**20:.0f} "
            f"MiB as RGB, several times that while resized); downscale it to at most 4096x4096 "
            "beforehand to train faster and in less memory")
    return None


def _image_problems(paths: list[str]) -> list[tuple[str, str] | None]:
    return [image_problem(p) for p in paths]


class _ImageChecker:
    """Decodes each distinct image once, in worker processes when there are many."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pending: list[str] = []
        self.users: dict[str, list[int]] = {}  # image -> positions of the records that use it
        self.futures: list[tuple[list[str], Future]] = []
        self.pool: ProcessPoolExecutor | None = None

    def add(self, image: str, position: int) -> None:
        if image not in self.users:
            self.users[image] = []
            self.pending.append(image)
            if len(self.pending) >= _CHUNK and len(self.users) >= _POOL_MIN_IMAGES:
                self._submit()
        self.users[image].append(position)

    def _submit(self) -> None:
        if self.workers <= 1:
            return  # decoded in this process at the end
        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=self.workers)
        chunk, self.pending = self.pending, []
        self.futures.append((chunk, self.pool.submit(_image_problems, chunk)))

    def problems(self) -> list[tuple[int, str, str]]:
        """``(record position, kind, message)`` for every record using a bad or large image."""
        results: list[tuple[str, tuple[str, str] | None]] = []
        try:
            if self.pool is not None:
                self._submit()
            for chunk, future in self.futures:
                results.extend(zip(chunk, future.result()))
        finally:
            if self.pool is not None:
                self.pool.shutdown()
        results.extend((p, image_problem(p)) for p in self.pending)
        return [(pos, *found) for image, found in results if found for pos in self.users[image]]


def scan(path: str | Path, fmt: str | None, max_chars: int, check_images: bool, workers: int,
         keep: bool, kto: bool = False) -> tuple[CheckReport, list[PreferenceRecord], bool]:
    """The report, the clean records (when ``keep``), and whether the whole file is unreadable."""
    require_path(path)
    if fmt is None:
        try:
            fmt = detect_format(path)
        except VlmtuneError as e:
            problem = Problem(str(path), "unknown-format", str(e).removeprefix(f"{path}: "))
            return CheckReport(str(path), None, problems=[problem]), [], True
    report = CheckReport(str(path), fmt)
    found: list[tuple[int, Problem]] = []  # (record position, problem), position -1 = whole file
    records: list[PreferenceRecord | None] = []
    locations: list[str] = []
    seen_ids: dict[str, str] = {}
    seen_content: dict[str, str] = {}
    images = _ImageChecker(workers)
    for index, location, item in iter_entries(path, fmt):
        if index < 0:
            found.append((-1, item))
            continue
        position = len(locations)
        locations.append(location)
        records.append(item if keep and isinstance(item, PreferenceRecord) else None)
        if isinstance(item, Problem):
            found.append((position, item))
            continue
        for kind, message in _record_problems(item, max_chars, location, seen_ids, seen_content, kto):
            found.append((position, Problem(location, kind, message)))
        for image in item.images:
            if not os.path.isfile(image):
                found.append((position, Problem(location, "missing-image", _missing_image(image))))
            elif check_images:
                images.add(image, position)
    if check_images:
        found.extend((pos, Problem(locations[pos], kind, msg)) for pos, kind, msg in images.problems())
    found.sort(key=lambda pair: pair[0])
    report.warnings = [p for _, p in found if p.kind in WARNING_KINDS]
    found = [(pos, p) for pos, p in found if p.kind not in WARNING_KINDS]
    bad = {pos for pos, _ in found if pos >= 0}
    report.problems = [p for _, p in found]
    report.records_read = len(locations)
    report.bad_records = len(bad)
    clean = [r for pos, r in enumerate(records) if r is not None and pos not in bad]
    return report, clean, any(pos < 0 for pos, _ in found)


def _missing_image(image: str) -> str:
    """Why an image path is not a file: missing, a looping or broken link, a folder."""
    why = path_problem(image)
    if why is None:
        return f"{image} is a folder, not an image file; fix the path or drop the record"
    if why.endswith("check the path"):
        return (f"image file not found: {image} (relative paths resolve against the data file's "
                "folder); fix the path or drop the record")
    return f"{why} (or drop the record)"


def _record_problems(r: PreferenceRecord, max_chars: int, location: str, seen_ids: dict[str, str],
                     seen_content: dict[str, str], kto: bool = False) -> list[tuple[str, str]]:
    out = []
    slots = r.image_slots()
    if slots != len(r.images):
        out.append(("image-count", f"the prompt has {slots} image slot(s) but the record lists "
                    f"{len(r.images)} image(s); make them match"))
    out.extend(_unpaired_problems(r, kto) if r.is_unpaired else _pair_problems(r))
    texts = [p["text"] for m in r.prompt for p in m["content"] if p.get("type") == "text"]
    tags = sorted({tag for tag in _LITERAL_TAGS for t in texts if tag in t})
    if tags:
        out.append(("literal-tag", f"the prompt text holds the literal tag(s) {', '.join(tags)}, "
                    "which a model would read as plain text; use image parts and chat messages "
                    "(or the seed format, whose tags are parsed)"))
    answers = [("completion", r.answer)] if r.is_unpaired else [("chosen", r.chosen), ("rejected", r.rejected)]
    for name, text in [("prompt", r.prompt_text()), *answers]:
        if len(text) > max_chars:
            out.append(("too-long", f"'{name}' is {len(text)} characters (limit {max_chars}); "
                        "shorten it or raise --max-chars"))
    if r.id in seen_ids:
        out.append(("duplicate-id", f"id {r.id!r} is already used at {seen_ids[r.id]}; "
                    "give each record its own id"))
    else:
        seen_ids[r.id] = location
    key = r.content_key()
    if key in seen_content:
        what = "completion and label" if r.is_unpaired else "chosen and rejected"
        out.append(("duplicate-content", f"same images, prompt, {what} as "
                    f"{seen_content[key]}; drop one of them"))
    else:
        seen_content[key] = location
    return out


def _pair_problems(r: PreferenceRecord) -> list[tuple[str, str]]:
    out = []
    for name in ("chosen", "rejected"):
        if not getattr(r, name).strip():
            out.append(("empty-answer", f"'{name}' is empty; write the answer or drop the record"))
    if r.chosen.strip() and r.chosen.strip() == r.rejected.strip():
        out.append(("same-answers", "chosen and rejected are the same text, so the pair teaches "
                    "nothing; make rejected differ or drop the record"))
    return out


def _unpaired_problems(r: PreferenceRecord, kto: bool) -> list[tuple[str, str]]:
    out = []
    if not kto:
        out.append(("unpaired", f"record {r.id} has one answer (unpaired); unpaired records train only with "
                    "--algo kto (check them with `vlmtune data check --for kto`)"))
    if not r.answer.strip():
        out.append(("empty-answer", "'completion' is empty; write the answer or drop the record"))
    return out
