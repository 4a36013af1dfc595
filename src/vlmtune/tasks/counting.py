"""The counting task's whole grammar: which classes, how an answer is written, read back and scored.

The pair builder (``data/pairs.py``), the evaluator and the RL rewards all call this module, so
they cannot disagree about what an answer says. The canonical answer names every class, in the
task's order, zeros included::

    There are 2 cars, 3 motorcycles, 0 buses, 1 bicycle in the image.

``parse`` reads counts back from free text ("7 cars and 1 truck", "two buses", "a bicycle",
"no motorcycles", "There are 7 vehicles", the seed's "0 buss") and tells a class that is *not
mentioned* (``None``) from one said to be zero (``0``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

DEFAULT_CLASSES = ("car", "motorcycle", "bus", "bicycle")

# Plurals that the English suffix rules below get wrong.
IRREGULAR_PLURALS = {
    "person": "people",
    "child": "children",
    "man": "men",
    "woman": "women",
    "bus": "buses",
    "minibus": "minibuses",
    "trolleybus": "trolleybuses",
    "bench": "benches",
    "ox": "oxen",
    "mouse": "mice",
    "sheep": "sheep",
    "fish": "fish",
}

# Other words people use for a class; used only when the target class is one of the task's.
DEFAULT_SYNONYMS = {
    "motorbike": "motorcycle",
    "motor bike": "motorcycle",
    "automobile": "car",
    "bike": "bicycle",
    "pedestrian": "person",
}

# Words that name every object at once: "There are 7 vehicles" states a total only.
TOTAL_NOUNS = ("vehicle", "object", "item")

NUMBER_WORDS = {
    "no": 0, "zero": 0, "none": 0, "a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3,
    "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11,
    "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
}

# Words allowed between a number and its noun ("2 red cars", "three small yellow buses").
# Words that end a phrase ("of", "and", ...) or are numbers themselves are not.
_FILLER_STOP = {"of", "and", "or", "nor", "but", "with", "in", "on", "at", "the", "is", "are"}


def plural(word: str) -> str:
    """English plural of a class name: irregulars first, then the suffix rules.

    >>> [plural(w) for w in ("car", "bus", "person", "ambulance", "motorbike", "truck", "lorry")]
    ['cars', 'buses', 'people', 'ambulances', 'motorbikes', 'trucks', 'lorries']
    """
    head, _, last = word.rpartition(" ")
    prefix = f"{head} " if head else ""
    lower = last.lower()
    if lower in IRREGULAR_PLURALS:
        return prefix + IRREGULAR_PLURALS[lower]
    if re.search(r"(s|x|z|ch|sh)$", lower):
        return prefix + last + "es"
    if re.search(r"[^aeiou]y$", lower):
        return prefix + last[:-1] + "ies"
    return prefix + last + "s"


@dataclass(frozen=True)
class ParsedCounts:
    """What an answer says: per-class counts (``None`` = class not mentioned) and a stated total."""

    counts: dict[str, int | None]
    total: int | None = None

    @property
    def failed(self) -> bool:
        """Nothing countable was found: no class and no total."""
        return self.total is None and all(v is None for v in self.counts.values())

    @property
    def mentions_every_class(self) -> bool:
        return all(v is not None for v in self.counts.values())


@dataclass(frozen=True)
class CountScore:
    """How an answer compares with the gold counts.

    ``hits[c]`` is whether class ``c`` is right; ``abs_errors[c]`` its absolute error, ``None``
    when the class is not mentioned (and not read as zero). ``total_error`` compares the stated
    total, or else the sum of the mentioned counts, with the gold total.
    """

    exact: bool
    hits: dict[str, bool]
    abs_errors: dict[str, int | None]
    total_error: int | None
    parse_failure: bool

    @property
    def class_accuracy(self) -> float:
        """Fraction of classes counted right (partial credit)."""
        return sum(self.hits.values()) / len(self.hits) if self.hits else 0.0


class CountingTask:
    """Counting objects of a fixed list of classes.

    ``plurals`` overrides the plural of a class (default: :func:`plural`); ``synonyms`` maps other
    words to a class (default: :data:`DEFAULT_SYNONYMS` restricted to the task's classes).
    Class names are matched case-insensitively.
    """

    def __init__(
        self,
        classes: tuple[str, ...] | list[str] = DEFAULT_CLASSES,
        plurals: Mapping[str, str] | None = None,
        synonyms: Mapping[str, str] | None = None,
        total_noun: str = "vehicle",
    ):
        if not classes:
            raise ValueError("a counting task needs at least one class")
        self.classes = tuple(classes)
        self.plurals = {c: (plurals or {}).get(c) or plural(c) for c in self.classes}
        if synonyms is None:
            synonyms = {w: c for w, c in DEFAULT_SYNONYMS.items() if c in self.classes}
        unknown = sorted(set(synonyms.values()) - set(self.classes))
        if unknown:
            raise ValueError(f"synonyms point at classes the task does not have: {unknown}")
        self.synonyms = dict(synonyms)
        self.total_noun = total_noun
        self._pattern, self._surface = self._compile()

    def __repr__(self) -> str:
        return f"CountingTask(classes={self.classes!r})"

    # ---------------------------------------------------------------- writing
    def noun(self, cls: str, n: int) -> str:
        return cls if n == 1 else self.plurals[cls]

    def render(self, counts: Mapping[str, int]) -> str:
        """The canonical answer: every class in the task's order, zeros included.

        >>> CountingTask().render({"car": 2, "motorcycle": 3, "bus": 0, "bicycle": 1})
        'There are 2 cars, 3 motorcycles, 0 buses, 1 bicycle in the image.'
        """
        parts = [f"{int(counts.get(c, 0))} {self.noun(c, int(counts.get(c, 0)))}" for c in self.classes]
        return f"There are {', '.join(parts)} in the image."

    def render_total(self, total: int) -> str:
        """A total-only answer, the kind an untuned model gives: 'There are 5 vehicles in the image.'"""
        noun = self.total_noun if total == 1 else plural(self.total_noun)
        verb = "is" if total == 1 else "are"
        return f"There {verb} {total} {noun} in the image."

    # ---------------------------------------------------------------- reading
    def _compile(self) -> tuple[re.Pattern, dict[str, str]]:
        surface: dict[str, str] = {}  # lower-case surface form -> class, or "" for a total noun
        for noun in TOTAL_NOUNS + (self.total_noun,):
            for form in (noun, plural(noun)):
                surface[form.lower()] = ""
        words = [(c, c) for c in self.classes] + list(self.synonyms.items())
        for word, cls in words:
            # Singular, plural, and the naive "+s" / "+es" spellings (the seed wrote "buss").
            plural_form = self.plurals[cls] if word == cls else plural(word)
            for form in (word, plural_form, word + "s", word + "es"):
                surface[form.lower()] = cls
        nouns = "|".join(
            re.escape(f).replace(r"\ ", r"\s+") for f in sorted(surface, key=len, reverse=True)
        )
        numbers = "|".join(sorted(NUMBER_WORDS, key=len, reverse=True))
        filler = r"(?:(?!(?:%s)\b)[a-z\-]+\s+){0,2}" % "|".join(
            sorted(_FILLER_STOP | set(NUMBER_WORDS), key=len, reverse=True)
        )
        pattern = re.compile(
            rf"\b(?P<num>\d+|{numbers})\s+{filler}(?P<noun>{nouns})\b"
            rf"|\b(?P<noun2>{nouns})\s*[:=]\s*(?P<num2>\d+)\b",
            re.IGNORECASE,
        )
        return pattern, surface

    def mentions(self, text: str) -> list[tuple[str, int]]:
        """Every (class, number) the text states, in order; the class is ``""`` for a total.

        >>> CountingTask().mentions("2 cars, no buses, 3 cars")
        [('car', 2), ('bus', 0), ('car', 3)]
        """
        found = []
        for m in self._pattern.finditer(text or ""):
            num, noun = (m["num"], m["noun"]) if m["noun"] else (m["num2"], m["noun2"])
            value = int(num) if num.isdigit() else NUMBER_WORDS[num.lower()]
            found.append((self._surface[re.sub(r"\s+", " ", noun.lower())], value))
        return found

    def parse(self, text: str) -> ParsedCounts:
        """Read counts from free text. The first mention of a class wins.

        >>> t = CountingTask()
        >>> t.parse("There are 7 cars and 1 truck in the picture.").counts
        {'car': 7, 'motorcycle': None, 'bus': None, 'bicycle': None}
        >>> t.parse("There are 7 vehicles in the photo.").total
        7
        """
        counts: dict[str, int | None] = {c: None for c in self.classes}
        total = None
        for cls, value in self.mentions(text):
            if cls == "":
                total = value if total is None else total
            elif counts[cls] is None:
                counts[cls] = value
        return ParsedCounts(counts=counts, total=total)

    # ---------------------------------------------------------------- scoring
    def score(
        self, parsed: ParsedCounts, gold: Mapping[str, int], missing_as_zero: bool = False
    ) -> CountScore:
        """Compare a parsed answer with the gold counts (a class absent from ``gold`` is 0).

        A class the answer does not mention is wrong, unless ``missing_as_zero`` reads it as 0.
        The canonical answers always name every class, so the strict default is what exact
        match means for them; ``missing_as_zero=True`` is kinder to free-form answers.
        """
        hits, errors = {}, {}
        for c in self.classes:
            pred = parsed.counts.get(c)
            if pred is None and missing_as_zero:
                pred = 0
            g = int(gold.get(c, 0))
            hits[c] = pred is not None and pred == g
            errors[c] = None if pred is None else abs(pred - g)
        gold_total = sum(int(gold.get(c, 0)) for c in self.classes)
        mentioned = [v for v in parsed.counts.values() if v is not None]
        pred_total = parsed.total if parsed.total is not None else (sum(mentioned) if mentioned else None)
        failure = parsed.failed
        return CountScore(
            exact=not failure and all(hits.values()),
            hits=hits,
            abs_errors=errors,
            total_error=None if pred_total is None else abs(pred_total - gold_total),
            parse_failure=failure,
        )
