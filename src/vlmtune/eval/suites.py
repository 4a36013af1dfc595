"""Public benchmarks in their released layouts: MME and LLaVA-Bench. Reading and scoring only.

MME (Fu et al. 2023, arXiv 2306.13394): one folder per subtask. Each image has a ``.txt`` file
of the same stem whose lines are ``question<TAB>answer`` (answer Yes/No), two per image. Some
subtasks keep images and text side by side; others (artwork, celebrity, landmark, posters,
scene) use ``images/`` and ``questions_answers_YN/`` subfolders. Both layouts are read here.
Per subtask: acc = right questions / questions, acc+ = images with both questions right /
images, score = (acc + acc+) * 100; the perception and cognition totals are sums of subtask
scores, as in MME's ``eval_tool/calculation.py``.

LLaVA-Bench (Liu et al. 2023, arXiv 2304.08485): ``questions.jsonl`` rows ``{question_id, image,
text, category}``, reference answers as jsonl rows ``{question_id, text}`` (released as
``answers_gpt4.jsonl``), images in ``images/``, optional ``context.jsonl`` (image captions).
A judge scores the reference and the model answer 1-10; the relative score per category is
mean(model) / mean(reference) * 100 (LLaVA's ``summarize_gpt_review.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from vlmtune.errors import VlmtuneError
from vlmtune.eval.metrics import bootstrap_statistic_ci, resample_indices, with_ci
from vlmtune.jsonl import read_jsonl, stop_or_skip

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")

# MME's own split of its 14 subtasks (eval_tool/calculation.py).
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


# ----------------------------------------------------------------------------- MME
@dataclass(frozen=True)
class MMEQuestion:
    subtask: str
    image: str  # absolute path
    question: str
    answer: str  # "yes" or "no"
    source: str  # "file:line", for messages


def read_mme(root: str | Path, skip_bad: bool = False) -> list[MMEQuestion]:
    """Every question of every subtask folder under ``root`` (sorted, so the order is stable).

    A bad question file stops the reading unless ``skip_bad``, which skips the whole file (both
    questions of its image, so acc+ stays defined) and logs a warning that names it.
    """
    root = Path(root)
    if not root.is_dir():
        raise VlmtuneError(f"MME folder {root} does not exist; pass the folder that holds the subtask folders")
    questions: list[MMEQuestion] = []
    for subtask_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = subtask_dir / "questions_answers_YN"
        if qa_dir.is_dir():
            text_dir, image_dir = qa_dir, subtask_dir / "images"
        else:
            text_dir, image_dir = subtask_dir, subtask_dir
        for txt in sorted(text_dir.glob("*.txt")):
            try:
                questions.extend(_read_mme_file(subtask_dir.name, txt, image_dir))
            except VlmtuneError as e:
                stop_or_skip(str(e), skip_bad)
    if not questions:
        raise VlmtuneError(
            f"{root}: no MME questions found; expected subtask folders with <image>.txt files of "
            "'question<TAB>Yes/No' lines (or images/ and questions_answers_YN/ subfolders)"
        )
    return questions


def _read_mme_file(subtask: str, txt: Path, image_dir: Path) -> list[MMEQuestion]:
    candidates = [image_dir / (txt.stem + ext) for ext in IMAGE_EXTENSIONS]
    image = next((c for c in candidates if c.is_file()), None)
    if image is None:
        raise VlmtuneError(f"{txt}: no image named {txt.stem}.* in {image_dir}; every question file needs its image")
    out = []
    for line_no, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        question, sep, answer = line.rpartition("\t")
        answer = answer.strip().lower()
        if not sep or not question.strip() or answer not in ("yes", "no"):
            raise VlmtuneError(
                f"{txt}, line {line_no}: expected 'question<TAB>Yes' or 'question<TAB>No', got {line!r}"
            )
        out.append(MMEQuestion(subtask, str(image.resolve()), question.strip(), answer, f"{txt}:{line_no}"))
    return out


def mme_parse_answer(text: str) -> str:
    """MME's rule: 'yes'/'no' when the answer is that word or its first 4 characters hold it, else 'other'."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(questions: Sequence[MMEQuestion], answers: Sequence[str], seed: int = 0) -> dict[str, dict]:
    """``mme/<subtask>/{acc,acc_plus,score}``, ``mme/{perception,cognition,total}`` with bootstrap CIs.

    The CIs resample images within each subtask (a subtask's score depends on image pairs).
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    per_subtask: dict[str, dict[str, list[bool]]] = {}
    for q, a in zip(questions, answers):
        per_subtask.setdefault(q.subtask, {}).setdefault(q.image, []).append(mme_parse_answer(a) == q.answer)
    out: dict[str, dict] = {}
    boot: dict[str, np.ndarray] = {}
    for k, (subtask, images) in enumerate(sorted(per_subtask.items())):
        right = np.array([sum(v) for v in images.values()], dtype=float)
        count = np.array([len(v) for v in images.values()], dtype=float)
        both = np.array([all(v) for v in images.values()], dtype=float)
        idx = resample_indices(len(images), seed=seed + k)
        acc_b = right[idx].sum(1) / count[idx].sum(1)
        plus_b = both[idx].mean(1)
        boot[subtask] = (acc_b + plus_b) * 100
        acc, plus = right.sum() / count.sum(), both.mean()
        n = int(count.sum())
        out[f"mme/{subtask}/acc"] = _entry(acc, acc_b, n)
        out[f"mme/{subtask}/acc_plus"] = _entry(plus, plus_b, len(images))
        out[f"mme/{subtask}/score"] = _entry((acc + plus) * 100, boot[subtask], len(images))
    groups = {
        "perception": [s for s in boot if s in MME_PERCEPTION],
        "cognition": [s for s in boot if s in MME_COGNITION],
        "total": list(boot),
    }
    for name, members in groups.items():
        if members:
            value = sum(out[f"mme/{s}/score"]["value"] for s in members)
            stats = np.sum([boot[s] for s in members], axis=0)
            n = sum(out[f"mme/{s}/score"]["n"] for s in members)
            out[f"mme/{name}"] = _entry(value, stats, n)
    return out


def _entry(value: float, stats: np.ndarray, n: int) -> dict:
    low, high = np.percentile(stats, [2.5, 97.5])
    return {"value": float(value), "ci_low": float(low), "ci_high": float(high), "n": n}


# ----------------------------------------------------------------------------- LLaVA-Bench
REFERENCE_NAMES = ("answers_gpt4.jsonl", "reference.jsonl", "references.jsonl", "answers.jsonl")


@dataclass(frozen=True)
class LlavaQuestion:
    question_id: str
    image: str  # absolute path
    text: str
    category: str
    reference: str
    context: str  # caption(s) of the image for the judge, "" when the benchmark gives none


def read_llava_bench(root: str | Path, reference: str | Path | None = None,
                     skip_bad: bool = False) -> list[LlavaQuestion]:
    """Questions joined with their reference answers (and captions when ``context.jsonl`` exists).

    A bad line (or a question without its image or reference) stops the reading unless
    ``skip_bad``, which skips it and logs a warning that names it.
    """
    root = Path(root)
    questions_file = root / "questions.jsonl"
    if not questions_file.is_file():
        raise VlmtuneError(
            f"{questions_file} is missing; a LLaVA-Bench folder holds questions.jsonl, images/ and reference answers"
        )
    ref_file = Path(reference) if reference else _find_reference(root)
    refs = {str(r["question_id"]): str(r["text"]) for _, r in read_jsonl(ref_file, ("question_id", "text"), skip_bad)}
    contexts = {}
    if (root / "context.jsonl").is_file():
        for _, row in read_jsonl(root / "context.jsonl", ("image",), skip_bad):
            contexts[str(row["image"])] = str(row.get("caption", ""))
    out = []
    for line_no, row in read_jsonl(questions_file, ("question_id", "image", "text"), skip_bad):
        qid = str(row["question_id"])
        image = _find_image(root, str(row["image"]))
        if qid not in refs:
            stop_or_skip(f"{questions_file}, line {line_no}: question {qid} has no reference answer in {ref_file}",
                         skip_bad)
            continue
        if image is None:
            stop_or_skip(f"{questions_file}, line {line_no}: image {row['image']!r} not found under {root}/images",
                         skip_bad)
            continue
        out.append(
            LlavaQuestion(qid, str(image.resolve()), str(row["text"]), str(row.get("category", "all")),
                          refs[qid], contexts.get(str(row["image"]), ""))
        )
    return out


def _find_reference(root: Path) -> Path:
    for name in REFERENCE_NAMES:
        for folder in (root, root / "answers"):
            if (folder / name).is_file():
                return folder / name
    answers = sorted((root / "answers").glob("*.jsonl")) if (root / "answers").is_dir() else []
    if len(answers) == 1:
        return answers[0]
    raise VlmtuneError(
        f"{root}: no reference answers found (looked for {', '.join(REFERENCE_NAMES)} and answers/*.jsonl); "
        "pass the file with --reference-answers"
    )


def _find_image(root: Path, name: str) -> Path | None:
    for candidate in (root / "images" / name, root / name):
        if candidate.is_file():
            return candidate
    return None


def llava_scores(
    categories: Sequence[str], scores: Sequence[tuple[float, float] | None], seed: int = 0
) -> dict[str, dict]:
    """Relative scores ``llava/<category>`` and ``llava/all`` = mean(model)/mean(reference)*100.

    ``scores[i]`` is ``(reference, model)`` for question ``i``, or ``None`` when the judge's
    reply could not be read (left out, and counted in ``llava/judge_failures``). Also reports
    the raw means ``llava/<category>/reference`` and ``llava/<category>/model``.
    """
    out: dict[str, dict] = {}
    groups: dict[str, list[tuple[float, float]]] = {"all": []}
    for cat, s in zip(categories, scores):
        if s is not None:
            groups.setdefault(cat, []).append(s)
            groups["all"].append(s)
    for k, (cat, pairs) in enumerate(sorted(groups.items())):
        if not pairs:
            continue
        arr = np.array(pairs, dtype=float)

        def relative(idx: np.ndarray, arr: np.ndarray = arr) -> float:
            ref = arr[idx, 0].mean()
            return float(arr[idx, 1].mean() / ref * 100) if ref > 0 else math.nan

        low, high = bootstrap_statistic_ci(relative, len(arr), seed=seed + k)
        n = len(arr)
        out[f"llava/{cat}"] = {"value": relative(np.arange(n)), "ci_low": low, "ci_high": high, "n": n}
        out[f"llava/{cat}/reference"] = with_ci(arr[:, 0], seed=seed + k)
        out[f"llava/{cat}/model"] = with_ci(arr[:, 1], seed=seed + k)
    failures = [float(s is None) for s in scores]
    if failures:
        out["llava/judge_failures"] = {"value": float(sum(failures)), "ci_low": None, "ci_high": None, "n": len(failures)}
    return out
