"""Run a model on MME or LLaVA-Bench and write ``metrics.json`` + ``samples.jsonl``.

    evaluate_mme(model, processor, root, out_dir, *, batch_size=16, max_new_tokens=16, seed=0,
                 skip_bad=False) -> dict
    evaluate_llava_bench(model, processor, root, out_dir, judge, *, reference_answers=None,
                         batch_size=16, max_new_tokens=512, seed=0, skip_bad=False) -> dict

Reading and scoring live in :mod:`vlmtune.eval.suites`; the judges in :mod:`vlmtune.eval.judge`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from vlmtune.data.records import user_prompt
from vlmtune.errors import VlmtuneError
from vlmtune.eval.suites import (
    llava_scores,
    mme_parse_answer,
    mme_scores,
    read_llava_bench,
    read_mme,
)
from vlmtune.eval.judge import judge_messages, parse_judge_scores
from vlmtune.eval.run import write_results


def evaluate_mme(model, processor, root: str | Path, out_dir: str | Path, *, batch_size: int = 16,
                 max_new_tokens: int = 16, seed: int = 0, skip_bad: bool = False) -> dict[str, dict]:
    """MME acc, acc+ and score per subtask, and the perception / cognition / total scores."""
    from vlmtune.generate import generate

    questions = read_mme(root, skip_bad=skip_bad)
    items = [([q.image], user_prompt(q.question)) for q in questions]
    answers = generate(model, processor, items, max_new_tokens, batch_size)
    metrics = mme_scores(questions, answers, seed=seed)
    samples = [
        {
            "id": f"{q.subtask}/{Path(q.image).name}#{k}",
            "subtask": q.subtask,
            "image": q.image,
            "prompt": q.question,
            "answer": a,
            "gold": q.answer,
            "parsed": mme_parse_answer(a),
            "correct": mme_parse_answer(a) == q.answer,
            "source": q.source,
        }
        for k, (q, a) in enumerate(zip(questions, answers))
    ]
    write_results(out_dir, metrics, samples)
    return metrics


def evaluate_llava_bench(model, processor, root: str | Path, out_dir: str | Path,
                         judge: Callable[[list], list[str]], *, reference_answers: str | Path | None = None,
                         batch_size: int = 16, max_new_tokens: int = 512, seed: int = 0,
                         skip_bad: bool = False) -> dict[str, dict]:
    """LLaVA-Bench relative scores per category: the judge rates reference and answer 1-10."""
    from vlmtune.generate import generate

    questions = read_llava_bench(root, reference_answers, skip_bad=skip_bad)
    if not questions:
        raise VlmtuneError(f"{root}: no LLaVA-Bench questions left to evaluate")
    items = [([q.image], user_prompt(q.text)) for q in questions]
    answers = generate(model, processor, items, max_new_tokens, batch_size)
    replies = judge([judge_messages(q.text, q.context, q.reference, a) for q, a in zip(questions, answers)])
    scores = [parse_judge_scores(r) for r in replies]
    metrics = llava_scores([q.category for q in questions], scores, seed=seed)
    samples = [
        {
            "id": q.question_id,
            "category": q.category,
            "image": q.image,
            "prompt": q.text,
            "answer": a,
            "reference": q.reference,
            "judge_reply": r,
            "reference_score": None if s is None else s[0],
            "model_score": None if s is None else s[1],
            "judge_failed": s is None,
        }
        for q, a, r, s in zip(questions, answers, replies, scores)
    ]
    write_results(out_dir, metrics, samples)
    return metrics
