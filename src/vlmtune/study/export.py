"""Votes back into preference records: the human-feedback loop closed.

chosen = the answer the raters preferred, rejected = the other one, prompt and images from the
study's record. By default one record per item from the majority of its votes (the label with
strictly the most votes; an item whose majority is tie or both bad, or with no strict majority,
is dropped). With ``per_vote`` every A/B vote is its own record (ties and both-bad dropped).
Every drop is counted and reported, never silent.
"""

from __future__ import annotations

import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from vlmtune.data.records import PreferenceRecord
from vlmtune.study.db import load_answers, load_record, load_votes, study_info


@dataclass
class ExportSummary:
    mode: str = "majority"  # or "per-vote"
    items_voted: int = 0
    votes: int = 0
    written: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count

    def describe(self) -> str:
        unit = "votes" if self.mode == "per-vote" else "items"
        drops = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())) or "none"
        return (
            f"{self.written} preference records from {self.votes} votes on {self.items_voted} items "
            f"({self.mode}); dropped {unit}: {drops}"
        )


def majority(winners: list[str]) -> str | None:
    """The label with strictly the most votes, or None when the top is shared."""
    ranked = Counter(winners).most_common()
    if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def export_pairs(conn: sqlite3.Connection, per_vote: bool = False) -> tuple[list[PreferenceRecord], ExportSummary]:
    votes = load_votes(conn)
    study = study_info(conn)["name"]
    summary = ExportSummary(mode="per-vote" if per_vote else "majority", votes=len(votes))
    by_item: dict[int, list] = defaultdict(list)
    for vote in votes:
        by_item[vote.item_id].append(vote)
    summary.items_voted = len(by_item)
    records = []
    for item_id, item_votes in sorted(by_item.items()):
        record, answers = load_record(conn, item_id), load_answers(conn, item_id)
        tally = dict(Counter(v.winner for v in item_votes))
        if per_vote:
            for vote in item_votes:
                if vote.winner in ("A", "B"):
                    records.append(_pair(record, answers, vote.winner, f"{record.id}-vote{vote.id}", study, tally))
                else:
                    summary.dropped[vote.winner] += 1
            continue
        winner = majority([v.winner for v in item_votes])
        if winner in ("A", "B"):
            records.append(_pair(record, answers, winner, f"{record.id}-human", study, tally))
        else:
            summary.dropped["no majority" if winner is None else f"majority {winner}"] += 1
    summary.written = len(records)
    return records, summary


def _pair(record: PreferenceRecord, answers: dict[str, str], winner: str, new_id: str, study: str,
          tally: dict[str, int]) -> PreferenceRecord:
    loser = "B" if winner == "A" else "A"
    metadata = dict(record.metadata)
    if "strategy" in metadata:
        metadata["source_strategy"] = metadata["strategy"]
    metadata.update(
        strategy="human_preference",
        source_id=record.id,
        study={"name": study, "chosen_model": winner, "votes": tally},
    )
    return PreferenceRecord(
        id=new_id,
        images=list(record.images),
        prompt=record.prompt,
        chosen=answers[winner],
        rejected=answers[loser],
        metadata=metadata,
    )
