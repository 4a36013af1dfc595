"""The judge interface: reward, HTTP VLM judge against a real local server, local model, GRPO reward adapter."""

from __future__ import annotations

import asyncio
import base64
import doctest
import logging
import socket

import pytest
from fastapi import Request
from local_server import serve_in_thread
from PIL import Image

from vlmtune import judge_prompts, judges
from vlmtune.data.records import PreferenceRecord, user_prompt
from vlmtune.errors import VlmtuneError
from vlmtune.eval.judge import image_data_url
from vlmtune.judge_prompts import combine_orders, parse_rating, parse_verdict, scoring_messages
from vlmtune.judges import HttpVlmJudge, JudgeReward, LocalVlmJudge, RewardJudge

FAST = dict(timeout=2.0, retries=2, backoff=0.01, workers=2)  # short timeouts and back-off in tests


def test_doctests_pass():
    from vlmtune.eval import judge

    assert doctest.testmod(judges).failed == 0
    assert doctest.testmod(judge_prompts).failed == 0
    assert doctest.testmod(judge).failed == 0


# ----------------------------------------------------------------------------- parsing
def test_parse_rating():
    assert parse_rating("Good.\nRating: [[8]]") == 8.0
    assert parse_rating("[[ 9.5 ]]") == 9.5
    assert parse_rating("Rating: [[3]] ... so [[3]]") == 3.0  # the same rating twice is one rating
    assert parse_rating("7") == 7.0 and parse_rating("Rating: 10.") == 10.0
    for bad in ("", "great answer", "[[0]]", "[[11]]", "[[3]] no, [[4]]", "I give it 7 out of 10", None):
        assert parse_rating(bad) is None, bad


def test_parse_verdict():
    assert parse_verdict("A counts right. [[A]]") == 1
    assert parse_verdict("[[B]]") == -1
    assert parse_verdict("Equally good: [[C]]") == 0
    assert (parse_verdict("A"), parse_verdict(" b. "), parse_verdict("Tie")) == (1, -1, 0)
    for bad in ("", "[[A]] then [[B]]", "Assistant A is better", "[[D]]", "AB", None):
        assert parse_verdict(bad) is None, bad


def test_combine_orders_position_bias():
    # second is the verdict with b shown as A: -1 there means a is better.
    assert combine_orders(1, -1) == 1 and combine_orders(-1, 1) == -1
    assert combine_orders(1, 1) == 0 and combine_orders(-1, -1) == 0  # always the first position: a tie
    assert combine_orders(1, 0) == 0 and combine_orders(0, 0) == 0
    assert combine_orders(None, 1) is None and combine_orders(1, None) is None


# ----------------------------------------------------------------------------- records
def _record(tmp_path, name="r0", color="red", counts=None, fmt="PNG"):
    path = tmp_path / f"{name}.{fmt.lower()}"
    Image.new("RGB", (32, 32), color).save(path, format=fmt)
    return PreferenceRecord(name, [str(path)], user_prompt("How many cars? case"), "2 cars", "1 car",
                            {"counts": counts or {"car": 2, "bus": 0}})


# ----------------------------------------------------------------------------- reward judge
def test_reward_judge_scores_and_prefers(tmp_path):
    record = _record(tmp_path)
    judge = RewardJudge([("count_exact", 1.0), ("count_format", 0.5)])
    answers = ["There are 2 cars, 0 buses.", "There are 1 car, 0 buses.", "no idea"]
    result = judge.score([record] * 3, answers)
    # exact: 1, 0, 0; format: 1, 1, 0 (weight 0.5)
    assert result.scores == [1.5, 0.5, 0.0]
    assert result.failures == 0
    assert judge.prefer(record, answers[0], answers[1]) == 1
    assert judge.prefer(record, answers[2], answers[0]) == -1
    assert judge.prefer(record, answers[1], "There are 3 cars, 0 buses.") == 0


