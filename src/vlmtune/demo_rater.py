"""The counting demo's simulated rater: it compares a model's sampled answers, never shows the gold ones.

``rater_pairs`` samples ``samples_per_image`` answers per preference image from the warm-up model
and keeps the rater's pick as a preference record: the answer with the smallest summed count
error (``total_error``) as chosen, the largest as rejected (``rater_choice``; with ``rater_noise``
its error estimates are perturbed, so it can pick the worse one; equal judgements are a tie and
dropped). Both answers may be wrong: the trainer only learns "A is better than B", as from the
study app's exported votes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.tasks.counting import DEFAULT_CLASSES, CountingTask

if TYPE_CHECKING:
    from vlmtune.demo import DemoSettings


def total_error(text: str, gold: dict[str, int], task: CountingTask) -> float:
    """The simulated rater's view of an answer: summed absolute count error (inf if unreadable)."""
    parsed = task.parse(text)
    if any(parsed.counts.get(c) is None for c in task.classes):
        return math.inf
    return float(sum(abs(parsed.counts[c] - gold[c]) for c in task.classes))


def rater_choice(answers: list[str], gold: dict[str, int], task: CountingTask, noise: float, rng) -> tuple[str, str] | None:
    """(chosen, rejected) among ``answers``: the smallest total error against the largest.

    With ``noise`` the rater's error estimates are perturbed (Gaussian, sd ``noise``), so it can
    pick the worse answer. Returns None when every answer is judged equal (a tie: dropped).
    """
    distinct = sorted(set(answers))
    if len(distinct) < 2:
        return None
    judged = [(total_error(a, gold, task) + (rng.gauss(0, noise) if noise else 0.0), a) for a in distinct]
    judged.sort(key=lambda x: x[0])
    (best_err, best), (worst_err, worst) = judged[0], judged[-1]
    if best_err == worst_err:
        return None
    return best, worst


def rater_pairs(model_dir: Path, prompts_path: Path, out_path: Path, s: DemoSettings) -> dict[str, Any]:
    """Sample answers from the warm-up model and turn the rater's picks into preference records."""
    import random

    from vlmtune.data.formats import read_records
    from vlmtune.data.writers import write_records
    from vlmtune.eval.run import load_for_eval
    from vlmtune.generate import generate

    task = CountingTask(DEFAULT_CLASSES)
    records = read_records(prompts_path)
    model, processor = load_for_eval(model_dir)
    k = s.samples_per_image
    answers = generate(model, processor, [(r.images, r.prompt) for r in records], s.max_new_tokens,
                       batch_size=64, do_sample=True, temperature=s.temperature, seed=s.seed,
                       num_return_sequences=k)
    rng = random.Random(s.seed)
    pairs, ties, chosen_exact = [], 0, 0
    for i, record in enumerate(records):
        gold = record.metadata["counts"]
        pick = rater_choice(answers[i * k:(i + 1) * k], gold, task, s.rater_noise, rng)
        if pick is None:
            ties += 1
            continue
        chosen, rejected = pick
        chosen_exact += total_error(chosen, gold, task) == 0
        # The gold counts stay in metadata for evaluation only; no trainer reads them.
        pairs.append(replace(record, id=f"pref-{i}", chosen=chosen, rejected=rejected,
                             metadata={**record.metadata, "strategy": "simulated_rater"}))
    write_records(pairs, out_path, "vlmtune")
    return {"images": len(records), "pairs": len(pairs), "ties_dropped": ties,
            "chosen_exact": chosen_exact / max(1, len(pairs))}
