"""A study's results from its votes: win rates overall and per category, rater agreement, text.

Pure over a list of ``db.Vote``; the CLI and the admin page both call ``summarize``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations

from vlmtune.study.db import Vote
from vlmtune.study.stats import LABELS, WinRate, cohen_kappa, fleiss_kappa, win_rate


@dataclass(frozen=True)
class PairAgreement:
    first: str
    second: str
    n_common: int
    kappa: float | None


@dataclass
class Results:
    overall: WinRate
    categories: dict[str, WinRate]
    raters: dict[str, WinRate]
    pairs: list[PairAgreement]
    fleiss: float | None
    fleiss_items: int
    raters_per_item: int
    comments: list[tuple[str, str, str]] = field(default_factory=list)  # (record id, rater, text)


def summarize(votes: list[Vote], raters_per_item: int) -> Results:
    by_category: dict[str, list[str]] = defaultdict(list)
    by_rater: dict[str, list[str]] = defaultdict(list)
    for vote in votes:
        by_category[vote.category].append(vote.winner)
        by_rater[vote.rater].append(vote.winner)
    fleiss, fleiss_items = _fleiss(votes, raters_per_item)
    return Results(
        overall=win_rate([v.winner for v in votes]),
        categories={c: win_rate(w) for c, w in sorted(by_category.items())},
        raters={r: win_rate(w) for r, w in sorted(by_rater.items())},
        pairs=pairwise_agreement(votes),
        fleiss=fleiss,
        fleiss_items=fleiss_items,
        raters_per_item=raters_per_item,
        comments=[(v.record_id, v.rater, v.comment) for v in votes if v.comment],
    )


def pairwise_agreement(votes: list[Vote]) -> list[PairAgreement]:
    """Cohen's kappa for every pair of raters over the items both of them rated."""
    labels: dict[str, dict[int, str]] = defaultdict(dict)
    for vote in votes:
        labels[vote.rater][vote.item_id] = vote.winner
    pairs = []
    for first, second in combinations(sorted(labels), 2):
        common = sorted(set(labels[first]) & set(labels[second]))
        if not common:
            continue
        kappa = cohen_kappa([labels[first][i] for i in common], [labels[second][i] for i in common])
        pairs.append(PairAgreement(first, second, len(common), kappa))
    return pairs


def _fleiss(votes: list[Vote], raters_per_item: int) -> tuple[float | None, int]:
    """Fleiss' kappa over the items that have exactly ``raters_per_item`` (>= 2) ratings."""
    per_item: dict[int, Counter] = defaultdict(Counter)
    for vote in votes:
        per_item[vote.item_id][vote.winner] += 1
    table = [[c[label] for label in LABELS] for c in per_item.values() if sum(c.values()) == raters_per_item]
    if raters_per_item < 2 or not table:
        return None, 0
    return fleiss_kappa(table), len(table)


def _rate(rate: float | None, ci: tuple[float, float]) -> str:
    if rate is None:
        return "n/a"
    return f"{rate:6.1%}  [{ci[0]:.1%}, {ci[1]:.1%}]"


def _kappa(k: float | None) -> str:
    return "n/a" if k is None else f"{k:.3f}"


def format_results(results: Results, name: str = "") -> str:
    """The plain-text report `vlmtune study results` prints."""
    o = results.overall
    lines = [
        f"study {name}: {o.n} votes (A wins {o.a}, B wins {o.b}, ties {o.ties}, both bad {o.both_bad})",
        "",
        "win rate of B over A, 95% Wilson interval:",
        f"  ties as half  (B + ties/2) / (A + B + ties): {_rate(o.rate, o.ci)}   n={o.a + o.b + o.ties}",
        f"  ties excluded  B / (A + B):                  {_rate(o.rate_no_ties, o.ci_no_ties)}   n={o.a + o.b}",
        f"  both bad (not in either rate): {o.both_bad} of {o.n} votes",
        "",
        "per category (ties as half):",
    ]
    width = max([len(c) for c in results.categories] + [8])
    for category, w in results.categories.items():
        lines.append(
            f"  {category:<{width}}  {_rate(w.rate, w.ci)}  "
            f"A {w.a:3d}  B {w.b:3d}  tie {w.ties:3d}  both bad {w.both_bad:3d}"
        )
    lines += ["", "per rater (ties as half):"]
    width = max([len(r) for r in results.raters] + [8])
    for rater, w in results.raters.items():
        lines.append(f"  {rater:<{width}}  {w.n:4d} votes  B win rate {_rate(w.rate, w.ci)}")
    lines += ["", "agreement (labels A / B / tie / both bad):"]
    for p in results.pairs:
        lines.append(f"  Cohen's kappa {p.first} vs {p.second}: {_kappa(p.kappa)}  ({p.n_common} common items)")
    if results.fleiss_items:
        lines.append(
            f"  Fleiss' kappa over {results.fleiss_items} items with {results.raters_per_item} ratings: "
            f"{_kappa(results.fleiss)}"
        )
    elif results.raters_per_item < 2:
        lines.append("  Fleiss' kappa: needs 2 or more raters per item (this study has 1)")
    else:
        lines.append(f"  Fleiss' kappa: no item has its {results.raters_per_item} ratings yet")
    return "\n".join(lines)


def results_dict(results: Results) -> dict:
    """JSON-ready form of the results (for `--json` and the admin page's data)."""

    def wr(w: WinRate) -> dict:
        return {
            "a": w.a, "b": w.b, "ties": w.ties, "both_bad": w.both_bad,
            "win_rate": w.rate, "ci": list(w.ci),
            "win_rate_no_ties": w.rate_no_ties, "ci_no_ties": list(w.ci_no_ties),
        }

    return {
        "overall": wr(results.overall),
        "categories": {c: wr(w) for c, w in results.categories.items()},
        "raters": {r: wr(w) for r, w in results.raters.items()},
        "cohen_kappa": [
            {"raters": [p.first, p.second], "n": p.n_common, "kappa": p.kappa} for p in results.pairs
        ],
        "fleiss_kappa": results.fleiss,
        "fleiss_items": results.fleiss_items,
    }
