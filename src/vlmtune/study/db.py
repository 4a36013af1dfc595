"""The study's SQLite file: schema, creation, raters and the reads that stats and export need.

One file per study, in WAL mode so the web app's readers never block its one writer. Every
write that must not happen twice is guarded by a UNIQUE constraint, not by application logic
alone: a rater sees an item at most once (``assignments``), and an assignment holds at most
one vote (``votes``).

Models are stored as the sides ``"A"`` and ``"B"``; what a rater sees as left or right is
decided per rater x item when the item is assigned (``assignments.a_on_left``). The ``meta`` key
``data_root`` holds the images root (``vlmtune.study.images``; the key's name is older than that).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError

SCHEMA = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL,
    category TEXT NOT NULL
);
CREATE TABLE answers (
    item_id INTEGER NOT NULL REFERENCES items(id),
    model TEXT NOT NULL CHECK (model IN ('A', 'B')),
    text TEXT NOT NULL,
    PRIMARY KEY (item_id, model)
);
CREATE TABLE raters (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token TEXT NOT NULL UNIQUE,
    csrf TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE assignments (
    id INTEGER PRIMARY KEY,
    rater_id INTEGER NOT NULL REFERENCES raters(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    a_on_left INTEGER NOT NULL CHECK (a_on_left IN (0, 1)),
    created_at TEXT NOT NULL,
    UNIQUE (rater_id, item_id)
);
CREATE TABLE votes (
    id INTEGER PRIMARY KEY,
    assignment_id INTEGER NOT NULL UNIQUE REFERENCES assignments(id),
    rater_id INTEGER NOT NULL REFERENCES raters(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'both_bad')),
    winner TEXT NOT NULL CHECK (winner IN ('A', 'B', 'tie', 'both_bad')),
    comment TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    UNIQUE (rater_id, item_id)
);
CREATE INDEX assignments_item ON assignments(item_id);
"""


@dataclass(frozen=True)
class StudyItem:
    """One record to rate with both models' answers."""

    record: PreferenceRecord
    answer_a: str
    answer_b: str
    category: str


@dataclass(frozen=True)
class Rater:
    id: int
    name: str
    token: str
    csrf: str


@dataclass(frozen=True)
class Vote:
    """A stored vote, in model terms (``winner`` is A, B, tie or both_bad)."""

    id: int
    rater: str
    item_id: int
    record_id: str
    category: str
    winner: str
    comment: str


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect(db_path: str | Path) -> sqlite3.Connection:
    """Open an existing study. Autocommit mode: writers open ``BEGIN IMMEDIATE`` themselves."""
    path = Path(db_path)
    if not path.is_file():
        raise VlmtuneError(f"{path}: no study database here; create one with `vlmtune study create`")
    conn = _open(path)
    try:
        conn.execute("SELECT value FROM meta WHERE key = 'name'").fetchone()
    except sqlite3.DatabaseError as e:
        conn.close()
        raise VlmtuneError(f"{path}: not a study database ({e})") from e
    return conn


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def create_study(
    db_path: str | Path,
    name: str,
    items: list[StudyItem],
    raters_per_item: int,
    info: dict[str, str],
) -> str:
    """Write a new study file with its items and answers; returns the admin token."""
    path = Path(db_path)
    if path.exists():
        raise VlmtuneError(f"{path} already exists; pick another --db or delete the old study first")
    if raters_per_item < 1:
        raise VlmtuneError(f"--raters-per-item must be at least 1, got {raters_per_item}")
    if not items:
        raise VlmtuneError("the study has no items: the data file gave no usable record")
    seen: set[str] = set()
    for item in items:
        if item.record.id in seen:
            raise VlmtuneError(f"record id {item.record.id!r} appears twice in the data; ids must be unique")
        seen.add(item.record.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    admin_token = secrets.token_urlsafe(32)
    conn = _open(path)
    conn.execute("PRAGMA journal_mode = WAL")
    # executescript commits on its own, so the schema goes first, then the rows in one transaction.
    conn.executescript(SCHEMA)
    with transaction(conn):
        meta = {
            "name": name,
            "raters_per_item": str(raters_per_item),
            "admin_token": admin_token,
            "created_at": now(),
            **info,
        }
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
        for item in items:
            cur = conn.execute(
                "INSERT INTO items (record_id, record, category) VALUES (?, ?, ?)",
                (item.record.id, json.dumps(item.record.to_dict()), item.category),
            )
            conn.executemany(
                "INSERT INTO answers (item_id, model, text) VALUES (?, ?, ?)",
                [(cur.lastrowid, "A", item.answer_a), (cur.lastrowid, "B", item.answer_b)],
            )
    conn.close()
    return admin_token


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, ``ROLLBACK`` on any error: one writer at a time."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def study_info(conn: sqlite3.Connection) -> dict[str, str]:
    return {row["key"]: row["value"] for row in conn.execute("SELECT key, value FROM meta")}


def raters_per_item(conn: sqlite3.Connection) -> int:
    return int(study_info(conn)["raters_per_item"])


def add_rater(conn: sqlite3.Connection, name: str) -> Rater:
    """A new rater with a random link token and a separate CSRF token for its forms."""
    name = name.strip()
    if not name:
        raise VlmtuneError("a rater needs a non-empty name")
    token, csrf = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    try:
        with transaction(conn):
            cur = conn.execute(
                "INSERT INTO raters (name, token, csrf, created_at) VALUES (?, ?, ?, ?)",
                (name, token, csrf, now()),
            )
    except sqlite3.IntegrityError as e:
        raise VlmtuneError(f"a rater named {name!r} already exists; pick another name") from e
    return Rater(cur.lastrowid, name, token, csrf)


def raters_with_votes(conn: sqlite3.Connection) -> list[tuple[Rater, int]]:
    """Every rater, in the order they were added, with the number of votes they cast."""
    rows = conn.execute(
        "SELECT r.id, r.name, r.token, r.csrf, COUNT(v.id) AS n FROM raters r "
        "LEFT JOIN votes v ON v.rater_id = r.id GROUP BY r.id ORDER BY r.id"
    )
    return [(Rater(r["id"], r["name"], r["token"], r["csrf"]), r["n"]) for r in rows]


def rater_by_token(conn: sqlite3.Connection, token: str) -> Rater | None:
    row = conn.execute("SELECT id, name, token, csrf FROM raters WHERE token = ?", (token,)).fetchone()
    if row is None or not secrets.compare_digest(row["token"], token):
        return None
    return Rater(row["id"], row["name"], row["token"], row["csrf"])


def is_admin(conn: sqlite3.Connection, token: str) -> bool:
    return secrets.compare_digest(study_info(conn)["admin_token"].encode(), token.encode())


def load_record(conn: sqlite3.Connection, item_id: int) -> PreferenceRecord | None:
    row = conn.execute("SELECT record FROM items WHERE id = ?", (item_id,)).fetchone()
    return None if row is None else PreferenceRecord.from_dict(json.loads(row["record"]))


def load_answers(conn: sqlite3.Connection, item_id: int) -> dict[str, str]:
    rows = conn.execute("SELECT model, text FROM answers WHERE item_id = ?", (item_id,))
    return {row["model"]: row["text"] for row in rows}


def count_items(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]


def load_votes(conn: sqlite3.Connection) -> list[Vote]:
    rows = conn.execute(
        "SELECT v.id, r.name, v.item_id, i.record_id, i.category, v.winner, v.comment "
        "FROM votes v JOIN raters r ON r.id = v.rater_id JOIN items i ON i.id = v.item_id "
        "ORDER BY v.id"
    )
    return [Vote(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]
