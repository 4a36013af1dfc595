"""Study creation, balanced assignment, vote storage, results and export, without the server."""

from __future__ import annotations

import json
import os
import random
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.cli import main
from vlmtune.data.formats import read_records
from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError
from vlmtune.study import db, voting
from vlmtune.study.create import build_study, is_answers_file
from vlmtune.study.export import export_pairs
from vlmtune.study.images import images_root, safe_image_path
from vlmtune.study.summary import summarize


def make_inputs(folder: Path, n: int, categories=("grid", "free")) -> tuple[Path, Path, Path]:
    """A data file with n records (one PIL image each) and two `vlmtune infer`-style answer files."""
    data = folder / "data"
    data.mkdir(parents=True)
    rows, a, b = [], [], []
    for i in range(n):
        Image.new("RGB", (32, 24), (10 * i % 255, 90, 160)).save(data / f"img{i}.png")
        text = {"type": "text", "text": f"Count the vehicles ({i})."}
        prompt = [{"role": "user", "content": [{"type": "image"}, text]}]
        meta = {"category": categories[i % len(categories)]}
        rows.append({"id": f"r{i}", "images": [f"img{i}.png"], "prompt": prompt, "chosen": "c", "rejected": "r",
                     "metadata": meta})
        a.append({"id": f"r{i}", "images": [f"img{i}.png"], "prompt": prompt, "answer": f"There are {i} cars.",
                  "metadata": meta})
        b.append({"id": f"r{i}", "images": [f"img{i}.png"], "prompt": prompt, "answer": f"There are {i + 1} cars.",
                  "metadata": meta})
    paths = data / "pairs.jsonl", folder / "a.jsonl", folder / "b.jsonl"
    for path, content in zip(paths, (rows, a, b)):
        path.write_text("".join(json.dumps(r) + "\n" for r in content))
    return paths


@pytest.fixture
def study(tmp_path) -> Path:
    data, a, b = make_inputs(tmp_path, 6)
    build_study(tmp_path / "s.sqlite", "t", data, str(a), str(b), raters_per_item=2)
    return tmp_path / "s.sqlite"


def test_create_stores_items_answers_and_wal(study):
    conn = db.connect(study)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.count_items(conn) == 6
    item = conn.execute("SELECT id FROM items WHERE record_id = 'r3'").fetchone()[0]
    assert db.load_answers(conn, item) == {"A": "There are 3 cars.", "B": "There are 4 cars."}
    record = db.load_record(conn, item)
    assert Path(record.images[0]).is_absolute() and Path(record.images[0]).name == "img3.png"
    info = db.study_info(conn)
    assert info["raters_per_item"] == "2" and len(info["admin_token"]) >= 40
    assert Path(info["data_root"]) == study.parent / "data"


def test_schema_refuses_a_second_vote_on_the_same_assignment(study):
    conn = db.connect(study)
    rater = db.add_rater(conn, "ann")
    got = voting.next_assignment(conn, rater.id, 2)
    voting.record_vote(conn, rater.id, got.item_id, "left")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO votes (assignment_id, rater_id, item_id, choice, winner, created_at) "
            "VALUES (?, ?, ?, 'tie', 'tie', 'now')", (got.id, rater.id, got.item_id))
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO assignments (rater_id, item_id, a_on_left, created_at) VALUES (?, ?, 1, 'now')",
                     (rater.id, got.item_id))


def test_balanced_assignment_fills_every_item_to_n_without_repeats(study):
    conn = db.connect(study)
    raters = [db.add_rater(conn, name) for name in ("ann", "bob", "cy")]
    seen: dict[int, list[int]] = {r.id: [] for r in raters}
    active = list(raters)
    while active:
        for rater in list(active):
            got = voting.next_assignment(conn, rater.id, 2)
            if got is None:
                active.remove(rater)
                continue
            # the fewest-rated item goes first: no item is ahead of another by more than one rating
            counts = Counter(r[0] for r in conn.execute("SELECT item_id FROM assignments"))
            assert max(counts.values()) - min(counts.get(i, 0) for i in range(1, 7)) <= 2
            seen[rater.id].append(got.item_id)
            voting.record_vote(conn, rater.id, got.item_id, "right")
    per_item = Counter(i for items in seen.values() for i in items)
    assert per_item == {i: 2 for i in range(1, 7)}
    assert all(len(items) == len(set(items)) for items in seen.values())
    assert sum(len(items) for items in seen.values()) == 12


