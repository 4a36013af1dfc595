"""The before/after report, rendered from evaluation folders built by hand here.

The fixture: six records, a base model and a tuned one whose right/wrong pattern is chosen so
that every gallery outcome occurs; ``metrics.json`` values are computed from the rows with a
plain loop (as an evaluator would), so the report's paired deltas can be checked by hand.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.errors import VlmtuneError
from vlmtune.report.deltas import metric_deltas, outcomes, verdict
from vlmtune.report.html import summary_line, write_report
from vlmtune.report.inputs import RunResult, load_run
from vlmtune.tasks.counting import CountingTask

CLASSES = ("car", "motorcycle", "bus", "bicycle")
TASK = CountingTask(CLASSES)
MALICIOUS = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'
GOLD = [
    {"car": 2, "motorcycle": 1, "bus": 0, "bicycle": 0},
    {"car": 0, "motorcycle": 0, "bus": 1, "bicycle": 3},
    {"car": 1, "motorcycle": 1, "bus": 1, "bicycle": 1},
    {"car": 4, "motorcycle": 0, "bus": 0, "bicycle": 2},
    {"car": 3, "motorcycle": 2, "bus": 0, "bicycle": 0},
    {"car": 0, "motorcycle": 0, "bus": 0, "bicycle": 1},
]
# Right (True) or wrong per record.  r0 improved, r1 both wrong, r2 both right, r3 regressed,
# r4 improved, r5 both right.
BASE_RIGHT = [False, False, True, True, False, True]
TUNED_RIGHT = [True, False, True, False, True, True]
# Second tuned model: r1 improved, r2 regressed, the rest as the base.
OTHER_RIGHT = [False, True, False, True, False, True]
EXPECTED = {
    "tuned": {"r0": "improved", "r1": "both-wrong", "r2": "both-right", "r3": "regressed",
              "r4": "improved", "r5": "both-right"},
    "other": {"r0": "both-wrong", "r1": "improved", "r2": "regressed", "r3": "both-right",
              "r4": "both-wrong", "r5": "both-right"},
}


def make_images(root: Path) -> list[Path]:
    paths = []
    for i in range(len(GOLD)):
        path = root / "images" / f"scene_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (96, 72), (40 * i % 255, 120, 200 - 20 * i))
        for x in range(10 + 8 * i, 30 + 8 * i):
            for y in range(20, 40):
                image.putpixel((x, y), (250, 250, 0))
        image.save(path)
        paths.append(path)
    return paths


def make_eval_dir(out: Path, images: list[Path], right: list[bool], malicious_at: int | None = None) -> Path:
    """Rows and the metrics.json an evaluator would write for them (means over rows)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (gold, ok) in enumerate(zip(GOLD, right)):
        parsed = dict(gold) if ok else {**gold, "car": gold["car"] + 1}
        answer = TASK.render(parsed)
        if i == 1 and not ok:  # a parse failure: nothing countable said
            parsed, answer = {c: None for c in CLASSES}, "I am not sure what is in the picture."
        if i == malicious_at:
            answer = MALICIOUS + " " + answer
        hits = {c: parsed[c] == gold[c] for c in CLASSES}
        rows.append({
            "id": f"r{i}", "image": str(images[i]), "prompt": "Count the <b>vehicles</b>.",
            "answer": answer, "chosen": TASK.render(gold), "gold_counts": gold,
            "parsed_counts": parsed, "parsed_total": None, "correct": ok, "class_hits": hits,
            "parse_failure": all(v is None for v in parsed.values()),
        })
    n = len(rows)
    metrics = {"exact_match": sum(r["correct"] for r in rows) / n}
    for c in CLASSES:
        metrics[f"accuracy/{c}"] = sum(r["class_hits"][c] for r in rows) / n
    metrics["parse_failure"] = sum(r["parse_failure"] for r in rows) / n
    car_errors = [abs(r["parsed_counts"]["car"] - r["gold_counts"]["car"])
                  for r in rows if r["parsed_counts"]["car"] is not None]
    metrics["abs_error/car"] = sum(car_errors) / len(car_errors)  # over the records that say
    metrics["text/bleu"] = 40.0 + 10 * sum(right)  # corpus-level: no per-record value
    (out / "metrics.json").write_text(json.dumps({
        k: {"value": v, "ci_low": max(0.0, v - 0.2) if v <= 1 else v - 5,
            "ci_high": min(1.0, v + 0.2) if v <= 1 else v + 5, "n": n}
        for k, v in metrics.items()
    }))
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def make_train_log(path: Path, with_eval: bool = True) -> Path:
    lines = []
    for step in range(1, 9):
        lines.append({"step": step, "loss": 0.69 - 0.05 * step, "rewards/accuracies": 0.5 + 0.05 * step,
                      "rewards/margins": 0.1 * step, "rewards/chosen": 0.05 * step,
                      "rewards/rejected": -0.05 * step, "lr": 1e-4, "grad_norm": 1.0})
        if with_eval and step % 4 == 0:
            lines.append({"step": step, "eval/loss": 0.7 - 0.04 * step, "eval/rewards/accuracies": 0.6})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def build_fixture(root: Path, three_models: bool = False) -> list[RunResult]:
    """Evaluation folders for base, tuned (and optionally other) under ``root``."""
    images = make_images(root)
    runs = [
        RunResult("base", make_eval_dir(root / "base", images, BASE_RIGHT)),
        RunResult("tuned", make_eval_dir(root / "tuned", images, TUNED_RIGHT, malicious_at=3),
                  make_train_log(root / "run" / "metrics.jsonl")),
    ]
    if three_models:
        runs.append(RunResult("other", make_eval_dir(root / "other", images, OTHER_RIGHT),
                              make_train_log(root / "run2" / "metrics.jsonl", with_eval=False)))
    return runs


