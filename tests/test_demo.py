"""The demo: the simulated rater by hand, and a cut-down run of the whole pipeline end to end."""

from __future__ import annotations

import json
import math
import random

from vlmrl.cli import main
from vlmrl.demo import BEST, CONTROL, METHODS, rater_choice, results_table, total_error, verdict
from vlmrl.tasks.counting import DEFAULT_CLASSES, CountingTask

TASK = CountingTask(DEFAULT_CLASSES)
GOLD = {"car": 2, "motorcycle": 1, "bus": 0, "bicycle": 3}


def test_total_error_sums_class_errors_and_unreadable_is_worst():
    assert total_error("There are 2 cars, 1 motorcycle, 0 buses, 3 bicycles in the image.", GOLD, TASK) == 0
    # |3-2| + |1-1| + |1-0| + |0-3| = 5
    assert total_error("There are 3 cars, 1 motorcycle, 1 bus, 0 bicycles in the image.", GOLD, TASK) == 5
    assert total_error("There are 6 vehicles in the image.", GOLD, TASK) == math.inf
    assert total_error("There are 2 cars, 1 motorcycle in the image.", GOLD, TASK) == math.inf


def test_rater_picks_smallest_against_largest_error_and_drops_ties():
    right = "There are 2 cars, 1 motorcycle, 0 buses, 3 bicycles in the image."
    off1 = "There are 2 cars, 1 motorcycle, 0 buses, 2 bicycles in the image."
    off4 = "There are 4 cars, 0 motorcycles, 1 bus, 2 bicycles in the image."
    rng = random.Random(0)
    assert rater_choice([off1, off4, right, off1], GOLD, TASK, 0.0, rng) == (right, off4)
    # both wrong: the less wrong one is chosen; the gold answer is never made up
    assert rater_choice([off4, off1], GOLD, TASK, 0.0, rng) == (off1, off4)
    # identical answers, or different answers with equal error, are a tie
    assert rater_choice([off1, off1], GOLD, TASK, 0.0, rng) is None
    other_off1 = "There are 2 cars, 1 motorcycle, 1 bus, 3 bicycles in the image."
    assert rater_choice([off1, other_off1], GOLD, TASK, 0.0, rng) is None


def test_noisy_rater_sometimes_prefers_the_worse_answer():
    right = "There are 2 cars, 1 motorcycle, 0 buses, 3 bicycles in the image."
    off1 = "There are 2 cars, 1 motorcycle, 0 buses, 2 bicycles in the image."
    rng = random.Random(0)
    picks = [rater_choice([right, off1], GOLD, TASK, 2.0, rng) for _ in range(200)]
    flipped = sum(p == (off1, right) for p in picks)
    assert 10 < flipped < 100  # noise sd 2 against an error gap of 1: wrong in roughly a third


def _row(name, em, loss=None):
    m = {"value": em, "ci_low": em - 0.05, "ci_high": em + 0.05}
    return {"method": name, "em": m, "em_ood": m, "class_acc": m, "parse_fail": m, "pref_acc": m,
            "final_loss": loss, "wall_s": 1.0}


def test_table_and_verdict_report_the_numbers_given():
    rows = [_row("warm-up (before)", 0.20), _row("sft-on-chosen", 0.28, 0.5), _row("dpop", 0.33, 0.6)]
    table = results_table(rows)
    assert "| dpop | 33.0 [28.0, 38.0]" in table
    text = verdict(rows)
    assert "20.0% -> 33.0% (+13.0 points)" in text
    assert "+5.0 points vs control" in text


def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert stage in printed
    assert "| method | EM test |" in printed and "report:" in printed
    best = BEST.name
    for path in ("model/config.json", "runs/warmup/final", "data/pref_pairs.jsonl", "results.json",
                 "results.md", "report/report.html", "eval/warmup/test/metrics.json",
                 f"eval/{best}/test/metrics.json", "eval/sft-on-chosen/ood/samples.jsonl",
                 f"runs/{best}/metrics.jsonl", f"runs/{best}/final/adapter_config.json"):
        assert (out / path).exists(), path
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["warm-up (before)", CONTROL.name, best]
    pairs = [json.loads(line) for line in (out / "data" / "pref_pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    html = (out / "report" / "report.html").read_text()
    assert best in html and CONTROL.name in html and "<svg" in html


def test_full_comparison_has_every_method_and_the_best_is_one_of_them():
    names = [m.name for m in METHODS]
    assert names[0] == CONTROL.name and CONTROL.algo == "sft"
    assert {"dpo", "dpop", "rpo", "ipo", "grpo"} <= set(names)
    assert BEST in METHODS and BEST.algo != "sft"
    grpo = next(m for m in METHODS if m.algo == "grpo")
    assert grpo.grpo["beta"] > 0 and grpo.grpo["group_size"] >= 2