def test_reward_judge_scores_a_task_record_without_counts(tmp_path):
    """The built-in rewards score by the record's task: a compare record (no metadata.counts) is judged."""
    from vlmtune.tasks.rewards import task_accuracy_reward

    record = _record(tmp_path)
    record.metadata = {"task": {"family": "compare", "kind": "verdict", "answer": "more", "think": False}}
    answers = ["more", "fewer"]
    scores = RewardJudge(["task_accuracy"]).score([record, record], answers).scores
    assert scores == task_accuracy_reward(answers, metadata=[record.metadata] * 2) and scores[0] != scores[1]


def test_reward_judge_errors(tmp_path):
    with pytest.raises(VlmtuneError, match="unknown reward"):
        RewardJudge(["nope"])
    with pytest.raises(VlmtuneError, match="at least one reward"):
        RewardJudge([])
    record = _record(tmp_path)
    record.metadata = {}
    with pytest.raises(VlmtuneError, match="record r0: GRPO scores answers by the record's task"):
        RewardJudge(["count_exact"]).score([record], ["2 cars"])
    with pytest.raises(VlmtuneError, match="2 completions for 1 records"):
        RewardJudge(["vlmtune.rewards:count_exact_reward"]).score([_record(tmp_path)], ["a", "b"])


# ----------------------------------------------------------------------------- judge server
def _user_text(body) -> str:
    content = body["messages"][-1]["content"]
    return " ".join(p["text"] for p in content if p["type"] == "text")


def _good_reply(text: str) -> str:
    """Rates 'good' answers 9 and others 2; prefers whichever of A and B starts with 'good'."""
    if "Assistant A's Answer" in text:
        a = text.split("[The Start of Assistant A's Answer]\n", 1)[1]
        return "A is right. [[A]]" if a.startswith("good") else "B is right. [[B]]"
    answer = text.split("[The Start of Assistant's Answer]\n", 1)[1]
    return "Rating: [[9]]" if answer.startswith("good") else "Rating: [[2]]"


