"""MME and LLaVA-Bench in their released layouts, scored by hand and through a real judge server."""

from __future__ import annotations

import json
import logging
import socket

import pytest
from fastapi import Request
from local_server import serve_in_thread
from PIL import Image

from vlmtune.cli import main
from vlmtune.errors import VlmtuneError
from vlmtune.eval.suites import mme_parse_answer, mme_scores, read_llava_bench, read_mme
from vlmtune.eval.judge import HttpJudge, judge_messages, parse_judge_scores


def _image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (112, 112), color).save(path)


# ----------------------------------------------------------------------------- MME
@pytest.fixture()
def mme_dir(tmp_path):
    """Two subtasks: 'existence' flat (image + txt side by side), 'artwork' with subfolders."""
    root = tmp_path / "MME"
    flat = root / "existence"
    _image(flat / "img1.png", "red")
    (flat / "img1.txt").write_text("Is there a car in this image?\tYes\nIs there a bus in this image?\tNo\n")
    _image(flat / "img2.jpg", "blue")
    (flat / "img2.txt").write_text("Is there a bicycle in this image?\tYes\nIs there a dog in this image?\tNo\n")
    art = root / "artwork"
    _image(art / "images" / "a1.jpg", "green")
    (art / "questions_answers_YN" / "a1.txt").parent.mkdir(parents=True)
    (art / "questions_answers_YN" / "a1.txt").write_text("Is this by Monet?\tYes\nIs this by Goya?\tNo\n")
    _image(art / "images" / "a2.jpg", "white")
    (art / "questions_answers_YN" / "a2.txt").write_text("Is this a fresco?\tYes\r\nIs this a sculpture?\tNo\r\n")
    return root


def test_mme_reads_both_layouts(mme_dir):
    questions = read_mme(mme_dir)
    assert [(q.subtask, q.answer) for q in questions] == [
        ("artwork", "yes"), ("artwork", "no"), ("artwork", "yes"), ("artwork", "no"),
        ("existence", "yes"), ("existence", "no"), ("existence", "yes"), ("existence", "no"),
    ]
    assert questions[0].image.endswith("artwork/images/a1.jpg")
    assert questions[6].image.endswith("existence/img2.jpg")
    assert questions[3].question == "Is this a sculpture?"


def test_mme_parse_answer_follows_the_official_rule():
    assert mme_parse_answer("Yes") == "yes"
    assert mme_parse_answer(" no.") == "no"
    assert mme_parse_answer("No, there is not.") == "no"
    assert mme_parse_answer("yes, it is") == "yes"
    assert mme_parse_answer("I think yes") == "other"  # only the first 4 characters count
    assert mme_parse_answer("Maybe") == "other"


def test_mme_acc_acc_plus_and_score_by_hand(mme_dir):
    questions = read_mme(mme_dir)
    answers = [
        "yes", "Yes",  # a1: right, wrong
        "maybe", "no",  # a2: other (wrong), right
        "Yes", "No, there is not.",  # img1: both right
        "no", "No",  # img2: wrong, right
    ]
    m = mme_scores(questions, answers)
    assert m["mme/existence/acc"]["value"] == pytest.approx(3 / 4)
    assert m["mme/existence/acc_plus"]["value"] == pytest.approx(1 / 2)
    assert m["mme/existence/score"]["value"] == pytest.approx(125.0)
    assert m["mme/artwork/acc"]["value"] == pytest.approx(2 / 4)
    assert m["mme/artwork/acc_plus"]["value"] == pytest.approx(0.0)
    assert m["mme/artwork/score"]["value"] == pytest.approx(50.0)
    assert m["mme/perception"]["value"] == pytest.approx(175.0)
    assert m["mme/total"]["value"] == pytest.approx(175.0)
    assert "mme/cognition" not in m
    for entry in m.values():
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]