@pytest.fixture
def report(tmp_path) -> tuple[str, list[RunResult]]:
    runs = build_fixture(tmp_path)
    path = write_report(tmp_path / "out", runs)
    return path.read_text(), runs


def test_every_metric_has_a_row(report):
    html, runs = report
    metrics = json.loads((runs[0].eval_dir / "metrics.json").read_text())
    rows = re.findall(r'<tr data-metric="([^"]+)"', html)
    assert rows == list(metrics)


def test_deltas_match_a_hand_computation(tmp_path):
    runs = build_fixture(tmp_path)
    base, tuned = load_run(runs[0]), load_run(runs[1])
    deltas = {d.metric: d for d in metric_deltas(base, tuned)}
    # Exact match: base 3/6 right, tuned 4/6 -> +1/6.
    assert deltas["exact_match"].delta == pytest.approx(1 / 6)
    assert deltas["exact_match"].n == 6
    assert deltas["exact_match"].ci_low <= 1 / 6 <= deltas["exact_match"].ci_high
    # Car: every wrong answer is off on cars, so car accuracy follows exact match.  Bus: the
    # base's parse failure (r1) misses the bus, so base 5/6, tuned 5/6 (its r1 also fails).
    assert deltas["accuracy/car"].delta == pytest.approx(1 / 6)
    assert deltas["accuracy/bus"].delta == pytest.approx(0.0)
    assert deltas["accuracy/bus"].verdict == "no change"
    # Parse failures: both fail on r1 only.
    assert deltas["parse_failure"].delta == pytest.approx(0.0)
    # Car error is a mean over the answers that mention cars (r1 fails to parse for both), so
    # it is not paired: plain difference of the reported means, 3/5 - 2/5.
    assert deltas["abs_error/car"].delta == pytest.approx(-1 / 5)
    assert deltas["abs_error/car"].verdict == "no CI"
    # Corpus BLEU has no per-record value: plain difference (50 + 10*4) - (40 + 10*3), no CI.
    assert deltas["text/bleu"].delta == pytest.approx(10.0)
    assert math.isnan(deltas["text/bleu"].ci_low) and deltas["text/bleu"].verdict == "no CI"


