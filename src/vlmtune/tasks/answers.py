"""Answer kinds: how each kind of gold answer is written, read back strictly and scored.

A question's ``kind`` names one of :data:`KINDS`:

- ``integer``: "3" (a number word such as "three" is read too); exact match.
- ``verdict``: "more" / "fewer" / "same"; exact match.
- ``compound``: "2 buses, 3 cars: fewer"; pays only when both counts and the verdict are right.
- ``box``: "[x0, y0, x1, y1]" in the record's coordinate convention; score = IoU (IoU² with
  ``iou_power=2``); metrics ``acc@0.5`` and ``iou``.
- ``boxes``: "[[x0, y0, x1, y1], ...]" for every object asked for; score = matched IoU ×
  min(1, n_gold / n_predicted), so listing extra boxes costs (VLM-R1's lesson). Boxes are matched
  one to one, greedily by IoU (the order COCO's evaluation matches in); matched IoU is the sum of
  the matched IoUs over the number of gold boxes.
- ``counts``: the count family's sentence (:mod:`vlmtune.tasks.counting`); exact when every class
  is right. Read strictly: a class stated twice with different numbers reads as nothing.

Parsers read the whole answer block or nothing: "3 or 4", "3, 4" and "more or fewer" are None.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Mapping

from vlmtune.tasks.core import answer_block, iou, over_long
from vlmtune.tasks.counting import NUMBER_WORDS, CountingTask, plural

VERDICTS = ("more", "fewer", "same")
# Number words that can stand alone as an answer ("three", "none"); not "a", "an", "no", "single".
_ANSWER_WORDS = {w: n for w, n in NUMBER_WORDS.items() if w not in ("a", "an", "no", "single")}
_INT = re.compile(r"^\s*(-?\d+|[a-z]+)\s*\.?\s*$", re.IGNORECASE)
_NUM = r"(-?\d+(?:\.\d+)?)"
_BOX = re.compile(rf"\[\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\]")
_PAIR_BOX = re.compile(rf"^\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*,\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)$")
_COMPOUND = re.compile(
    r"^\s*(\d+)\s+([a-z][a-z ]*?)\s*,\s*(\d+)\s+([a-z][a-z ]*?)\s*:\s*(more|fewer|same)\s*\.?\s*$", re.IGNORECASE
)


# ---------------------------------------------------------------------- rendering
def render(kind: str, answer: Any, extra: Mapping[str, Any]) -> str:
    """The canonical text of a gold (or wrong) answer."""
    if kind in ("integer", "verdict"):
        return str(answer)
    if kind == "compound":
        (na, ca), (nb, cb), verdict = answer
        return f"{na} {_noun(ca, na)}, {nb} {_noun(cb, nb)}: {verdict}"
    if kind == "box":
        return "[" + ", ".join(str(int(v)) for v in answer) + "]"
    if kind == "boxes":
        return "[" + ", ".join(render("box", b, extra) for b in answer) + "]"
    if kind == "counts":
        return _counting(tuple(extra["classes"])).render(answer)
    raise ValueError(f"unknown answer kind {kind!r}")


def _noun(cls: str, n: int) -> str:
    return cls if n == 1 else plural(cls)


# ---------------------------------------------------------------------- parsing
def parse(kind: str, text: str, extra: Mapping[str, Any]) -> Any:
    """The answer a block states, or None when it is not exactly one well-formed answer."""
    if kind == "integer":
        m = _INT.match(text)
        if not m:
            return None
        word = m[1].lower()
        return int(word) if word.lstrip("-").isdigit() else _ANSWER_WORDS.get(word)
    if kind == "verdict":
        word = text.strip().rstrip(".").strip().lower()
        return word if word in VERDICTS else None
    if kind == "compound":
        return _parse_compound(text)
    if kind == "box":
        return _parse_box(text.strip())
    if kind == "boxes":
        return _parse_boxes(text.strip())
    if kind == "counts":
        return _parse_counts(text, tuple(extra["classes"]))
    raise ValueError(f"unknown answer kind {kind!r}")


def _parse_compound(text: str):
    m = _COMPOUND.match(text)
    if not m:
        return None
    return [[int(m[1]), _normal(m[2])], [int(m[3]), _normal(m[4])], m[5].lower()]


def _normal(noun: str) -> str:
    """A noun as the compound form wrote it, lower-cased with single spaces (scoring accepts the
    class's singular or plural)."""
    return re.sub(r"\s+", " ", noun.strip().lower())


def _parse_box(text: str):
    m = _BOX.fullmatch(text) or _PAIR_BOX.match(text)
    if not m:
        return None
    box = [float(v) for v in m.groups()]
    return box if box[0] < box[2] and box[1] < box[3] else None


def _parse_boxes(text: str):
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1].strip()
    if not inner:
        return []
    boxes = []
    rest = inner
    while rest:
        m = _BOX.match(rest)
        if not m:
            return None
        box = _parse_box(m[0])
        if box is None:
            return None
        boxes.append(box)
        rest = rest[m.end():].lstrip()
        if rest:
            if not rest.startswith(","):
                return None
            rest = rest[1:].lstrip()
            if not rest:
                return None
    return boxes