def test_pending_item_comes_back_with_the_same_sides(study):
    conn = db.connect(study)
    rater = db.add_rater(conn, "ann")
    first = voting.next_assignment(conn, rater.id, 2)
    again = voting.next_assignment(conn, rater.id, 2)
    assert again == first
    assert conn.execute("SELECT COUNT(*) FROM assignments").fetchone()[0] == 1


def test_bad_votes_write_nothing(study):
    conn = db.connect(study)
    ann, bob = db.add_rater(conn, "ann"), db.add_rater(conn, "bob")
    got = voting.next_assignment(conn, ann.id, 2)
    cases = [
        (bob.id, got.item_id, "left", 409, "not assigned"),
        (ann.id, 999, "left", 404, "no item"),
        (ann.id, got.item_id, "middle", 400, "choice must be"),
    ]
    for rater_id, item, choice, status, text in cases:
        with pytest.raises(voting.VoteRejected, match=text) as e:
            voting.record_vote(conn, rater_id, item, choice)
        assert e.value.status == status
    assert conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0] == 0
    voting.record_vote(conn, ann.id, got.item_id, "tie", "  close call ")
    with pytest.raises(voting.VoteRejected, match="already voted") as e:
        voting.record_vote(conn, ann.id, got.item_id, "left")
    assert e.value.status == 409
    stored = [tuple(r) for r in conn.execute("SELECT choice, winner, comment FROM votes")]
    assert stored == [("tie", "tie", "close call")]


def test_create_rejects_bad_input_with_clear_messages(tmp_path):
    data, a, b = make_inputs(tmp_path, 3)
    short = tmp_path / "short.jsonl"
    short.write_text("".join(line + "\n" for line in a.read_text().splitlines()[:2]))
    with pytest.raises(VlmtuneError, match=r"short.jsonl: no answer for 1 record.*'r2'"):
        build_study(tmp_path / "x.sqlite", "t", data, str(short), str(b))
    _, n = build_study(tmp_path / "y.sqlite", "t", data, str(short), str(b), skip_bad=True)
    assert n == 2
    with pytest.raises(VlmtuneError, match="already exists"):
        build_study(tmp_path / "y.sqlite", "t", data, str(a), str(b))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(a.read_text() + '{"id": "r9"}\n')
    with pytest.raises(VlmtuneError, match=r"broken.jsonl, line 4: an answers row needs"):
        build_study(tmp_path / "z.sqlite", "t", data, str(broken), str(b))
    assert not (tmp_path / "x.sqlite").exists() and not (tmp_path / "z.sqlite").exists()