def test_delta_with_a_ci_away_from_zero_is_marked(tmp_path):
    images = make_images(tmp_path)
    base = make_eval_dir(tmp_path / "base", images, [False] * 6)
    tuned = make_eval_dir(tmp_path / "tuned", images, [True] * 6)
    html = write_report(tmp_path / "out", [RunResult("base", base), RunResult("dpo", tuned)]).read_text()
    row = re.search(r'<tr data-metric="exact_match">(.*?)</tr>', html).group(1)
    assert 'data-verdict="better"' in row and "+100.0" in row
    assert "dpo vs base: exact match +100.0 points [95% CI +100.0, +100.0]" in html
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert saved["base"] == "base"
    assert saved["models"]["dpo"]["deltas"]["exact_match"]["delta"] == pytest.approx(1.0)
    assert saved["models"]["dpo"]["deltas"]["exact_match"]["verdict"] == "better"
    assert saved["models"]["dpo"]["deltas"]["text/bleu"]["ci_low"] is None


def test_verdict_follows_the_metric_direction():
    assert verdict("exact_match", 0.05, 0.2) == "better"
    assert verdict("exact_match", -0.2, -0.05) == "worse"
    assert verdict("parse_failure", -0.2, -0.05) == "better"  # fewer failures
    assert verdict("total_abs_error", 0.1, 0.4) == "worse"
    assert verdict("exact_match", -0.1, 0.1) == "no change"
    assert verdict("text/bleu", math.nan, math.nan) == "no CI"
    assert verdict("logps/rejected", -9.0, -2.0) == "down"  # no better direction


def test_summary_line_reads_as_points(tmp_path):
    runs = build_fixture(tmp_path)
    d = {x.metric: x for x in metric_deltas(load_run(runs[0]), load_run(runs[1]))}["exact_match"]
    line = summary_line("tuned", "base", "exact_match", d, rate=True)
    assert line.startswith("tuned vs base: exact match +16.7 points [95% CI ")


def test_outcomes_classify_each_record(tmp_path):
    runs = build_fixture(tmp_path, three_models=True)
    base, tuned, other = (load_run(r) for r in runs)
    assert outcomes(base, tuned) == EXPECTED["tuned"]
    assert outcomes(base, other) == EXPECTED["other"]
    html = write_report(tmp_path / "out", runs).read_text()
    cards = re.findall(r'<article class="card" data-vs-1="([^"]+)" data-vs-2="([^"]+)" data-id="([^"]+)"', html)
    assert {i: a for a, _, i in cards} == EXPECTED["tuned"]
    assert {i: b for _, b, i in cards} == EXPECTED["other"]


def test_model_output_is_escaped(report):
    html, _ = report
    assert MALICIOUS not in html
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in html
    assert "onerror=alert(1)&gt;" in html
    assert html.count("<script") == 1  # the page's own filter script only
    assert "Count the &lt;b&gt;vehicles&lt;/b&gt;." in html


def test_page_is_self_contained(report):
    html, _ = report
    assert re.search(r"https?://", html) is None
    assert re.search(r"<link\b", html) is None
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert len(sources) == len(GOLD)
    assert all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert html.count("<svg") == 3  # training curves, per-class bars, count errors


def test_training_curves_show_only_logged_quantities(tmp_path):
    runs = build_fixture(tmp_path)
    log = runs[1].train_log
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows if "loss" in r))  # drop eval rows
    html = write_report(tmp_path / "out", runs).read_text()
    assert "training loss" in html and "reward margin" in html
    assert "eval loss" not in html


def test_max_gallery_keeps_improved_and_regressed_first(tmp_path):
    runs = build_fixture(tmp_path)
    html = write_report(tmp_path / "out", runs, max_gallery=3).read_text()
    ids = re.findall(r'data-id="([^"]+)"', html)
    assert ids == ["r0", "r3", "r4"]  # improved r0, r4 and regressed r3, in data order
    assert "the 3 most instructive of 6" in html


