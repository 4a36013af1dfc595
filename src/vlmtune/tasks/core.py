"""The shared core of every task: the scene model, the task protocol, strict answer blocks, IoU.

A *scene* is an image and its objects (class, box in pixels, colour, size; colour and size are
None when unknown, e.g. for detection labels). A *task family* poses questions about a scene as
small programs (:mod:`vlmtune.tasks.programs`), runs them for the gold answer and its execution
trace, and writes a record whose ``metadata.task`` says everything needed to score it later::

    {"family": "spatial", "kind": "integer", "question": "How many cars are left of the bus?",
     "program": [...], "answer": 2, "hops": 3, "phrasing": 0, "think": false, ...}

Scoring a completion (:func:`score_completion`) is the same for every family:

1. :func:`answer_block` takes the single answer block, strictly. With tags, the completion must be
   exactly ``<think>…</think><answer>…</answer>`` (the think block optional), one of each tag, and
   nothing outside them; without tags, the whole completion is the answer, but only for records
   built without ``--think``. Text inside ``<think>`` is never read.
2. An answer longer than ``2 × len(gold answer) + 16`` characters is not read: an essay or a
   spammed list that happens to contain the answer pays nothing.
3. The family's answer kind (:mod:`vlmtune.tasks.answers`) parses the block (the whole block must
   be one well-formed answer, never a substring) and scores it against the gold answer.

:func:`task_of` returns the task of a record from ``metadata.task.family`` (a built-in family or
a user's ``package.module:Class``), and counting for today's records that carry only
``metadata.counts``.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from vlmtune.errors import VlmtuneError

THINK_INSTRUCTION = (
    "Think step by step inside <think></think>, then give only the final answer inside <answer></answer>."
)
_TAG = re.compile(r"</?(think|answer)>", re.IGNORECASE)
_BLOCKS = re.compile(
    r"^\s*(?:<think>(?P<think>.*?)</think>\s*)?<answer>(?P<answer>.*?)</answer>\s*$", re.DOTALL | re.IGNORECASE
)


# ---------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Obj:
    """One object: class name, box ``(x0, y0, x1, y1)`` in pixels, colour and size (or None)."""

    cls: str
    box: tuple[float, float, float, float]
    colour: str | None = None
    size: str | None = None

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass(frozen=True)
class Scene:
    """An image and its objects. ``source`` names the source photo (the unit of the split)."""

    image: str
    width: int
    height: int
    objects: tuple[Obj, ...]
    source: str
    classes: tuple[str, ...]
    rel: str = ""  # the image path relative to the data set root, for record ids

    def describe(self, i: int) -> str:
        """'the red car at (40, 52)': how a reasoning chain names object ``i``."""
        o = self.objects[i]
        words = " ".join(w for w in (o.size, o.colour, o.cls) if w)
        x, y = o.centre
        return f"the {words} at ({round(x)}, {round(y)})"


# ---------------------------------------------------------------------- questions and the protocol
@dataclass
class Question:
    """A question about a scene with its program, gold answer and execution trace."""

    family: str
    kind: str  # the answer kind: integer, verdict, compound, box, boxes, counts
    text: str
    program: list[dict]
    answer: Any
    hops: int
    trace: list[str]
    phrasing: int = 0  # which template of the family wrote ``text``
    extra: dict = field(default_factory=dict)  # what the answer kind needs beyond the answer


@dataclass
class Negative:
    """A wrong answer: the answer a named reasoning slip gives, and its trace when it has one."""

    slip: str
    answer: Any
    trace: list[str] | None = None


class Task(Protocol):
    """What a task family provides. ``meta`` is a record's ``metadata.task``."""

    family: str
    metric_names: tuple[str, ...]

    def questions(self, scene: Scene, rng) -> list[Question]: ...

    def negatives(self, question: Question, scene: Scene) -> list[Negative]: ...

    def score(self, completion: str, meta: Mapping[str, Any], iou_power: float = 1.0) -> float: ...

    def metrics(self, completion: str, meta: Mapping[str, Any]) -> dict[str, float]: ...


# ---------------------------------------------------------------------- answers in completions
def answer_block(completion: str, think: bool) -> str | None:
    """The single answer block of a completion, or None when there is not exactly one.

    >>> answer_block("<think>2 cars, then 1 more</think><answer>3</answer>", think=True)
    '3'
    >>> answer_block("3", think=False), answer_block("3", think=True)
    ('3', None)
    >>> answer_block("<answer>3</answer><answer>4</answer>", think=False) is None
    True
    """
    text = completion or ""
    tags = [t.lower() for t in _TAG.findall(text)]
    if not tags:
        return None if think else text.strip()
    m = _BLOCKS.match(text)
    if m is None or len(tags) != (4 if m["think"] is not None else 2):
        return None
    return m["answer"].strip()


def format_ok(completion: str, think: bool) -> bool:
    """Whether the completion has the expected shape (the format reward's test, not accuracy)."""
    block = answer_block(completion, think)
    if not block:
        return False
    if think:
        m = _BLOCKS.match(completion)
        return bool(m["think"] and m["think"].strip())
    return True


def render_completion(answer: str, trace: list[str] | None, think: bool) -> str:
    """The gold completion: the answer alone, or the trace as reasoning then the answer block."""
    if not think:
        return answer
    return f"<think>{' '.join(trace or [])}</think><answer>{answer}</answer>"


def over_long(block: str, gold_text: str) -> bool:
    """An answer far longer than the gold one is not read (see the module docstring, point 2)."""
    return len(block) > 2 * len(gold_text) + 16


# ---------------------------------------------------------------------- boxes
def iou(a, b) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes.

    >>> iou((0, 0, 2, 2), (1, 0, 3, 2))
    0.3333333333333333
    """
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions) between two strings.

    >>> edit_distance("3", "13"), edit_distance("more", "fewer")
    (1, 4)
    """
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


# ---------------------------------------------------------------------- which task
def load_task(name: str) -> Task:
    """A user's task from ``package.module:Class`` (instantiated without arguments)."""
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise VlmtuneError(f"task {name!r}: name a built-in family or a class as package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise VlmtuneError(f"task {name!r}: cannot import module {module_name!r}: {e}") from e
    cls = vars(module).get(attribute)
    if not isinstance(cls, type):
        raise VlmtuneError(f"task {name!r}: module {module_name!r} has no class {attribute!r}")
    return cls()


def task_of(metadata: Mapping[str, Any]) -> Task:
    """The task of a record, from its ``metadata``.

    ``metadata.task.family`` names a built-in family or a ``package.module:Class``; a record
    without ``task`` but with ``counts`` (every counting record written before tasks existed) is
    the count family's.
    """
    from vlmtune.tasks.families import FAMILIES

    meta = metadata.get("task")
    if isinstance(meta, Mapping) and meta.get("family"):
        family = str(meta["family"])
        if family in FAMILIES:
            return FAMILIES[family]
        if ":" in family:
            return load_task(family)
        raise VlmtuneError(f"unknown task family {family!r}; the families are {', '.join(FAMILIES)}")
    if isinstance(metadata.get("counts"), Mapping):
        return FAMILIES["count"]
    raise VlmtuneError("the record's metadata has neither 'task' nor 'counts': its task is unknown")


def task_meta(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata.task``, or for a legacy counting record the equivalent count-family entry."""
    meta = metadata.get("task")
    if isinstance(meta, Mapping):
        return dict(meta)
    counts = dict(metadata.get("counts") or {})
    return {"family": "count", "kind": "counts", "answer": counts, "hops": 1, "think": False,
            "extra": {"classes": list(counts)}}