def test_mme_bad_files_name_file_and_line(mme_dir, caplog):
    (mme_dir / "existence" / "img1.txt").write_text("Is there a car?\tYes\nno tab here\n")
    with pytest.raises(VlmtuneError, match=r"img1.txt, line 2"):
        read_mme(mme_dir)
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        kept = read_mme(mme_dir, skip_bad=True)  # the whole file goes, so acc+ stays defined
    assert len(kept) == 6 and not any(q.image.endswith("img1.png") for q in kept)
    assert [r.getMessage().split(", line")[0] for r in caplog.records] == [
        f"skipped {mme_dir / 'existence' / 'img1.txt'}"]
    (mme_dir / "existence" / "img1.txt").write_text("Is there a car?\tYes\n")
    (mme_dir / "existence" / "img1.png").unlink()
    with pytest.raises(VlmtuneError, match="no image named img1"):
        read_mme(mme_dir)


def test_mme_end_to_end_on_the_tiny_model(mme_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "mme-out"
    assert main(["eval", "--model", str(tiny_model_dir), "--mme", str(mme_dir), "--out", str(out),
                 "--max-new-tokens", "3", "--batch-size", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    # The written metrics are those of the written answers.
    again = mme_scores(read_mme(mme_dir), [s["answer"] for s in samples])
    assert metrics["mme/total"]["value"] == pytest.approx(again["mme/total"]["value"])
    assert all(s["correct"] == (mme_parse_answer(s["answer"]) == s["gold"]) for s in samples)


# ----------------------------------------------------------------------------- judge server
REPLIES = {
    "case A": "8 6\nAssistant 1 is more accurate.",
    "case B": "10, 5\nAssistant 2 missed the bus.",
    "case C": "7 7\nBoth are equally good.",
    "case D": "I would rather not give numbers.",
}


@pytest.fixture(scope="module")
def judge_server():
    """A real OpenAI-compatible chat server on 127.0.0.1, answering by the case named in the question."""
    from fastapi import FastAPI

    app = FastAPI()
    seen: list[dict] = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append({"authorization": request.headers.get("authorization"), "body": body})
        user = body["messages"][-1]["content"]
        reply = next((r for case, r in REPLIES.items() if case in user), "??")
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}

    @app.post("/broken/chat/completions")
    async def broken():
        return {"result": "not the OpenAI shape"}

    @app.post("/down/chat/completions")
    async def failing():
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": "overloaded"}, status_code=503)

    with serve_in_thread(app) as base:
        yield base, seen


def test_parse_judge_scores():
    assert parse_judge_scores("8 6\nbecause") == (8.0, 6.0)
    assert parse_judge_scores("10, 5") == (10.0, 5.0)
    assert parse_judge_scores("  7.5   9 \n") == (7.5, 9.0)
    assert parse_judge_scores("\n8 6\nleading blank lines are skipped") == (8.0, 6.0)
    for bad in ("", "8", "8 6 7", "Score: 8 6", "eight six", "Assistant 1: 8\n6"):
        assert parse_judge_scores(bad) is None, bad


def test_http_judge_errors(judge_server):
    url, _ = judge_server
    messages = [judge_messages("q case A", "", "ref", "ans")]
    assert HttpJudge(f"{url}/v1", "m")(messages) == [REPLIES["case A"]]
    with pytest.raises(VlmtuneError, match="OpenAI chat format"):
        HttpJudge(f"{url}/broken", "m")(messages)
    with pytest.raises(VlmtuneError, match="HTTP 503"):
        HttpJudge(f"{url}/down", "m", retries=1, backoff=0.01)(messages)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    closed_port = free.getsockname()[1]
    free.close()
    with pytest.raises(VlmtuneError, match="could not reach the judge"):
        HttpJudge(f"http://127.0.0.1:{closed_port}/v1", "m", timeout=5, retries=1, backoff=0.01)(messages)


# ----------------------------------------------------------------------------- LLaVA-Bench
@pytest.fixture()
def llava_dir(tmp_path):
    root = tmp_path / "llava-bench"
    rows = [(0, "001.jpg", "What is shown? case A", "conv"), (1, "002.jpg", "Describe it. case B", "conv"),
            (2, "001.jpg", "Explain in detail. case C", "detail"), (3, "002.jpg", "Why? case D", "complex")]
    for color, name in (("red", "001.jpg"), ("blue", "002.jpg")):
        _image(root / "images" / name, color)
    (root / "questions.jsonl").write_text("".join(
        json.dumps({"question_id": q, "image": im, "text": t, "category": c}) + "\n" for q, im, t, c in rows))
    (root / "answers_gpt4.jsonl").write_text("".join(
        json.dumps({"question_id": q, "text": f"reference answer {q}"}) + "\n" for q, *_ in rows))
    (root / "context.jsonl").write_text(json.dumps({"image": "001.jpg", "caption": "A red square."}) + "\n")
    return root


def test_llava_bench_reading(llava_dir):
    questions = read_llava_bench(llava_dir)
    assert [q.category for q in questions] == ["conv", "conv", "detail", "complex"]
    assert questions[1].reference == "reference answer 1"
    assert questions[0].context == "A red square." and questions[1].context == ""
    (llava_dir / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 0, "text": "r"}) + "\n{oops\n")
    with pytest.raises(VlmtuneError, match="line 2: not valid JSON"):
        read_llava_bench(llava_dir)
    assert [q.question_id for q in read_llava_bench(llava_dir, skip_bad=True)] == ["0"]
    (llava_dir / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 0, "text": "r"}) + "\n")
    with pytest.raises(VlmtuneError, match="question 1 has no reference answer"):
        read_llava_bench(llava_dir)