def test_unreadable_image_is_said_not_hidden(tmp_path):
    runs = build_fixture(tmp_path)
    (tmp_path / "images" / "scene_2.png").write_bytes(b"not an image")
    html = write_report(tmp_path / "out", runs).read_text()
    assert "image not readable" in html and "scene_2.png" in html
    assert len(re.findall(r'<img src="data:', html)) == len(GOLD) - 1


def test_bad_eval_folders_name_the_file(tmp_path):
    runs = build_fixture(tmp_path)
    (runs[1].eval_dir / "metrics.json").unlink()
    with pytest.raises(VlmtuneError, match=r"tuned/metrics\.json is missing"):
        write_report(tmp_path / "out", runs)
    runs = build_fixture(tmp_path / "again")
    samples = runs[0].eval_dir / "samples.jsonl"
    samples.write_text(samples.read_text() + '{"id": "r9", "answer": "x", "gold_counts": {"car": "many"}}\n')
    with pytest.raises(VlmtuneError, match=r"samples\.jsonl, line 7"):
        write_report(tmp_path / "out", runs)
    with pytest.raises(VlmtuneError, match="names must differ"):
        write_report(tmp_path / "out", [runs[0], runs[0]])


def test_metric_reported_by_one_model_only_gets_a_row(tmp_path):
    runs = build_fixture(tmp_path)
    path = runs[1].eval_dir / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["pref/reward_accuracy"] = {"value": 0.75, "ci_low": 0.5, "ci_high": 1.0, "n": 6}
    path.write_text(json.dumps(metrics))
    html = write_report(tmp_path / "out", runs).read_text()
    row = re.search(r'<tr data-metric="pref/reward_accuracy">(.*?)</tr>', html).group(1)
    assert "75.0%" in row and row.count("&ndash;") == 2  # no base value, no delta


# ----------------------------------------------------------------------------- the command
def test_compare_names_and_runs_are_checked(tmp_path, capsys):
    from vlmtune.cli import main
    from vlmtune.eval.compare import TunedRun, model_names, resolve_run

    assert model_names(["runs/dpo", "other/dpo"], None) == ["base", "dpo", "dpo-2"]
    assert model_names(["runs/dpo"], "before, after") == ["before", "after"]
    with pytest.raises(VlmtuneError, match="needs 3 non-empty labels"):
        model_names(["a", "b"], "x,y")
    with pytest.raises(VlmtuneError, match="must differ"):
        model_names(["a"], "x,x")
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    assert resolve_run(run) == TunedRun(None, run, None)
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    assert resolve_run(export) == TunedRun(export, None, None)
    code = main(["compare", "--base", "b", "--tuned", str(tmp_path / "nothing"),
                 "--data", "d.jsonl", "--out", str(tmp_path / "out")])
    assert code == 2 and "no such folder" in capsys.readouterr().err
    code = main(["compare", "--base", "b", "--tuned", str(tmp_path),
                 "--data", "d.jsonl", "--out", str(tmp_path / "out")])
    assert code == 2 and "not a training run" in capsys.readouterr().err


def test_compare_checks_names_runs_and_data_before_loading_a_model(tmp_path):
    from vlmtune.eval.compare import compare_models

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    out = tmp_path / "out"
    # "no-such-model" is never loaded: each mistake is found first, and nothing is written.
    with pytest.raises(VlmtuneError, match="needs 2 non-empty labels"):
        compare_models("no-such-model", [str(run)], tmp_path / "d.jsonl", out, names="a,b,c")
    with pytest.raises(VlmtuneError, match="nothing: no such folder"):
        compare_models("no-such-model", [str(run), str(tmp_path / "nothing")], tmp_path / "d.jsonl", out)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(VlmtuneError, match="empty.jsonl"):
        compare_models("no-such-model", [str(run)], empty, out)
    assert not out.exists()


