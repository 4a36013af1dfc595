"""The whole study flow on the tiny model: `study create` generates model A's answers, a rater
votes, `study export` writes preference records that the data readers take back."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmtune.cli import main
from vlmtune.data.formats import read_records
from vlmtune.errors import VlmtuneError
from vlmtune.study import db, voting
from vlmtune.study.create import build_study


@pytest.fixture
def inputs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows, b = [], []
    for i in range(3):
        Image.new("RGB", (56, 56), (60 * i, 120, 90)).save(data / f"img{i}.png")
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the vehicles."}]}]
        rows.append({"id": f"r{i}", "images": [f"img{i}.png"], "prompt": prompt, "chosen": "c", "rejected": "r",
                     "metadata": {"strategy": "swap" if i else "drop"}})
        b.append({"id": f"r{i}", "answer": f"There are {i} cars."})
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b))
    return data / "pairs.jsonl", tmp_path / "b.jsonl"


def test_create_generates_with_the_tiny_model_and_exports_pairs(tmp_path, inputs, tiny_model_dir, capsys):
    from vlmtune.eval.run import load_for_eval
    from vlmtune.generate import generate

    data, b = inputs
    dbp = str(tmp_path / "s.sqlite")
    assert main(["study", "create", "--db", dbp, "--name", "tiny", "--data", str(data), "--a", str(tiny_model_dir),
                 "--b", str(b), "--raters-per-item", "1", "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    assert "3 items" in capsys.readouterr().out
    records = read_records(data)
    model, processor = load_for_eval(str(tiny_model_dir))
    direct = generate(model, processor, [(r.images, r.prompt) for r in records], max_new_tokens=6, batch_size=2)
    conn = db.connect(dbp)
    stored = {r[0]: r[1] for r in conn.execute(
        "SELECT i.record_id, a.text FROM answers a JOIN items i ON i.id = a.item_id WHERE a.model = 'A'")}
    assert stored == {r.id: text for r, text in zip(records, direct)}
    assert {r[0] for r in conn.execute("SELECT category FROM items")} == {"drop", "swap"}

    rater = db.add_rater(conn, "ann")
    while (got := voting.next_assignment(conn, rater.id, 1)) is not None:
        voting.record_vote(conn, rater.id, got.item_id, "right" if got.a_on_left else "left")  # B each time
    out = tmp_path / "human.jsonl"
    assert main(["study", "export", "--db", dbp, "--out", str(out), "--per-vote"]) == 0
    exported = read_records(out)
    assert [(r.chosen, r.rejected) for r in exported] == [(f"There are {i} cars.", stored[f"r{i}"]) for i in range(3)]
    assert all(r.images == rec.images and r.prompt == rec.prompt for r, rec in zip(exported, records))
    assert exported[1].metadata["strategy"] == "human_preference"
    assert exported[1].metadata["source_strategy"] == "swap"


def test_adapter_needs_a_model(tmp_path, inputs):
    data, b = inputs
    with pytest.raises(VlmtuneError, match="only applies to a model"):
        build_study(tmp_path / "s.sqlite", "t", data, str(b), str(b), a_adapter=str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(VlmtuneError, match="neither a `vlmtune infer` answers file"):
        build_study(tmp_path / "s.sqlite", "t", data, str(tmp_path / "notes.txt"), str(b))