def test_llava_bench_with_a_judge_server(llava_dir, judge_server, tiny_model_dir, tmp_path, monkeypatch):
    url, seen = judge_server
    seen.clear()
    monkeypatch.setenv("TEST_JUDGE_KEY", "secret-123")
    out = tmp_path / "llava-out"
    assert main(["eval", "--model", str(tiny_model_dir), "--llava-bench", str(llava_dir), "--out", str(out),
                 "--judge-url", f"{url}/v1", "--judge-model", "judge-x", "--judge-key-env", "TEST_JUDGE_KEY",
                 "--max-new-tokens", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # conv: reference 8, 10 -> 9; model 6, 5 -> 5.5; detail 7 vs 7; complex: the reply had no scores.
    assert metrics["llava/conv"]["value"] == pytest.approx(5.5 / 9 * 100)
    assert metrics["llava/detail"]["value"] == pytest.approx(100.0)
    assert metrics["llava/all"]["value"] == pytest.approx(6 / (25 / 3) * 100)
    assert metrics["llava/all"]["n"] == 3
    assert "llava/complex" not in metrics
    assert metrics["llava/judge_failures"]["value"] == 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["judge_failed"] for s in samples] == [False, False, False, True]
    assert samples[3]["judge_reply"] == REPLIES["case D"]
    # LLaVA's protocol: the reference is Assistant 1, the model's answer Assistant 2; the key is sent.
    assert len(seen) == 4
    assert all(s["authorization"] == "Bearer secret-123" for s in seen)
    first = seen[0]["body"]
    assert first["model"] == "judge-x"
    user = first["messages"][1]["content"]
    assert "[Context]\nA red square." in user
    assert "[Assistant 1]\nreference answer 0\n\n[End of Assistant 1]" in user
    assert f"[Assistant 2]\n{samples[0]['answer']}\n\n[End of Assistant 2]" in user


def test_llava_bench_cli_errors(llava_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    base = ["eval", "--model", str(tiny_model_dir), "--llava-bench", str(llava_dir), "--out", str(tmp_path / "o")]
    assert main(base) == 2
    assert "needs a judge" in capsys.readouterr().err
    assert main(base + ["--judge-url", "http://127.0.0.1:9/v1", "--judge-key-env", "NO_SUCH_KEY_VAR"]) == 2
    assert "NO_SUCH_KEY_VAR is not set" in capsys.readouterr().err


def test_llava_bench_with_a_local_judge_model(llava_dir, tiny_model_dir, tmp_path):
    """A local model judges through generate(); its unreadable replies are failures, not a crash."""
    out = tmp_path / "local"
    assert main(["eval", "--model", str(tiny_model_dir), "--llava-bench", str(llava_dir), "--out", str(out),
                 "--judge-model-path", str(tiny_model_dir), "--judge-max-new-tokens", "4",
                 "--max-new-tokens", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    failures = [parse_judge_scores(s["judge_reply"]) is None for s in samples]
    assert [s["judge_failed"] for s in samples] == failures
    assert metrics["llava/judge_failures"]["value"] == sum(failures)