@pytest.fixture(scope="module")
def judge_server():
    """A real OpenAI-compatible server on 127.0.0.1: a good judge, a biased, a garbage, a slow and a flaky one."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    seen: list[dict] = []
    state = {"fail_next": 0}

    def answer(text):
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}

    @app.post("/{kind}/v1/chat/completions")
    async def chat(kind: str, request: Request):
        body = await request.json()
        seen.append({"kind": kind, "authorization": request.headers.get("authorization"), "body": body})
        if kind == "flaky" and state["fail_next"] > 0:
            state["fail_next"] -= 1
            status = 429 if state["fail_next"] % 2 else 503
            return JSONResponse({"error": "busy"}, status_code=status, headers={"Retry-After": "0"})
        if kind == "locked" and request.headers.get("authorization") != "Bearer right-key":
            return JSONResponse({"error": "bad key"}, status_code=401)
        if kind == "slow":
            await asyncio.sleep(1.5)
        if kind == "always-a":
            return answer("A")
        if kind == "garbage":
            return answer("I would rather not say.")
        return answer(_good_reply(_user_text(body)))

    with serve_in_thread(app) as base:
        yield base, seen, state


@pytest.fixture()
def server(judge_server):
    url, seen, state = judge_server
    seen.clear()
    state["fail_next"] = 0
    return url, seen, state


def test_http_judge_scores_with_the_image_and_the_key(server, tmp_path, monkeypatch):
    url, seen, _ = server
    monkeypatch.setenv("TEST_JUDGE_KEY", "secret-xyz")
    record = _record(tmp_path)
    judge = HttpVlmJudge(f"{url}/good/v1", "judge-x", key_env="TEST_JUDGE_KEY", **FAST)
    result = judge.score([record, record], ["good: 2 cars", "bad: 5 cars"])
    assert result.scores == [9.0, 2.0] and result.failures == 0 and result.cached == 0
    assert len(seen) == 2
    assert all(s["authorization"] == "Bearer secret-xyz" for s in seen)
    body = seen[0]["body"]
    assert body["model"] == "judge-x"
    image_part, text_part = body["messages"][1]["content"]
    prefix = "data:image/png;base64,"
    assert image_part["type"] == "image_url" and image_part["image_url"]["url"].startswith(prefix)
    sent = base64.b64decode(image_part["image_url"]["url"][len(prefix):])
    assert sent == open(record.images[0], "rb").read()  # the file's own bytes
    assert "[Question]\n<image> How many cars? case" in text_part["text"]


def test_key_env_must_be_set(server, monkeypatch):
    url, _, _ = server
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(VlmtuneError, match="NO_SUCH_JUDGE_KEY is not set"):
        HttpVlmJudge(f"{url}/good/v1", "m", key_env="NO_SUCH_JUDGE_KEY")


def test_images_as_data_urls(tmp_path):
    jpeg = _record(tmp_path, "j", fmt="JPEG").images[0]
    assert image_data_url(jpeg).startswith("data:image/jpeg;base64,")
    bmp = _record(tmp_path, "b", color="blue", fmt="BMP").images[0]  # neither PNG nor JPEG: re-encoded
    url = image_data_url(bmp)
    assert url.startswith("data:image/png;base64,")
    (tmp_path / "back.png").write_bytes(base64.b64decode(url.split(",", 1)[1]))
    assert Image.open(tmp_path / "back.png").getpixel((0, 0)) == (0, 0, 255)
    (tmp_path / "not.gif").write_text("hello")
    with pytest.raises(VlmtuneError, match="not.gif is not an image"):
        image_data_url(tmp_path / "not.gif")
    with pytest.raises(VlmtuneError, match="cannot read the image"):
        image_data_url(tmp_path / "missing.png")


def test_pairwise_both_orders(server, tmp_path):
    url, seen, _ = server
    record = _record(tmp_path)
    good = HttpVlmJudge(f"{url}/good/v1", "m", **FAST)
    assert good.prefer(record, "good: 2 cars", "bad: 1 car") == 1
    assert good.prefer(record, "bad: 1 car", "good: 2 cars") == -1
    assert len(seen) == 4  # each pair asked in both orders
    shown_first = {_user_text(s["body"]).split("Assistant A's Answer]\n", 1)[1].split("\n")[0] for s in seen[:2]}
    assert shown_first == {"good: 2 cars", "bad: 1 car"}  # requests run in parallel: either may arrive first
    biased = HttpVlmJudge(f"{url}/always-a/v1", "m", **FAST)
    result = biased.prefer_many([(record, "good: 2 cars", "bad: 1 car"), (record, "x", "y")])
    assert result.verdicts == [0, 0] and result.inconsistent == 2 and result.failures == 0


def test_garbage_replies_are_failures_not_wins(server, tmp_path, caplog):
    url, _, _ = server
    record = _record(tmp_path)
    judge = HttpVlmJudge(f"{url}/garbage/v1", "m", **FAST)
    with caplog.at_level(logging.WARNING, logger="vlmtune.judges"):
        result = judge.score([record, record], ["good: 2 cars", "bad"])
        assert judge.prefer(record, "good", "bad") is None
    assert result.scores == [None, None] and result.failures == 2
    assert "unreadable reply 'I would rather not say.'" in caplog.text
    reward = JudgeReward(judge)
    assert reward(["good: 2 cars"], records=[record]) == [0.0]  # below the lowest rating: never a win
    assert (reward.failures, reward.scored) == (1, 1)


def test_judge_that_is_down(tmp_path, caplog):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    record = _record(tmp_path)
    judge = HttpVlmJudge(f"http://127.0.0.1:{port}/v1", "m", **FAST)
    with caplog.at_level(logging.WARNING, logger="vlmtune.judges"):
        result = judge.score([record] * 3, ["a", "b", "c"])
    assert result.scores == [None] * 3 and result.failures == 3
    assert "3 of 3 requests got no answer" in caplog.text and "no answer after 3 tries (ConnectError" in caplog.text
    assert judge.prefer(record, "a", "b") is None


def test_slow_judge_times_out(server, tmp_path):
    url, seen, _ = server
    judge = HttpVlmJudge(f"{url}/slow/v1", "m", timeout=0.2, retries=1, backoff=0.01)
    result = judge.score([_record(tmp_path)], ["good"])
    assert result.scores == [None] and result.failures == 1
    assert len(seen) == 2  # the first try and one retry, each cut at the timeout


def test_5xx_and_429_then_success(server, tmp_path):
    url, seen, state = server
    state["fail_next"] = 2  # a 429, then a 503, then the answer
    judge = HttpVlmJudge(f"{url}/flaky/v1", "m", **FAST)
    assert judge.score([_record(tmp_path)], ["good: 2"]).scores == [9.0]
    assert len(seen) == 3
    state["fail_next"] = 3  # more failures than retries: a failure, counted
    assert judge.score([_record(tmp_path)], ["good: 2"]).failures == 1


def test_disk_cache_makes_a_rerun_ask_nothing(server, tmp_path):
    url, seen, _ = server
    record = _record(tmp_path)
    answers = ["good: 2 cars", "bad: 1 car"]
    first = HttpVlmJudge(f"{url}/good/v1", "m", cache_dir=tmp_path / "cache", **FAST)
    scores = first.score([record, record], answers)
    verdict = first.prefer(record, *answers)
    assert len(seen) == 4
    seen.clear()
    again = HttpVlmJudge(f"{url}/good/v1", "m", cache_dir=tmp_path / "cache", **FAST)  # a rerun
    rerun = again.score([record, record], answers)
    assert again.prefer(record, *answers) == verdict == 1
    assert rerun.scores == scores.scores and rerun.cached == 2
    assert seen == []
    # Another image, answer or model is another question.
    again.score([_record(tmp_path, "r1", color="green")], [answers[0]])
    HttpVlmJudge(f"{url}/good/v1", "other", cache_dir=tmp_path / "cache", **FAST).score([record], [answers[0]])
    assert len(seen) == 2


def test_garbage_is_not_cached(server, tmp_path):
    url, seen, _ = server
    record = _record(tmp_path)
    for _ in range(2):
        judge = HttpVlmJudge(f"{url}/garbage/v1", "m", cache_dir=tmp_path / "cache", **FAST)
        assert judge.score([record], ["x"]).failures == 1
    assert len(seen) == 2


def test_judge_as_grpo_reward(server, tmp_path):
    """TRL's shape with the columns GRPO passes plus the images; failures score 0 and are counted."""
    url, _, _ = server
    record = _record(tmp_path)
    reward = JudgeReward(HttpVlmJudge(f"{url}/good/v1", "m", **FAST))
    completions = ["good: 2 cars", [{"role": "assistant", "content": "bad: 3 cars"}]]
    columns = {"prompts": [record.prompt] * 2, "images": [record.images] * 2, "metadata": [record.metadata] * 2,
               "counts": [record.metadata["counts"]] * 2}
    assert reward(completions, **columns) == [9.0, 2.0]
    assert reward.failures == 0
    # Through the function GrpoStep scores with (its columns plus the images).
    from vlmtune.train.grpo import score

    total, per_function = score([("judge", 0.5, reward)], ["good: 2 cars", "bad: 3 cars"], columns)
    assert total.tolist() == [4.5, 1.0] and per_function["judge"].tolist() == [9.0, 2.0]
    with pytest.raises(VlmtuneError, match="1 image slot\\(s\\) but 0 image\\(s\\).*`images` column"):
        reward(completions, prompts=columns["prompts"], metadata=columns["metadata"])
    with pytest.raises(VlmtuneError, match="pass records= or a `prompts` column"):
        reward(completions)
    assert JudgeReward(RewardJudge(["count_exact"]))(["There are 2 cars, 0 buses."] * 2, **columns) == [1.0, 1.0]


