"""Progress bars: records/s and time left when shown, silent when stderr is no terminal or with --quiet."""

from __future__ import annotations

import io
import logging
import contextlib
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from vlmtune.cli import main
from vlmtune.judges import HttpVlmJudge
from vlmtune.logs import setup_logging
from vlmtune.progress import bars_shown, progress_bar


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def info_logging():
    setup_logging(logging.INFO)
    yield
    setup_logging(logging.INFO)


def test_bar_shows_rate_time_left_and_reaches_the_total():
    out = io.StringIO()
    items = list(range(7))
    seen = list(progress_bar(items, desc="answer", file=out, enabled=True))
    assert seen == items
    text = out.getvalue()
    assert "answer:" in text and "7/7" in text and "100%" in text
    assert "record/s" in text and "left" in text and "elapsed" in text


def test_bar_advanced_by_hand_counts_to_the_total():
    out = io.StringIO()
    with progress_bar(total=10, desc="log-probs", file=out, enabled=True) as bar:
        for size in (4, 4, 2):
            bar.update(size)
    assert bar.n == 10 and "10/10" in out.getvalue()


def test_bar_without_total_shows_count_and_rate():
    out = io.StringIO()
    for _ in progress_bar(iter(range(3)), desc="read yolo labels", unit="image", file=out, enabled=True):
        pass
    text = out.getvalue()
    assert "3 image" in text and "image/s" in text and "%" not in text


