"""``vlmtune rewards check``: score adversarial completions with every reward; none may pay.

The probes are one question of each built-in family on a fixed hand-made scene (:data:`PROBE`),
each asked plain and with ``--think``, plus one record written before tasks existed (only
``metadata.counts``). For each probe, :data:`CASES` builds completions that must earn nothing:
the empty answer, tags only, two answer blocks, the answer only inside ``<think>``, every option
listed, "A or B", boxes (or numbers) spammed, and an over-long answer around the right one.

A reward *pays* on a case when it gives any of the case's completions more than 0. A reward also
fails when it pays nothing for the gold completions (a reward that is always 0 is no reward).
Rewards are called like the GRPO step calls them: ``fn(completions, counts=..., metadata=...,
prompts=...)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from vlmtune.tasks import answers
from vlmtune.tasks.core import Obj, Scene, render_completion

PROBE = Scene(
    "probe.png", 112, 112,
    (Obj("bus", (8, 8, 44, 34), "red", "large"), Obj("car", (60, 14, 80, 28), "blue", "small"),
     Obj("car", (64, 56, 100, 80), "red", "large"), Obj("motorcycle", (6, 70, 16, 82), "green", "small"),
     Obj("bus", (40, 86, 64, 104), "yellow", "small"), Obj("bicycle", (86, 88, 106, 100), "red", "small")),
    "probe", ("car", "motorcycle", "bus", "bicycle"),
)


@dataclass
class Probe:
    name: str
    metadata: dict
    gold: str  # the answer text
    wrong: list[str]  # wrong answer texts (the family's hard negatives)
    boxes: bool  # the answer is made of boxes


def probes() -> list[Probe]:
    """One question per built-in family (plain and thinking), and one legacy counting record."""
    from vlmtune.tasks.families import FAMILIES

    found = []
    for name, task in FAMILIES.items():
        questions = [q for q in task.questions(PROBE, random.Random(0)) if q is not None]
        q = questions[0]
        gold = answers.render(q.kind, q.answer, q.extra)
        wrong = [answers.render(q.kind, n.answer, q.extra) for n in task.negatives(q, PROBE)][:4]
        for think in (False, True):
            meta = {"family": name, "kind": q.kind, "answer": q.answer, "hops": q.hops, "think": think,
                    "extra": q.extra, "program": q.program}
            found.append(Probe(f"{name}{' (think)' if think else ''}", {"task": meta}, gold, wrong,
                               q.kind in ("box", "boxes")))
    counts = found[0].metadata["task"]["answer"]
    found.append(Probe("count (legacy record)", {"counts": counts}, found[0].gold, found[0].wrong, False))
    return found


def _spam(probe: Probe) -> list[str]:
    if probe.boxes:
        grid = [[x, y, x + 14, y + 14] for x in range(0, 112, 14) for y in range(0, 112, 14)]
        return [answers.render("boxes", grid, {}), probe.gold + ", " + answers.render("boxes", grid, {})]
    return [" ".join(str(n) for n in range(30)), ", ".join([probe.gold] * 30)]


def _blocks(answer: str) -> str:
    return f"<think>Let me look.</think><answer>{answer}</answer>"


CASES: dict[str, Callable[[Probe], list[str]]] = {
    "empty answer": lambda p: ["", "<answer></answer>", "<think>Let me look.</think><answer> </answer>"],
    "tags only": lambda p: ["<think></think><answer></answer>", "<answer>", "<think></think>"],
    "two answers": lambda p: [f"<answer>{p.gold}</answer><answer>{p.wrong[0]}</answer>",
                              f"<answer>{p.wrong[0]}</answer><answer>{p.gold}</answer>",
                              f"{_blocks(p.gold)}<answer>{p.gold}</answer>"],
    "answer only inside <think>": lambda p: [f"<think>The answer is {p.gold}.</think>",
                                             f"<think>{p.gold}</think><answer></answer>",
                                             f"<think>{p.gold}</think> {p.gold}"],
    "every option listed": lambda p: [_blocks(", ".join([p.gold, *p.wrong])), ", ".join([p.gold, *p.wrong]),
                                      _blocks(" ".join([*p.wrong, p.gold])), _blocks("\n".join([p.gold, *p.wrong]))],
    "A or B": lambda p: [_blocks(f"{p.gold} or {p.wrong[0]}"), f"{p.wrong[0]} or {p.gold}",
                         _blocks(f"either {p.gold} or {p.wrong[-1]}")],
    "boxes spammed": lambda p: [_blocks(s) for s in _spam(p)] + _spam(p),
    "over-long answer": lambda p: [_blocks(f"{p.gold}. " + "I am sure about this because " * 30),
                                   "I counted carefully. " * 30 + p.gold, _blocks(" ".join([p.gold] * 40))],
}


@dataclass
class CheckRow:
    reward: str
    paid: dict[str, float]  # case -> the most it paid on any probe
    gold: float  # mean over probes of the gold completions' reward

    @property
    def ok(self) -> bool:
        return all(v <= 0 for v in self.paid.values()) and self.gold > 0


def _counts(probe: Probe) -> dict[str, int]:
    """The ``counts`` column that counting rewards read: the probe scene's counts."""
    return {c: sum(o.cls == c for o in PROBE.objects) for c in PROBE.classes}


def _call(function: Callable, completions: list[str], probe: Probe) -> list[float]:
    n = len(completions)
    return list(function(completions, counts=[_counts(probe)] * n, metadata=[probe.metadata] * n, prompts=[[]] * n))


def check_reward(label: str, function: Callable) -> CheckRow:
    """Score every case on every probe (and the gold completions) with one reward function."""
    paid = {case: 0.0 for case in CASES}
    gold_scores = []
    for probe in probes():
        think = bool(probe.metadata.get("task", {}).get("think"))
        gold = render_completion(probe.gold, ["Looking at the image."], think)
        gold_scores.append(_call(function, [gold], probe)[0])
        for case, make in CASES.items():
            completions = make(probe)
            paid[case] = max(paid[case], max(_call(function, completions, probe)))
    return CheckRow(label, paid, sum(gold_scores) / len(gold_scores))