# ----------------------------------------------------------------------------- local model
def test_local_model_judge(tiny_model_dir, tmp_path):
    """The tiny random model answers the same prompts, image included (a missing image would make the
    processor's image tokens disagree and raise); its unreadable replies are failures, not a crash."""
    record = _record(tmp_path)
    judge = LocalVlmJudge(tiny_model_dir, max_new_tokens=3)
    replies = judge.local([scoring_messages(record, "good: 2 cars"), scoring_messages(record, "bad")])
    result = judge.score([record, record], ["good: 2 cars", "bad"])
    assert result.scores == [parse_rating(r) for r in replies]  # greedy: the same replies, read the same way
    assert result.failures == sum(parse_rating(r) is None for r in replies)
    assert judge.prefer(record, "a", "b") in (None, -1, 0, 1)


def test_reference_guided_prompts(server, tmp_path):
    url, seen, _ = server
    record = _record(tmp_path)
    judge = HttpVlmJudge(f"{url}/good/v1", "m", reference=True, **FAST)
    assert judge.score([record], ["good: 2 cars"]).scores == [9.0]
    assert judge.prefer(record, "good: 2 cars", "bad") == 1
    for s in seen:
        text = _user_text(s["body"])
        assert "[The Start of Reference Answer]\n2 cars\n[The End of Reference Answer]" in text
        assert "You will be given a reference answer" in text
    plain = scoring_messages(record, "x")[1]["content"][-1]["text"]
    assert "Reference Answer" not in plain and "reference answer" not in plain
    record.chosen = ""
    with pytest.raises(VlmtuneError, match="record r0: a judge with a reference answer shows the record's `chosen`"):
        judge.score([record], ["x"])


