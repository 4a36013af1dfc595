"""Scenes → task records: questions from every family, balanced, split, with hard-negative pairs.

For each scene (``rng`` seeded by ``(seed, family, source photo, image path within the data set)``) each family poses its valid
questions and up to ``per_scene`` of them are kept at random. Then:

1. **Out-of-distribution axes**, one per OOD file, first that applies wins:
   ``ood_objects`` (scenes with more objects than ``ood_objects``, default: above the 90th
   percentile of the build, never seen in training), ``ood_combos`` (attribute questions about a
   held-out colour × class combination, e.g. "How many red buses?"), ``ood_hops`` (more hops
   than ``max_hops``), ``ood_phrasing`` (each family's last template). The question-level axes
   (combos, hops, phrasing) take their questions from the test split's scenes only, so an OOD
   file differs from ``test`` along its one axis; the same questions of train and val scenes are
   dropped (and counted).
2. **Answer balancing** per family over the in-distribution questions: the most common answer is
   cut to at most 1.1 × the next most common (CLEVR's rule), at random. Compound answers balance
   on their verdict, box lists on their length; single boxes are not balanced.
3. **Split** by source photo with :func:`vlmtune.data.pairs.split_for`, as every other build does,
   so copies of one photo never straddle train and test.
4. **Records**: the chosen answer is the gold one (plain, or with ``think`` the gold reasoning
   chain from the program's trace and the answer block), each rejected one a hard negative
   (:mod:`vlmtune.tasks.base`), edit distances mixed. Count questions are built by
   :func:`vlmtune.data.pairs.image_pairs`, so they are exactly today's counting records.
   Every gold completion is scored when built and must score 1.0 (and every rejected one below
   1.0), so no record carries an answer its own reward cannot read.

Scenes where no family has a valid question are counted and named in ``stats.json``.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlmtune.data.records import PreferenceRecord, user_prompt
from vlmtune.errors import VlmtuneError
from vlmtune.progress import progress_bar
from vlmtune.tasks import answers
from vlmtune.tasks.base import mix_distances
from vlmtune.tasks.core import THINK_INSTRUCTION, Obj, Question, Scene, load_task, render_completion

DEFAULT_COMBOS = (("red", "bus"), ("blue", "car"))
AXES = ("objects", "combos", "hops", "phrasing")


# ---------------------------------------------------------------------- options
def resolve_families(names: list[str] | None, default: tuple[str, ...] | None = None) -> dict:
    """``--families`` → {name: task}; a name is a built-in family or ``package.module:Class``.

    A user's task is built like the families are: its questions must use an answer kind of
    :mod:`vlmtune.tasks.answers` (subclassing :class:`vlmtune.tasks.base.ProgramTask` gives the rest).
    """
    from vlmtune.tasks.families import FAMILIES

    names = names or list(default or FAMILIES)
    chosen = {}
    for name in names:
        if name in FAMILIES:
            chosen[name] = FAMILIES[name]
        elif ":" in name:
            chosen[name] = load_task(name)
        else:
            raise VlmtuneError(f"--families: unknown family {name!r}; the families are {', '.join(FAMILIES)} "
                             "(or a task class as package.module:Class)")
    return chosen


@dataclass
class BuildOptions:
    families: dict
    think: bool = False
    per_scene: int = 2
    rejects: int = 1
    max_hops: int = 3
    ood_objects: int | None = None  # None: the 90th percentile of the build
    combos: tuple[tuple[str, str], ...] = DEFAULT_COMBOS
    split: dict[str, float] | None = None  # None: pairs.DEFAULT_SPLIT
    seed: int = 0


@dataclass
class TaskStats:
    """What a build posed and wrote: stats.json."""

    scenes: int = 0
    # family -> answers (in-distribution questions: what balancing evens out), hops (all questions)
    questions: dict = field(default_factory=lambda: defaultdict(lambda: {"answers": Counter(), "hops": Counter()}))
    records: Counter = field(default_factory=Counter)  # per file
    axes: Counter = field(default_factory=Counter)
    no_question: list = field(default_factory=list)
    no_question_per_family: Counter = field(default_factory=Counter)
    balanced_out: Counter = field(default_factory=Counter)
    held_out_dropped: Counter = field(default_factory=Counter)
    slips: Counter = field(default_factory=Counter)
    ood_objects: int | None = None
    skipped: list = field(default_factory=list)

    def to_dict(self) -> dict:
        families = {
            name: {"questions": sum(q["hops"].values()),
                   "answers_in_distribution": dict(sorted(q["answers"].items(), key=lambda kv: -kv[1])),
                   "hops": {str(h): n for h, n in sorted(q["hops"].items())}}
            for name, q in self.questions.items()
        }
        return {
            "scenes": self.scenes, "families": families, "records_per_file": dict(self.records),
            "ood_axes": dict(self.axes), "ood_objects_above": self.ood_objects,
            "scenes_without_question": len(self.no_question),
            "scenes_without_question_examples": self.no_question[:20],
            "scenes_without_question_per_family": dict(self.no_question_per_family),
            "cut_by_balancing": dict(self.balanced_out),
            "held_out_questions_dropped_from_train_val": dict(self.held_out_dropped),
            "rejected_slips": dict(self.slips), "skipped": self.skipped,
        }


# ---------------------------------------------------------------------- reading scenes
def read_scenes(scenes_dir: str | Path) -> list[Scene]:
    """The scenes of ``vlmtune data synth``: ``objects/*.json`` with the classes of ``data.yaml``."""
    root = Path(scenes_dir).resolve()
    files = sorted((root / "objects").glob("*.json"))
    if not files:
        raise VlmtuneError(f"{root}: no objects/*.json scene files; draw scenes with `vlmtune data synth`, "
                         "or read detection labels with --detections")
    try:
        classes = tuple(yaml.safe_load((root / "data.yaml").read_text())["names"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise VlmtuneError(f"{root}/data.yaml: cannot read the class names ({e})") from None
    return [_scene(path, root, classes) for path in files]


def _scene(path: Path, root: Path, classes: tuple[str, ...]) -> Scene:
    try:
        d = json.loads(path.read_text())
        objects = tuple(Obj(o["class"], tuple(o["box"]), o.get("colour"), o.get("size")) for o in d["objects"])
        image = root / d["image"]
        return Scene(str(image), int(d["width"]), int(d["height"]), objects, path.stem, classes,
                     Path(d["image"]).as_posix())
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise VlmtuneError(f"{path}: not a scene file ({type(e).__name__}: {e}); "
                         "redraw it with `vlmtune data synth`") from None


# ---------------------------------------------------------------------- posing
@dataclass
class Posed:
    scene: Scene
    task: object
    question: Question
    axis: str | None = None


def pose(scenes: list[Scene], opts: BuildOptions, stats: TaskStats) -> list[Posed]:
    """Up to ``per_scene`` questions per family per scene; scenes without any are recorded."""
    posed = []
    for scene in progress_bar(scenes, desc="pose questions", unit="scene"):
        stats.scenes += 1
        found = 0
        for name, task in opts.families.items():
            # One stream per family and scene, keyed by the path within the data set (not the absolute
            # path): a family's questions do not depend on the other families asked, nor on where data lives.
            rng = random.Random(f"{opts.seed}:{name}:{scene.source}:{scene.rel}")
            questions = [q for q in task.questions(scene, rng) if q is not None]
            if not questions:
                stats.no_question_per_family[name] += 1
            for q in rng.sample(questions, min(opts.per_scene, len(questions))):
                posed.append(Posed(scene, task, q))
                found += 1
        if not found:
            stats.no_question.append(scene.source)
    return posed


def object_limit(scenes: list[Scene], opts: BuildOptions) -> int:
    """Scenes with more objects than this are out of distribution: the option, or the 90th percentile."""
    if opts.ood_objects is not None:
        return opts.ood_objects
    sizes = sorted(len(s.objects) for s in scenes)
    return sizes[int(0.9 * (len(sizes) - 1))]


def assign_axes(posed: list[Posed], opts: BuildOptions, limit: int, split_of, stats: TaskStats) -> list[Posed]:
    """Each question's OOD axis (or None); held-out questions of train/val scenes are dropped."""
    stats.ood_objects = limit
    combos = {tuple(c) for c in opts.combos}
    kept = []
    for p in posed:
        q = p.question
        if len(p.scene.objects) > limit:
            p.axis = "objects"
        elif any((s.get("colour"), c) in combos for s in q.program for c in (s.get("classes") or [])):
            p.axis = "combos"
        elif q.hops > opts.max_hops:
            p.axis = "hops"
        elif getattr(p.task, "phrasings", 0) and q.phrasing == p.task.phrasings - 1:
            p.axis = "phrasing"
        if p.axis in ("combos", "hops", "phrasing") and split_of(p.scene) != "test":
            stats.held_out_dropped[p.axis] += 1
            continue
        kept.append(p)
    return kept


def balance_key(question: Question):
    """What balancing counts: the answer text; a compound's verdict; a box list's length."""
    if question.kind in ("box", "counts"):
        return None  # boxes are all different; counts stay exactly today's records
    if question.kind == "compound":
        return question.answer[2]
    if question.kind == "boxes":
        n = len(question.answer)
        return f"{n} box" if n == 1 else f"{n} boxes"
    return question.answer


def balance(posed: list[Posed], seed: int, stats: TaskStats) -> list[Posed]:
    """Cut each family's most common answer to at most 1.1 × the next (in-distribution only)."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for k, p in enumerate(posed):
        if p.axis is None and balance_key(p.question) is not None:
            groups[p.question.family][balance_key(p.question)].append(k)
    dropped = set()
    for family, by_answer in groups.items():
        ranked = sorted(by_answer.values(), key=len, reverse=True)
        if len(ranked) < 2:
            continue
        cap = max(len(ranked[1]), int(1.1 * len(ranked[1])))
        if len(ranked[0]) > cap:
            cut = random.Random(f"balance:{seed}:{family}").sample(ranked[0], len(ranked[0]) - cap)
            dropped.update(cut)
            stats.balanced_out[family] += len(cut)
    return [p for k, p in enumerate(posed) if k not in dropped]


# ---------------------------------------------------------------------- records
def make_records(posed: list[Posed], opts: BuildOptions, split_of, stats: TaskStats) -> list[PreferenceRecord]:
    """Records for every posed question, each checked: gold scores 1.0, rejected below 1.0."""
    records: list[PreferenceRecord] = []
    per_scene: Counter = Counter()
    for p in progress_bar(posed, desc="make records", unit="question"):
        split = f"ood_{p.axis}" if p.axis else split_of(p.scene)
        n = per_scene[p.scene.image, p.question.family]  # numbered per family: ids do not depend on others
        per_scene[p.scene.image, p.question.family] += 1
        if p.axis:
            stats.axes[p.axis] += 1
        made = _count_records(p, split, opts) if p.question.kind == "counts" else _records(p, split, n, opts)
        for record in made:
            _check(record)
            stats.slips[record.metadata["task"]["slip"]] += 1
            stats.records[split] += 1
            records.append(record)
        q = stats.questions[p.question.family]
        key = balance_key(p.question)
        if p.axis is None:
            q["answers"][str(key if key is not None else p.question.kind)] += 1
        q["hops"][p.question.hops] += 1
    return records


def task_entry(p: Posed, family: str, think: bool) -> dict:
    q = p.question
    return {"family": family, "kind": q.kind, "question": q.text, "program": q.program, "answer": q.answer,
            "hops": q.hops, "phrasing": q.phrasing, "think": think, "axis": p.axis, "extra": q.extra}


def _family_name(p: Posed, opts: BuildOptions) -> str:
    return next(name for name, task in opts.families.items() if task is p.task)


def _prompt_text(text: str, think: bool) -> str:
    return f"{text} {THINK_INSTRUCTION}" if think else text


def _records(p: Posed, split: str, n: int, opts: BuildOptions) -> list[PreferenceRecord]:
    q, scene = p.question, p.scene
    rng = random.Random(f"{opts.seed}:{q.family}:{scene.rel}:{n}")
    gold_text = answers.render(q.kind, q.answer, q.extra)
    negatives = mix_distances(p.task.negatives(q, scene), gold_text, q.kind, q.extra, rng)[: opts.rejects]
    family = _family_name(p, opts)
    prompt = user_prompt(_prompt_text(q.text, opts.think))
    chosen = render_completion(gold_text, q.trace, opts.think)
    stem = (scene.rel or Path(scene.image).name).rsplit(".", 1)[0]
    records = []
    for j, neg in enumerate(negatives):
        rejected = render_completion(answers.render(q.kind, neg.answer, q.extra), neg.trace or q.trace, opts.think)
        meta = {"source_image": scene.source, "split": split,
                "task": {**task_entry(p, family, opts.think), "slip": neg.slip}}
        records.append(PreferenceRecord(f"{stem}#{family}{n}#{j}", [scene.image], prompt, chosen, rejected, meta))
    return records


def _count_records(p: Posed, split: str, opts: BuildOptions) -> list[PreferenceRecord]:
    """Today's counting records (:func:`vlmtune.data.pairs.image_pairs`) with ``metadata.task`` added."""
    from vlmtune.data.detections import ImageCounts
    from vlmtune.data.pairs import STRATEGIES, image_pairs
    from vlmtune.tasks.counting import CountingTask

    scene, q = p.scene, p.question
    item = ImageCounts(Path(scene.image), scene.rel, scene.source, None, Counter(q.answer))
    records = image_pairs(item, dict(q.answer), split, CountingTask(scene.classes), STRATEGIES, opts.rejects, opts.seed)
    for record in records:
        record.metadata["task"] = {**task_entry(p, _family_name(p, opts), opts.think),
                                   "question": record.prompt_text().replace("<image>", "").strip(),
                                   "slip": record.metadata["strategy"]}
        if opts.think:
            record.prompt = user_prompt(_prompt_text(record.metadata["task"]["question"], True))
            record.chosen = render_completion(record.chosen, q.trace, True)
            record.rejected = render_completion(record.rejected, q.trace, True)
    return records


def _check(record: PreferenceRecord) -> None:
    meta = record.metadata["task"]
    if answers.score_completion(record.chosen, meta) != 1.0:
        raise VlmtuneError(f"record {record.id}: its gold answer {record.chosen!r} does not score 1.0 under its own "
                         f"reward (family {meta['family']}); this is a bug in the family, please report it")
    if answers.score_completion(record.rejected, meta) >= 1.0:
        raise VlmtuneError(f"record {record.id}: its rejected answer {record.rejected!r} scores 1.0 "
                         f"(family {meta['family']}); this is a bug in the family, please report it")


# ---------------------------------------------------------------------- the whole build
def build_task_files(
    scenes: list[Scene], out_dir: str | Path, opts: BuildOptions, fmt: str = "vlmtune", stats: TaskStats | None = None
) -> tuple[dict[str, Path], TaskStats]:
    """Pose, route, balance, split and write ``OUT/{train,val,test,ood_*}.*`` and ``OUT/stats.json``."""
    from vlmtune.data.pairs import DEFAULT_SPLIT, split_for, write_split_files

    if not scenes:
        raise VlmtuneError("no scenes to pose questions about")
    stats = stats or TaskStats()
    fractions = opts.split or DEFAULT_SPLIT
    if "test" not in fractions:
        raise VlmtuneError(f"the split {fractions} has no test part, which the out-of-distribution files draw from")

    def split_of(scene: Scene) -> str:
        return split_for(scene.source, fractions)

    posed = pose(scenes, opts, stats)
    posed = balance(assign_axes(posed, opts, object_limit(scenes, opts), split_of, stats), opts.seed, stats)
    records = make_records(posed, opts, split_of, stats)
    if not records:
        raise VlmtuneError(f"no question could be posed on {len(scenes)} scenes with families "
                         f"{', '.join(opts.families)}; see which scenes in the stats, or choose other families")
    paths = write_split_files(records, Path(out_dir), fmt)
    (Path(out_dir) / "stats.json").write_text(json.dumps(stats.to_dict(), indent=2, default=str) + "\n")
    return paths, stats