def test_records_without_gold_counts_are_shown_unscored(tmp_path):
    runs = build_fixture(tmp_path)
    for run in runs:
        path = run.eval_dir / "samples.jsonl"
        row = {"id": "free", "image": None, "prompt": "Describe the scene.", "answer": "A road.",
               "chosen": "A busy road.", "gold_counts": None, "parsed_counts": None, "correct": None}
        path.write_text(path.read_text() + json.dumps(row) + "\n")
    html = write_report(tmp_path / "out", runs).read_text()
    assert 'data-vs-1="unscored" data-id="free"' in html
    assert "A busy road." in html
    assert 'data-vs-1="improved" data-id="r0"' in html


def test_compare_end_to_end_on_the_tiny_model(tiny_model_dir, synth_pairs_file, tmp_path, capsys):
    """Base vs base + a (random, nonzero) LoRA adapter on 8 records, through the command line."""
    import torch

    from vlmtune.cli import main
    from vlmtune.data.formats import read_records
    from vlmtune.data.writers import write_records
    from vlmtune.models.load import add_lora, load_model

    torch.manual_seed(0)
    model, _ = load_model(tiny_model_dir)
    model = add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA B starts at zero; move it so the adapter does something
    model.save_pretrained(tmp_path / "run" / "final")
    make_train_log(tmp_path / "run" / "metrics.jsonl")
    data = write_records(read_records(synth_pairs_file)[:8], tmp_path / "eight.jsonl", "vlmtune")
    data.write_text(data.read_text() + '{"id": "broken", "images": []}\n')
    out = tmp_path / "cmp"
    argv = ["compare", "--base", str(tiny_model_dir), "--tuned", str(tmp_path / "run"),
            "--data", str(data), "--out", str(out), "--names", "base,lora", "--max-new-tokens", "12"]

    assert main(argv) == 2  # the broken record stops it ...
    assert "--skip-bad" in capsys.readouterr().err
    # ... unless skipped, and then it says so
    assert main(argv + ["--skip-bad", "--blank-baseline", "--train-data", str(synth_pairs_file)]) == 0
    printed = capsys.readouterr()
    assert "skipped 1 of 9" in printed.err
    assert "lora vs base: exact match" in printed.out and "report.html" in printed.out
    # Counting records are count-family records: the family table, both models beside both baselines.
    table = printed.out[printed.out.index("accuracy by family"):].splitlines()
    assert table[0].split()[4:] == ["base", "lora", "majority", "answer", "blank", "image", "(base)",
                                    "blank", "image", "(lora)"]  # each model shown grey images
    assert table[1].split()[:2] == ["all", "8"] and table[2].split()[:2] == ["count", "8"]

    html = (out / "report.html").read_text()
    base_metrics = json.loads((out / "base" / "metrics.json").read_text())
    tuned_metrics = json.loads((out / "lora" / "metrics.json").read_text())
    assert "rewards/accuracies" in tuned_metrics  # the adapter switched off is its reference
    rows = re.findall(r'<tr data-metric="([^"]+)"', html)
    in_tables = {m for m in set(base_metrics) | set(tuned_metrics)
                 if m.startswith(("baseline/", "family/count/accuracy", "hops/1/accuracy", "axis/iid/accuracy"))}
    assert set(rows) == (set(base_metrics) | set(tuned_metrics)) - in_tables  # those are in the tables
    assert set(re.findall(r'<tr data-family="([^"]+)"', html)) == {"all", "count"}
    assert "<th>blank image (base)</th>" in html and "<th>blank image (lora)</th>" in html
    assert "majority answer <span class=\"muted\">(from the training file)</span>" in html
    assert "lora vs base: exact match" in html  # counting data: the headline is today's
    assert len(re.findall(r'<article class="card"', html)) == 8
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', html)) == 8
    assert "lora vs base: exact match" in html and "training loss" in html
    assert re.search(r"https?://", html) is None