def test_create_refuses_images_outside_the_given_root(tmp_path):
    data, a, b = make_inputs(tmp_path, 2)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[1]["images"] = ["../outside.png"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(VlmtuneError, match=r"record 'r1': image .*outside.png lies outside the images root .*data;"):
        build_study(tmp_path / "s.sqlite", "t", data, str(a), str(b), images=data.parent)
    assert not (tmp_path / "s.sqlite").exists()
    # without a root, the common folder of both images is the root
    build_study(tmp_path / "s.sqlite", "t", data, str(a), str(b))
    assert db.study_info(db.connect(tmp_path / "s.sqlite"))["data_root"] == os.path.realpath(tmp_path)


def record_with(*images: str) -> PreferenceRecord:
    prompt = [{"role": "user", "content": [{"type": "text", "text": "Count."}]}]
    return PreferenceRecord(id="x", images=list(images), prompt=prompt, chosen="c", rejected="r")


def test_images_root_is_the_common_folder_never_the_file_system_root(tmp_path):
    records = [record_with("/srv/scenes/a/1.png"), record_with("/srv/scenes/b/2.png", "/srv/scenes/a/3.png")]
    assert images_root(records, None, tmp_path) == Path(os.path.realpath("/srv/scenes"))
    assert images_root([record_with()], None, tmp_path) == Path(os.path.realpath(tmp_path))  # no image
    assert images_root(records, tmp_path, Path("/nowhere")) == Path(os.path.realpath(tmp_path))
    with pytest.raises(VlmtuneError, match=r"share no folder but / \(e.g. /opt/a and /srv/b\); pass --images-root"):
        images_root([record_with("/srv/b/1.png"), record_with("/opt/a/2.png")], None, tmp_path)
    with pytest.raises(VlmtuneError, match="--images-root .*missing: no such folder"):
        images_root(records, tmp_path / "missing", tmp_path)


def test_cli_create_on_synth_pairs_derives_the_images_root(tmp_path, capsys):
    scenes = tmp_path / "scenes"
    assert main(["data", "synth", "--out", str(scenes), "--n", "8", "--workers", "1", "--pairs"]) == 0
    pairs = scenes / "pairs" / "train.jsonl"
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    for side in ("a", "b"):
        answers = [{"id": r["id"], "answer": r["chosen" if side == "a" else "rejected"]} for r in rows]
        (tmp_path / f"{side}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers))
    capsys.readouterr()
    args = ["study", "create", "--name", "synth", "--data", str(pairs), "--a", str(tmp_path / "a.jsonl"),
            "--b", str(tmp_path / "b.jsonl")]
    assert main(args + ["--db", str(tmp_path / "s.sqlite")]) == 0
    out = capsys.readouterr().out
    assert f"{len(rows)} items" in out
    assert f"images served from {os.path.realpath(scenes / 'images')} (the common folder" in out
    conn = db.connect(tmp_path / "s.sqlite")
    record = db.load_record(conn, 1)
    assert safe_image_path(record.images[0], db.study_info(conn)["data_root"]) == os.path.realpath(record.images[0])

    assert main(args + ["--db", str(tmp_path / "t.sqlite"), "--images-root", str(scenes)]) == 0
    assert f"images served from {os.path.realpath(scenes)} (--images-root)" in capsys.readouterr().out
    assert main(args + ["--db", str(tmp_path / "u.sqlite"), "--images-root", str(scenes / "pairs")]) == 2
    err = capsys.readouterr().err
    assert f"record {rows[0]['id']!r}: image {scenes / 'images'}" in err and "lies outside the images root" in err
    assert not (tmp_path / "u.sqlite").exists()


def test_cli_create_refuses_a_symlink_out_of_the_root_naming_record_and_target(tmp_path, capsys):
    data, a, b = make_inputs(tmp_path, 3)
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    (data.parent / "img1.png").unlink()
    (data.parent / "img1.png").symlink_to(tmp_path / "secret.png")
    args = ["study", "create", "--name", "t", "--data", str(data), "--a", str(a), "--b", str(b)]
    assert main(args + ["--db", str(tmp_path / "s.sqlite")]) == 2
    err = capsys.readouterr().err
    assert (f"error: {data} record 'r1': image {data.parent / 'img1.png'} links to "
            f"{os.path.realpath(tmp_path / 'secret.png')}, outside the images root "
            f"{os.path.realpath(data.parent)}") in err
    assert not (tmp_path / "s.sqlite").exists()
    assert main(args + ["--db", str(tmp_path / "s.sqlite"), "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "2 items" in captured.out and f"skipped {data} record 'r1': image" in captured.err
    assert [v[0] for v in db.connect(tmp_path / "s.sqlite").execute("SELECT record_id FROM items")] == ["r0", "r2"]


def test_raters_with_votes_counts_each_raters_votes(study):
    conn = db.connect(study)
    ann, bob, cy = (db.add_rater(conn, name) for name in ("ann", "bob", "cy"))
    for rater, n in ((ann, 2), (cy, 1)):
        for _ in range(n):
            voting.record_vote(conn, rater.id, voting.next_assignment(conn, rater.id, 2).item_id, "tie")
    assert db.raters_with_votes(conn) == [(ann, 2), (bob, 0), (cy, 1)]


def test_answers_file_detection(tmp_path):
    _, a, _ = make_inputs(tmp_path, 1)
    assert is_answers_file(str(a))
    assert not is_answers_file(str(tmp_path / "data" / "pairs.jsonl"))
    assert not is_answers_file(str(tmp_path))  # a folder is a model


def simulate(conn: sqlite3.Connection, raters: list[db.Rater], n: int, p_b: float, seed: int = 0) -> None:
    """Raters vote until nothing is left. Each item has a true label (B with probability p_b, else A,
    tie or both bad); a rater gives it with probability 0.8, else a random label (noise)."""
    rng = random.Random(seed)
    labels = ["A", "B", "tie", "both_bad"]
    truth = {}
    for item in range(1, db.count_items(conn) + 1):
        u = rng.random()
        truth[item] = "B" if u < p_b else "A" if u < p_b + 0.15 else "tie" if u < p_b + 0.25 else "both_bad"
    active = list(raters)
    while active:
        for rater in list(active):
            got = voting.next_assignment(conn, rater.id, n)
            if got is None:
                active.remove(rater)
                continue
            winner = truth[got.item_id] if rng.random() < 0.8 else rng.choice(labels)
            side = {"A": "left", "B": "right"} if got.a_on_left else {"A": "right", "B": "left"}
            voting.record_vote(conn, rater.id, got.item_id, side.get(winner, winner))


def test_simulated_study_results_and_export(tmp_path):
    data, a, b = make_inputs(tmp_path, 20)
    build_study(tmp_path / "s.sqlite", "sim", data, str(a), str(b), raters_per_item=3)
    conn = db.connect(tmp_path / "s.sqlite")
    simulate(conn, [db.add_rater(conn, name) for name in ("ann", "bob", "cy")], 3, p_b=0.8)
    votes = db.load_votes(conn)
    assert len(votes) == 60
    results = summarize(votes, 3)
    o = results.overall
    assert o.a + o.b + o.ties + o.both_bad == 60 and o.b > o.a
    assert o.ci[0] > 0.5  # B is better, and the 95% interval says so
    assert set(results.categories) == {"grid", "free"}
    assert sum(w.n for w in results.categories.values()) == 60
    assert len(results.pairs) == 3 and all(p.n_common == 20 for p in results.pairs)
    assert results.fleiss_items == 20 and results.fleiss is not None

    records, summary = export_pairs(conn)
    assert summary.written + sum(summary.dropped.values()) == 20
    for record in records:
        item = conn.execute("SELECT id FROM items WHERE record_id = ?", (record.metadata["source_id"],)).fetchone()[0]
        winners = Counter(v.winner for v in votes if v.item_id == item)
        chosen_model = record.metadata["study"]["chosen_model"]
        assert winners[chosen_model] > max((c for w, c in winners.items() if w != chosen_model), default=0)
        assert record.chosen == db.load_answers(conn, item)[chosen_model]
    per_vote, summary = export_pairs(conn, per_vote=True)
    assert len(per_vote) == o.a + o.b and summary.dropped == Counter(tie=o.ties, both_bad=o.both_bad)


def test_cli_flow_create_raters_results_export(tmp_path, capsys):
    data, a, b = make_inputs(tmp_path, 4, categories=("all",))
    dbp = str(tmp_path / "s.sqlite")
    assert main(["study", "create", "--db", dbp, "--name", "cli", "--data", str(data), "--a", str(a), "--b", str(b),
                 "--raters-per-item", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 items" in out and "/admin/" in out
    assert main(["study", "raters", "add", "--db", dbp, "ann"]) == 0
    link = capsys.readouterr().out.strip()
    assert link.startswith("ann: http://127.0.0.1:8000/r/")
    assert main(["study", "raters", "add", "--db", dbp, "ann"]) == 2
    assert "already exists" in capsys.readouterr().err
    conn = db.connect(dbp)
    ann = db.rater_by_token(conn, link.rsplit("/", 1)[1])
    for _ in range(4):
        got = voting.next_assignment(conn, ann.id, 1)
        voting.record_vote(conn, ann.id, got.item_id, "left" if not got.a_on_left else "right")  # always B
    assert main(["study", "results", "--db", dbp]) == 0
    out = capsys.readouterr().out
    assert "B wins 4" in out and "100.0%" in out
    assert main(["study", "results", "--db", dbp, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"]["b"] == 4
    assert main(["study", "admin-link", "--db", dbp, "--base-url", "http://10.0.0.5:9000/"]) == 0
    assert capsys.readouterr().out.strip() == f"http://10.0.0.5:9000/admin/{db.study_info(conn)['admin_token']}"
    assert main(["study", "raters", "list", "--db", dbp]) == 0
    assert capsys.readouterr().out.startswith("ann: 4 votes  http://127.0.0.1:8000/r/")
    out_file = tmp_path / "human.jsonl"
    assert main(["study", "export", "--db", dbp, "--out", str(out_file)]) == 0
    assert "4 preference records" in capsys.readouterr().out
    records = read_records(out_file)
    assert len(records) == 4
    assert all(r.chosen == f"There are {int(r.metadata['source_id'][1:]) + 1} cars." for r in records)
    assert main(["study", "results", "--db", str(tmp_path / "nope.sqlite")]) == 2
    assert "no study database" in capsys.readouterr().err
