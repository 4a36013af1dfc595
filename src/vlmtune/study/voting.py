"""Which item a rater sees next, and storing the rater's vote on it.

Balanced assignment: a rater first gets back the item already assigned to them and not yet
voted on (so a reload or a return the next day resumes exactly there); otherwise the item with
the fewest assignments (completed + pending) that is still below the study's ``raters_per_item``
and that this rater has never been given. Ties go to the lowest item id, so items fill up in
order instead of all being half-rated at the end. Each choice runs inside ``BEGIN IMMEDIATE``,
so two raters asking at once never push an item past N.

Left/right is drawn per rater x item when the item is assigned and stored, so it is stable on
reload and independent between raters.
"""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass

from vlmtune.errors import VlmtuneError
from vlmtune.study.db import now, transaction

CHOICES = ("left", "right", "tie", "both_bad")
MAX_COMMENT = 2000


class VoteRejected(VlmtuneError):
    """A vote that must not be stored; ``status`` is the HTTP status the web app answers with."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Assignment:
    id: int
    rater_id: int
    item_id: int
    a_on_left: bool


def next_assignment(conn: sqlite3.Connection, rater_id: int, raters_per_item: int) -> Assignment | None:
    """The rater's pending item, else a newly assigned one, else None (nothing left for them)."""
    with transaction(conn):
        pending = _pending(conn, rater_id)
        if pending is not None:
            return pending
        row = conn.execute(
            "SELECT i.id, COUNT(a.id) AS n FROM items i "
            "LEFT JOIN assignments a ON a.item_id = i.id "
            "WHERE i.id NOT IN (SELECT item_id FROM assignments WHERE rater_id = ?) "
            "GROUP BY i.id HAVING n < ? ORDER BY n, i.id LIMIT 1",
            (rater_id, raters_per_item),
        ).fetchone()
        if row is None:
            return None
        a_on_left = secrets.randbelow(2) == 1
        cur = conn.execute(
            "INSERT INTO assignments (rater_id, item_id, a_on_left, created_at) VALUES (?, ?, ?, ?)",
            (rater_id, row["id"], int(a_on_left), now()),
        )
        return Assignment(cur.lastrowid, rater_id, row["id"], a_on_left)


def _pending(conn: sqlite3.Connection, rater_id: int) -> Assignment | None:
    row = conn.execute(
        "SELECT a.id, a.item_id, a.a_on_left FROM assignments a "
        "LEFT JOIN votes v ON v.assignment_id = a.id "
        "WHERE a.rater_id = ? AND v.id IS NULL ORDER BY a.id LIMIT 1",
        (rater_id,),
    ).fetchone()
    if row is None:
        return None
    return Assignment(row["id"], rater_id, row["item_id"], bool(row["a_on_left"]))


def find_assignment(conn: sqlite3.Connection, rater_id: int, item_id: int) -> Assignment | None:
    row = conn.execute(
        "SELECT id, a_on_left FROM assignments WHERE rater_id = ? AND item_id = ?",
        (rater_id, item_id),
    ).fetchone()
    if row is None:
        return None
    return Assignment(row["id"], rater_id, item_id, bool(row["a_on_left"]))


def winner_of(choice: str, a_on_left: bool) -> str:
    """Translate what the rater clicked (left/right/tie/both_bad) into model terms (A/B/...)."""
    if choice == "left":
        return "A" if a_on_left else "B"
    if choice == "right":
        return "B" if a_on_left else "A"
    return choice


def record_vote(conn: sqlite3.Connection, rater_id: int, item_id: int, choice: str, comment: str = "") -> int:
    """Store one vote; raises VoteRejected (and writes nothing) when it must not be stored."""
    if choice not in CHOICES:
        raise VoteRejected(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}", 400)
    if len(comment) > MAX_COMMENT:
        raise VoteRejected(f"comment is longer than {MAX_COMMENT} characters", 400)
    try:
        with transaction(conn):
            if conn.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is None:
                raise VoteRejected(f"no item {item_id} in this study", 404)
            assignment = find_assignment(conn, rater_id, item_id)
            if assignment is None:
                raise VoteRejected(f"item {item_id} is not assigned to you", 409)
            if conn.execute("SELECT 1 FROM votes WHERE assignment_id = ?", (assignment.id,)).fetchone():
                raise VoteRejected(f"you already voted on item {item_id}", 409)
            cur = conn.execute(
                "INSERT INTO votes (assignment_id, rater_id, item_id, choice, winner, comment, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (assignment.id, rater_id, item_id, choice, winner_of(choice, assignment.a_on_left),
                 comment.strip(), now()),
            )
            return cur.lastrowid
    except sqlite3.IntegrityError as e:  # the UNIQUE constraints are the last line of defence
        raise VoteRejected(f"you already voted on item {item_id}", 409) from e


def progress(conn: sqlite3.Connection, rater_id: int) -> tuple[int, int]:
    """(votes this rater has cast, items in the study: the most one rater can rate)."""
    done = conn.execute("SELECT COUNT(*) FROM votes WHERE rater_id = ?", (rater_id,)).fetchone()[0]
    return done, conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]


def study_progress(conn: sqlite3.Connection, raters_per_item: int) -> dict[str, int]:
    """Counts for the admin page: items, votes cast, votes wanted, pending assignments."""
    items = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    votes = conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
    assigned = conn.execute("SELECT COUNT(*) FROM assignments").fetchone()[0]
    complete = conn.execute(
        "SELECT COUNT(*) FROM (SELECT item_id FROM votes GROUP BY item_id HAVING COUNT(*) >= ?)",
        (raters_per_item,),
    ).fetchone()[0]
    return {
        "items": items,
        "votes": votes,
        "wanted": items * raters_per_item,
        "pending": assigned - votes,
        "complete_items": complete,
    }