def test_a_damaged_cache_line_is_asked_again(server, tmp_path, caplog):
    url, seen, _ = server
    record = _record(tmp_path)
    HttpVlmJudge(f"{url}/good/v1", "m", cache_dir=tmp_path / "c", **FAST).score([record, record], ["good", "bad"])
    cache = tmp_path / "c" / judges.CACHE_FILE
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1][:20] + "\n")  # the second reply cut short
    seen.clear()
    with caplog.at_level(logging.WARNING):
        again = HttpVlmJudge(f"{url}/good/v1", "m", cache_dir=tmp_path / "c", **FAST).score([record, record],
                                                                                            ["good", "bad"])
    assert f"{cache}, line 2: not valid JSON" in caplog.text
    assert again.scores == [9.0, 2.0] and again.cached == 1 and len(seen) == 1


def test_a_refused_key_or_a_wrong_url_stops_at_once(server, tmp_path, monkeypatch):
    """Asking again cannot fix a bad key or an endpoint that is not OpenAI's: an error, not failures."""
    url, seen, _ = server
    record = _record(tmp_path)
    monkeypatch.setenv("TEST_JUDGE_KEY", "wrong-key")
    with pytest.raises(VlmtuneError, match="refused the request \\(401\\); check the API key"):
        HttpVlmJudge(f"{url}/locked/v1", "m", key_env="TEST_JUDGE_KEY", **FAST).score([record], ["x"])
    assert len(seen) == 1
    monkeypatch.setenv("TEST_JUDGE_KEY", "right-key")
    judge = HttpVlmJudge(f"{url}/locked/v1", "m", key_env="TEST_JUDGE_KEY", **FAST)
    assert judge.score([record], ["good"]).scores == [9.0]
    with pytest.raises(VlmtuneError, match="chat/completions answered HTTP 404"):
        HttpVlmJudge(f"{url}/good/v1/models", "m", **FAST).score([record], ["x"])