def test_bar_on_a_terminal_that_reports_no_size():
    """A bare pseudo-terminal says 0 columns and 0 rows (as under `script` or a CI runner): the bar still shows."""
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as stream:
        assert os.get_terminal_size(follower).columns == 0
        for _ in progress_bar(range(3), desc="infer", file=stream, enabled=True):
            pass
    os.set_blocking(leader, False)
    chunks = []
    while True:  # one read may return only part of what the pty holds: read until it is empty
        try:
            chunk = os.read(leader, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    text = b"".join(chunks).decode()
    assert "infer:" in text and "3/3" in text and "record/s" in text


def test_shown_only_on_a_terminal_and_not_when_quiet(info_logging):
    assert bars_shown(Terminal())
    assert not bars_shown(io.StringIO())
    setup_logging(logging.WARNING)  # what --quiet does
    assert not bars_shown(Terminal())
    out = Terminal()
    assert list(progress_bar([1, 2], desc="x", file=out)) == [1, 2]
    assert out.getvalue() == ""


def test_quiet_is_accepted_before_and_after_the_command():
    from vlmtune.cli import build_parser, split_quiet

    for argv in (["--quiet", "infer", "--data", "d.jsonl"], ["infer", "--data", "d.jsonl", "-q"],
                 ["data", "from-detections", "ROOT", "--out", "o", "--quiet"]):
        quiet, rest = split_quiet(argv)
        assert quiet and "-q" not in rest and "--quiet" not in rest
        build_parser().parse_args(rest)  # what is left parses
    assert split_quiet(["infer", "--data", "d.jsonl"]) == (False, ["infer", "--data", "d.jsonl"])


def _infer_argv(model: Path, data: Path, out: Path) -> list[str]:
    return ["infer", "--model", str(model), "--data", str(data), "--out", str(out),
            "--max-new-tokens", "2", "--batch-size", "8"]


def test_infer_prints_no_bar_when_stderr_is_not_a_terminal(tiny_model_dir, synth_pairs_file, tmp_path, capsys,
                                                          info_logging):
    assert main(_infer_argv(tiny_model_dir, synth_pairs_file, tmp_path / "a.jsonl")) == 0
    err = capsys.readouterr().err
    assert "infer:" not in err and "record/s" not in err
    assert "wrote" in err  # info messages still show without --quiet


def _run_on_a_terminal(argv: list[str]) -> str:
    """Run the CLI with stderr on a pseudo-terminal; what it wrote there."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # rows, columns
    # Without what an earlier in-process main() may have set for a non-terminal stderr.
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")
    proc = subprocess.Popen([sys.executable, "-m", "vlmtune", *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the follower side closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait() == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_infer_on_a_terminal_shows_the_bar_and_quiet_hides_it(tiny_model_dir, synth_pairs_file, tmp_path):
    n = sum(1 for line in synth_pairs_file.read_text().splitlines() if line.strip())
    shown = _run_on_a_terminal(_infer_argv(tiny_model_dir, synth_pairs_file, tmp_path / "a.jsonl"))
    assert "infer:" in shown and f"{n}/{n}" in shown and "record/s" in shown and "left" in shown
    quiet = _run_on_a_terminal(["--quiet", *_infer_argv(tiny_model_dir, synth_pairs_file, tmp_path / "b.jsonl")])
    assert "infer:" not in quiet and "record/s" not in quiet and "wrote" not in quiet
    assert "Loading weights" in shown and "Loading weights" not in quiet  # transformers' own bar too


# ------------------------------------------------------------------ the call sites, on a terminal


def on_terminal() -> contextlib.AbstractContextManager[Terminal]:
    """stderr as a terminal (bars shown) for code that writes to ``sys.stderr`` as it is then.
    Entered in the test body: pytest's own capture replaces ``sys.stderr`` after fixtures run."""
    return contextlib.redirect_stderr(Terminal())


def _final(text: str, label: str) -> str:
    """The last drawing of the bar labelled ``label``."""
    drawings = [d for d in text.replace("\r", "\n").splitlines() if d.startswith(f"{label}:") and "elapsed" in d]
    assert drawings, f"no {label!r} bar in {text!r}"
    return drawings[-1]


def test_eval_shows_answer_and_log_prob_bars_to_the_total(tiny_model_dir, synth_pairs_file, tmp_path,
                                                          info_logging):
    n = sum(1 for line in synth_pairs_file.read_text().splitlines() if line.strip())
    with on_terminal() as terminal:
        assert main(["eval", "--model", str(tiny_model_dir), "--data", str(synth_pairs_file), "--out",
                     str(tmp_path / "eval"), "--max-new-tokens", "2", "--batch-size", "8"]) == 0
    for label in ("answer", "log-probs"):
        assert f"{n}/{n}" in _final(terminal.getvalue(), label)


def test_data_builders_count_the_images_and_scenes(synth_pairs_file, tmp_path, info_logging):
    scenes = synth_pairs_file.parent / "scenes"
    n = len(list((scenes / "images").iterdir()))
    with on_terminal() as terminal:
        assert main(["data", "from-detections", str(scenes), "--out", str(tmp_path / "pairs")]) == 0
    assert f"{n} image" in _final(terminal.getvalue(), "read yolo labels")
    with on_terminal() as terminal:
        assert main(["data", "tasks", "--scenes", str(scenes), "--out", str(tmp_path / "tasks")]) == 0
    assert f"{n}/{n}" in _final(terminal.getvalue(), "pose questions")
    assert "make records" in terminal.getvalue()


def test_reference_precompute_bar(tiny_model_dir, synth_pairs_file, info_logging):
    from vlmtune.data.load import load_records
    from vlmtune.forward.ref_cache import precompute_reference
    from vlmtune.models.load import load_model

    model, processor = load_model(tiny_model_dir)
    records = load_records(synth_pairs_file)[:5]
    with on_terminal() as terminal:
        precompute_reference(model, processor, records, 512, batch_size=2, reference=model)
    assert "5/5" in _final(terminal.getvalue(), "reference log-probs")


from test_judges import FAST, _record, judge_server, server  # noqa: E402,F401  (the real local judge server)


def test_http_judge_calls_bar(server, tmp_path, info_logging):
    url, seen, _ = server
    record = _record(tmp_path)
    judge = HttpVlmJudge(f"{url}/good/v1", "judge-x", **FAST)
    with on_terminal() as terminal:
        judge.score([record] * 3, ["good: 2 cars", "bad: 5 cars", "good: 2 cars"])
    bar = _final(terminal.getvalue(), "judge judge-x")
    assert len(seen) == 3 and "3/3" in bar and "request/s" in bar


def test_the_training_bar_only_on_a_terminal_and_not_when_quiet(tiny_model_dir, synth_pairs_file, tmp_path,
                                                                info_logging):
    from vlmtune.config import validate_config
    from vlmtune.train.loop import Trainer

    def train(name: str, stderr: io.StringIO) -> str:
        raw = {"model": {"name_or_path": str(tiny_model_dir)}, "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
               "data": {"train": str(synth_pairs_file), "max_length": 128},
               "train": {"output_dir": str(tmp_path / name), "max_steps": 2, "batch_size": 2}}
        with contextlib.redirect_stderr(stderr):
            Trainer(validate_config(raw)).train()
        return stderr.getvalue()

    shown = train("terminal", Terminal())
    assert "train: 100%" in shown and "2/2" in shown
    assert "train:" not in train("not-a-terminal", io.StringIO())
    setup_logging(logging.WARNING)  # what --quiet does
    assert "train:" not in train("quiet", Terminal())
