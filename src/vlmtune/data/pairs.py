"""Counting preference pairs from per-image counts: prompts, chosen, rejected strategies, split.

For each image the chosen answer is the exact per-class sentence (``CountingTask.render``) and
each rejected answer is made by one of :data:`STRATEGIES`:

- ``off_by_one``: one class's count moved by one (up from zero);
- ``off_by_k``: one class's count moved by 2 or 3;
- ``swap``: the counts of two classes that differ exchanged;
- ``total_only``: the total alone, "There are 5 vehicles in the image." (what an untuned model says);
- ``random``: every class drawn at random in a plausible range.

A rejected answer never equals the chosen one, nor an earlier rejected one of the same image; a
strategy that cannot make one (``swap`` when all counts are equal) hands over to the next.
Randomness is drawn per image from ``(seed, image path)``, so the output does not depend on the
order images are read in. The split is a hash of the *source photo* name, not of the file, so
augmentation copies of one photo never straddle train and test.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from vlmtune.data.detections import ImageCounts
from vlmtune.data.formats import FORMATS
from vlmtune.data.writers import write_records
from vlmtune.data.records import PreferenceRecord, user_prompt
from vlmtune.errors import VlmtuneError
from vlmtune.tasks.counting import CountingTask, plural

STRATEGIES = ("off_by_one", "off_by_k", "swap", "total_only", "random")
DEFAULT_SPLIT = {"train": 0.8, "val": 0.1, "test": 0.1}

# Paraphrases of the question; ``{things}`` is the task's total noun, plural ("vehicles").
PROMPTS = (
    "Please count the number of {things} you see.",
    "Can you tell me the total number of {things} in this photo?",
    "How many {things} of each kind are in this image?",
    "Count the {things} in the picture, class by class.",
    "How many {classes} are there in this image?",
)


# ---------------------------------------------------------------------- options
def parse_split(spec: str) -> dict[str, float] | None:
    """``"train=0.8,val=0.1,test=0.1"`` → fractions; ``"keep"`` → None (keep the source's splits)."""
    if spec.strip() == "keep":
        return None
    fractions = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        try:
            fractions[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip() or fractions[name.strip()] < 0:
            raise VlmtuneError(f"--split {spec!r}: write it as train=0.8,val=0.1,test=0.1 (or 'keep')")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise VlmtuneError(f"--split {spec!r}: the fractions add up to {sum(fractions.values()):g}, not 1")
    return fractions


def parse_mapping(items: Iterable[str]) -> dict[str, str]:
    """``["motorbike=motorcycle", ...]`` → ``{"motorbike": "motorcycle"}`` (lower-cased)."""
    mapping = {}
    for item in items:
        for pair in item.split(","):
            old, sep, new = pair.partition("=")
            if not sep or not old.strip() or not new.strip():
                raise VlmtuneError(f"--map {pair!r}: write it as old=new, e.g. --map motorbike=motorcycle")
            mapping[old.strip().lower()] = new.strip().lower()
    return mapping


def parse_strategies(spec: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise VlmtuneError(f"--strategies: unknown {unknown or spec!r}; choose from {','.join(STRATEGIES)}")
    return names


def split_for(source: str, fractions: dict[str, float]) -> str:
    """The split of a source photo: a hash of its name, so it is the same on every run."""
    u = int(hashlib.sha1(source.encode()).hexdigest()[:12], 16) / 16**12
    edge = 0.0
    for name, fraction in fractions.items():
        edge += fraction
        if u < edge:
            return name
    return next(reversed(fractions))


# ---------------------------------------------------------------------- answers
def rejected_answer(
    counts: dict[str, int], task: CountingTask, strategy: str, rng: random.Random
) -> str | None:
    """A wrong answer made by ``strategy``, or None when it cannot make one for these counts."""
    wrong = dict(counts)
    cls = rng.choice(task.classes)
    if strategy == "off_by_one":
        wrong[cls] = counts[cls] + 1 if counts[cls] == 0 or rng.random() < 0.5 else counts[cls] - 1
    elif strategy == "off_by_k":
        k = rng.choice((2, 3))
        wrong[cls] = counts[cls] + k if counts[cls] < k or rng.random() < 0.5 else counts[cls] - k
    elif strategy == "swap":
        pairs = [(a, b) for a in task.classes for b in task.classes if a < b and counts[a] != counts[b]]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        wrong[a], wrong[b] = counts[b], counts[a]
    elif strategy == "total_only":
        return task.render_total(sum(counts.values()))
    elif strategy == "random":
        high = max(4, max(counts.values()) + 2)
        while wrong == counts:
            wrong = {c: rng.randint(0, high) for c in task.classes}
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return task.render(wrong)


def prompt_text(task: CountingTask, rng: random.Random) -> str:
    things = plural(task.total_noun)
    names = [task.plurals[c] for c in task.classes]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return rng.choice(PROMPTS).format(things=things, classes=listed)


def image_pairs(
    item: ImageCounts,
    counts: dict[str, int],
    split: str,
    task: CountingTask,
    strategies: tuple[str, ...],
    rejects: int,
    seed: int,
) -> list[PreferenceRecord]:
    """Up to ``rejects`` pairs for one image, each with a different rejected answer."""
    rng = random.Random(f"{seed}:{item.rel}")
    prompt = user_prompt(prompt_text(task, rng))
    chosen = task.render(counts)
    start = rng.randrange(len(strategies))
    records, used = [], {chosen}
    for i in range(rejects):
        for attempt in range(3 * len(strategies)):
            strategy = strategies[(start + i + attempt) % len(strategies)]
            rejected = rejected_answer(counts, task, strategy, rng)
            if rejected is not None and rejected not in used:
                break
        else:
            break  # this image cannot give more distinct rejected answers
        used.add(rejected)
        metadata = {
            "counts": counts, "classes": list(task.classes), "source_image": item.source,
            "split": split, "strategy": strategy,
        }
        stem = item.rel.rsplit(".", 1)[0]
        records.append(PreferenceRecord(f"{stem}#{i}", [str(item.image)], prompt, chosen, rejected, metadata))
    return records


# ---------------------------------------------------------------------- the whole set
@dataclass
class PairStats:
    """What a build read and wrote; printed as a table and saved as stats.json."""

    classes: list[str]
    images: Counter = field(default_factory=Counter)  # per split
    objects: Counter = field(default_factory=Counter)  # counted classes
    ignored: Counter = field(default_factory=Counter)  # classes neither counted nor dropped
    dropped: Counter = field(default_factory=Counter)
    distribution: dict = field(default_factory=lambda: defaultdict(Counter))  # class -> count -> images
    pairs: Counter = field(default_factory=Counter)  # per strategy
    pairs_per_split: Counter = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)  # bad labels --skip-bad left out, each "where: why"

    def to_dict(self) -> dict:
        return {
            "classes": self.classes,
            "images": dict(self.images), "objects": dict(self.objects),
            "ignored_objects": dict(self.ignored), "dropped_objects": dict(self.dropped),
            "count_distribution": {
                c: {str(k): v for k, v in sorted(d.items())} for c, d in self.distribution.items()
            },
            "pairs_per_strategy": dict(self.pairs), "pairs_per_split": dict(self.pairs_per_split),
            "skipped_count": len(self.skipped), "skipped": self.skipped,
        }


def count_classes(
    raw: Counter, task: CountingTask, mapping: dict, drop: set, stats: PairStats
) -> dict[str, int]:
    """Raw class-name counts → the task's counts (every class, zeros included)."""
    counts = {c: 0 for c in task.classes}
    for name, n in raw.items():
        name = mapping.get(name, name)
        if name in drop:
            stats.dropped[name] += n
        elif name in counts:
            counts[name] += n
        else:
            stats.ignored[name] += n
    return counts


def build_pairs(
    items: Iterable[ImageCounts],
    task: CountingTask,
    stats: PairStats,
    mapping: dict[str, str] | None = None,
    drop: Iterable[str] = (),
    strategies: tuple[str, ...] = STRATEGIES,
    rejects_per_image: int = 1,
    split: dict[str, float] | None = DEFAULT_SPLIT,
    seed: int = 0,
) -> Iterator[PreferenceRecord]:
    """Stream records for every image; ``split=None`` keeps the source's split folders."""
    mapping, drop = mapping or {}, set(drop)
    for item in items:
        counts = count_classes(item.counts, task, mapping, drop, stats)
        name = split_for(item.source, split) if split else (item.split or "train")
        stats.images[name] += 1
        for c, n in counts.items():
            stats.objects[c] += n
            stats.distribution[c][n] += 1
        for record in image_pairs(item, counts, name, task, strategies, rejects_per_image, seed):
            stats.pairs[record.metadata["strategy"]] += 1
            stats.pairs_per_split[name] += 1
            yield record


# ---------------------------------------------------------------------- writing
# File name suffix per format; ``hf`` writes a ``save_to_disk`` folder per split.
SUFFIX = {
    "vlmtune": ".jsonl", "trl": ".jsonl", "swift": ".jsonl", "seed": ".json", "llamafactory": ".json", "hf": "",
}


def write_split_files(
    records: Iterable[PreferenceRecord], out_dir: Path, fmt: str = "vlmtune"
) -> dict[str, Path]:
    """One file per split, ``OUT/{split}{suffix}``, in ``fmt``. Returns split → path."""
    if fmt not in FORMATS:
        raise VlmtuneError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    by_split: dict[str, list[PreferenceRecord]] = defaultdict(list)
    for record in records:
        by_split[record.metadata["split"]].append(record)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, group in sorted(by_split.items()):
        paths[name] = out_dir / f"{name}{SUFFIX.get(fmt, '.jsonl')}"
        write_pairs(group, paths[name], fmt)
    return paths


def write_pairs(records: Iterable[PreferenceRecord], path: Path, fmt: str = "vlmtune") -> Path:
    """Write records to one file (or, for ``hf``, one folder) in ``fmt``."""
    return write_records(records, path, fmt)


# ---------------------------------------------------------------------- detections → files
def pairs_from_detections(
    root: str | Path,
    out_dir: str | Path,
    fmt: str = "vlmtune",
    source_format: str = "auto",
    classes: list[str] | None = None,
    mapping: dict[str, str] | None = None,
    drop: Iterable[str] = (),
    count: list[str] | None = None,
    strategies: tuple[str, ...] = STRATEGIES,
    rejects_per_image: int = 1,
    split: dict[str, float] | None = DEFAULT_SPLIT,
    seed: int = 0,
    skip_bad: bool = False,
) -> tuple[dict[str, Path], PairStats]:
    """Read a detection data set, build pairs, write ``OUT/{split}.*`` and ``OUT/stats.json``.

    ``count`` is the task's classes (after ``mapping`` and ``drop``); by default every class of
    the data set that is left, in the data set's own order.
    """
    from vlmtune.data.detections import class_names, read_detections

    mapping, drop = mapping or {}, {d.strip().lower() for d in drop}
    names = class_names(root, source_format, classes)
    _check_names(names, mapping, drop)
    skipped: list[str] = []
    items = list(read_detections(root, source_format, classes, skip_bad, skipped))
    if not items:
        why = f"; all {len(skipped)} skipped as bad, the first: {skipped[0]}" if skipped else ""
        raise VlmtuneError(f"{root}: no labelled images found{why}")
    if count is None:
        seen = names or sorted({n for it in items for n in it.counts})
        count = [c for c in dict.fromkeys(mapping.get(n, n) for n in seen) if c not in drop]
    task = CountingTask(tuple(c.strip().lower() for c in count))
    stats = PairStats(classes=list(task.classes), skipped=skipped)
    records = build_pairs(items, task, stats, mapping, drop, strategies, rejects_per_image, split, seed)
    paths = write_split_files(records, Path(out_dir), fmt)
    (Path(out_dir) / "stats.json").write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
    return paths, stats


def _check_names(names: list[str] | None, mapping: dict[str, str], drop: set[str]) -> None:
    if names is None:
        return
    for option, keys in (("--map", mapping), ("--drop", drop)):
        unknown = sorted(set(keys) - set(names))
        if unknown:
            raise VlmtuneError(
                f"{option}: no class {', '.join(unknown)} in the data (its classes: {', '.join(names)})"
            )