@lru_cache(maxsize=64)
def _counting(classes: tuple[str, ...]) -> CountingTask:
    return CountingTask(classes)


def _parse_counts(text: str, classes: tuple[str, ...]):
    task = _counting(classes)
    said: dict[str, set[int]] = {}
    for cls, value in task.mentions(text):
        said.setdefault(cls, set()).add(value)
    if any(len(values) > 1 for values in said.values()) or re.search(r"\bor\b", text, re.IGNORECASE):
        return None
    parsed = task.parse(text)
    return None if parsed.failed else parsed


# ---------------------------------------------------------------------- scoring
def score(kind: str, pred: Any, gold: Any, extra: Mapping[str, Any], iou_power: float = 1.0) -> float:
    """A parsed answer against the gold one, in [0, 1]."""
    if kind == "compound":
        (na, ca), (nb, cb), verdict = gold
        ok = pred[2] == verdict and pred[0][0] == na and pred[1][0] == nb
        return float(ok and _same_noun(pred[0][1], ca) and _same_noun(pred[1][1], cb))
    if kind == "box":
        return iou(pred, gold) ** iou_power
    if kind == "boxes":
        return list_reward(pred, gold)
    if kind == "counts":
        return 1.0 if _counting(tuple(extra["classes"])).score(pred, gold).exact else 0.0
    return float(pred == gold)


def _same_noun(said: str, cls: str) -> bool:
    return said in (cls.lower(), plural(cls).lower())


def matched_iou(pred: list, gold: list) -> float:
    """Sum of one-to-one greedy IoU matches over the number of gold boxes (1.0 when both empty).

    >>> matched_iou([[0, 0, 2, 2]], [[0, 0, 2, 2], [5, 5, 6, 6]])
    0.5
    """
    if not gold:
        return 1.0 if not pred else 0.0
    pairs = sorted(((iou(p, g), i, j) for i, p in enumerate(pred) for j, g in enumerate(gold)), reverse=True)
    used_p, used_g, total = set(), set(), 0.0
    for value, i, j in pairs:
        if value > 0 and i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
            total += value
    return total / len(gold)


def list_reward(pred: list, gold: list) -> float:
    """Matched IoU × min(1, n_gold / n_predicted): a box list pays for finding, not for spamming.

    >>> list_reward([[0, 0, 2, 2], [5, 5, 6, 6], [8, 8, 9, 9], [0, 5, 1, 6]], [[0, 0, 2, 2], [5, 5, 6, 6]])
    0.5
    """
    if not pred:
        return 1.0 if not gold else 0.0
    return matched_iou(pred, gold) * min(1.0, len(gold) / len(pred))


# ---------------------------------------------------------------------- completions
def completion_answer(completion: str, meta: Mapping[str, Any]) -> Any:
    """The parsed answer of a completion for a record's ``metadata.task``, or None."""
    kind, extra = meta["kind"], meta.get("extra") or {}
    block = answer_block(completion, bool(meta.get("think")))
    if not block or over_long(block, render(kind, meta["answer"], extra)):
        return None
    return parse(kind, block, extra)


def score_completion(completion: str, meta: Mapping[str, Any], iou_power: float = 1.0) -> float:
    """The accuracy reward of one completion: 0.0 unless its single answer block parses."""
    pred = completion_answer(completion, meta)
    if pred is None:
        return 0.0
    return score(meta["kind"], pred, meta["answer"], meta.get("extra") or {}, iou_power)


def completion_metrics(completion: str, meta: Mapping[str, Any]) -> dict[str, float]:
    """Per-completion metrics: ``accuracy`` and ``parsed`` always; ``iou`` and ``acc@0.5`` for a
    box; ``count_accuracy`` for a box list; ``class_accuracy`` for counts."""
    kind, extra, gold = meta["kind"], meta.get("extra") or {}, meta["answer"]
    pred = completion_answer(completion, meta)
    value = 0.0 if pred is None else score(kind, pred, gold, extra)
    out = {"parsed": float(pred is not None)}
    if kind == "box":
        out.update({"iou": value, "acc@0.5": float(value >= 0.5), "accuracy": float(value >= 0.5)})
    elif kind == "boxes":
        out.update({"accuracy": value, "count_accuracy": float(pred is not None and len(pred) == len(gold))})
    elif kind == "counts":
        partial = 0.0 if pred is None else _counting(tuple(extra["classes"])).score(pred, gold).class_accuracy
        out.update({"accuracy": value, "class_accuracy": partial})
    else:
        out["accuracy"] = value
    return out


METRICS = {
    "integer": ("accuracy",), "verdict": ("accuracy",), "compound": ("accuracy",),
    "box": ("acc@0.5", "iou"), "boxes": ("accuracy", "count_accuracy"),
    "counts": ("accuracy", "class_accuracy"),
}
KINDS = tuple(METRICS)
