"""Task-generic evaluation: per family / hop / OOD axis with CIs, format, length, truncation,
think/answer consistency, grounding IoU, the majority and blank-image baselines, the tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmtune.data.records import PreferenceRecord, user_prompt
from vlmtune.eval.baselines import majority_answers, majority_completion
from vlmtune.eval.breakdown import breakdown_tables
from vlmtune.eval.run import base_sample, score_baselines, score_tasks
from vlmtune.eval.tasks import think_conclusion, think_consistent
from vlmtune.tasks.counting import CountingTask

SPATIAL = [{"op": "filter", "classes": ["bus"]}, {"op": "relate", "in": 0}, {"op": "count", "in": 1}]
ARITH = [{"op": "filter", "classes": ["car"]}, {"op": "count", "in": 0}]
COMPARE = [{"op": "count"}, {"op": "count"}, {"op": "compare"}]
GROUND = [{"op": "filter"}, {"op": "argmax"}, {"op": "box"}]
GOLD_COUNTS = {"car": 2, "motorcycle": 1, "bus": 0, "bicycle": 0}


def task_record(rid, family, kind, answer, hops, *, think=False, axis=None, split="test", program=None,
                image="a.png", question=None):
    meta = {"family": family, "kind": kind, "answer": answer, "hops": hops, "think": think, "axis": axis,
            "program": program or [], "question": question or f"question {rid}", "extra": {}}
    return PreferenceRecord(rid, [image], user_prompt(meta["question"]), "x", "y", {"split": split, "task": meta})


def mixed_records() -> tuple[list[PreferenceRecord], list[str]]:
    """Ten records of six families with hand-written answers (the expected scores in comments)."""
    counting = CountingTask()
    pairs = [
        (task_record("r0", "spatial", "integer", 2, 3, program=SPATIAL), "2"),  # right
        (task_record("r1", "arithmetic", "integer", 3, 2, program=ARITH), "4"),  # wrong
        (task_record("r2", "compare", "verdict", "more", 3, program=COMPARE), "more"),  # right
        (task_record("r3", "grounding", "box", [0, 0, 10, 10], 2, program=GROUND), "[0, 0, 10, 5]"),  # IoU 1/2
        (task_record("r4", "grounding", "box", [0, 0, 10, 10], 2, program=GROUND), "[5, 0, 15, 10]"),  # IoU 1/3
        (PreferenceRecord("r5", ["a.png"], user_prompt("Count."), "x", "y", {"counts": GOLD_COUNTS}),
         counting.render(GOLD_COUNTS)),  # a counting record of before tasks: right
        (task_record("r6", "attribute", "integer", 1, 1, axis="combos", split="ood_combos"), "one"),  # right
        (task_record("r7", "spatial", "integer", 2, 3, think=True, program=SPATIAL),
         "<think>1 left of it, then 1 more: 2</think><answer>2</answer>"),  # right, consistent
        (task_record("r8", "arithmetic", "integer", 4, 2, think=True, split="ood_hops", program=ARITH),
         "<think>so 3</think><answer>4</answer>"),  # right, inconsistent
        (task_record("r9", "arithmetic", "integer", 4, 2, think=True, program=ARITH), "4"),  # no tags: unread
    ]
    return [r for r, _ in pairs], [a for _, a in pairs]


def test_mixed_families_scored_by_hand():
    records, answers = mixed_records()
    samples = [base_sample(r, a) for r, a in zip(records, answers)]
    lengths = [1, 1, 1, 8, 8, 12, 1, 8, 8, 1]
    m = score_tasks(records, answers, samples, seed=0, lengths=lengths, max_new_tokens=8)
    value = {k: v["value"] for k, v in m.items()}
    assert value["task/accuracy"] == pytest.approx(7 / 10)
    assert m["task/accuracy"]["n"] == 10
    assert value["family/spatial/accuracy"] == 1.0 and m["family/spatial/accuracy"]["n"] == 2
    assert value["family/arithmetic/accuracy"] == pytest.approx(1 / 3)
    assert value["family/count/accuracy"] == 1.0 and value["family/compare/accuracy"] == 1.0
    assert value["family/grounding/accuracy"] == pytest.approx(1 / 2)  # Acc@IoU0.5
    assert value["family/grounding/acc@0.5"] == pytest.approx(1 / 2)
    assert value["family/grounding/iou"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    # Hops: 3 -> r0, r2, r7 (all right); 2 -> r1, r3, r4, r8, r9 (r3, r8 right); 1 -> r5, r6.
    assert value["hops/3/accuracy"] == 1.0
    assert value["hops/2/accuracy"] == pytest.approx(2 / 5)
    assert value["hops/1/accuracy"] == 1.0
    # Axis: metadata.task.axis (r6), else the ood_ split (r8); the rest in distribution.
    assert value["axis/combos/accuracy"] == 1.0 and value["axis/hops/accuracy"] == 1.0
    assert value["axis/iid/accuracy"] == pytest.approx(5 / 8)
    assert value["task/format_rate"] == pytest.approx(9 / 10)  # r9 lacks the tags its record asks for
    assert value["task/think_consistency"] == pytest.approx(1 / 2) and m["task/think_consistency"]["n"] == 2
    assert value["task/answer_tokens"] == pytest.approx(sum(lengths) / 10)
    assert value["task/truncation_rate"] == pytest.approx(5 / 10)  # lengths 8, 8, 12, 8, 8 reach 8
    # The counting record keeps today's names and numbers beside the task metrics.
    assert value["exact_match"] == 1.0 and m["exact_match"]["n"] == 1
    for entry in m.values():
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    lo, hi = m["task/accuracy"]["ci_low"], m["task/accuracy"]["ci_high"]
    assert 0.0 < lo < 0.7 < hi <= 1.0
    by_id = {s["id"]: s for s in samples}
    assert by_id["r3"]["correct"] is True and by_id["r4"]["correct"] is False
    assert by_id["r3"]["gold_text"] == "[0, 0, 10, 10]" and by_id["r3"]["family"] == "grounding"
    assert by_id["r5"]["family"] == "count" and by_id["r5"]["class_hits"] == {c: True for c in GOLD_COUNTS}
    # Each sample's values are the numbers the metrics average.
    spatial = [s["values"]["family/spatial/accuracy"] for s in samples if s["family"] == "spatial"]
    assert sum(spatial) / len(spatial) == value["family/spatial/accuracy"]


def test_a_record_without_task_is_left_to_the_other_metrics_and_bad_family_names_the_record():
    plain = PreferenceRecord("p", ["a.png"], user_prompt("Describe."), "x", "y", {})
    records, answers = mixed_records()
    samples = [base_sample(r, a) for r, a in zip([plain, *records], ["", *answers])]
    m = score_tasks([plain, *records], ["", *answers], samples, seed=0)
    assert m["task/accuracy"]["n"] == 10 and samples[0]["correct"] is None
    assert "task/answer_tokens" not in m  # hand answers: no token counts, no made-up lengths
    bad = task_record("odd", "poetry", "integer", 1, 1)
    from vlmtune.errors import VlmtuneError

    with pytest.raises(VlmtuneError, match=r"record odd: unknown task family 'poetry'; the families are count"):
        score_tasks([bad], ["1"], [base_sample(bad, "1")], seed=0)


def test_think_conclusion_and_consistency_rules():
    assert think_conclusion("2 cars, 1 bus; 2 + 1 = 3", "integer") == "3"
    assert think_conclusion("bus count 2 is more than 1; so more", "verdict") == "more"
    assert think_conclusion("first [1, 2, 3, 4], no: [5, 6, 7, 8]", "box") == "[5, 6, 7, 8]"
    assert think_conclusion("nothing said", "integer") is None
    assert think_conclusion("2 boxes", "boxes") is None
    meta = {"kind": "integer", "answer": 3, "think": True, "extra": {}}
    assert think_consistent("<think>so three... 3</think><answer>three</answer>", meta) == 1.0
    assert think_consistent("<think>so 3</think><answer>4</answer>", meta) == 0.0
    assert think_consistent("<think>no number</think><answer>4</answer>", meta) is None
    assert think_consistent("<think>3</think><answer>3 or 4</answer>", meta) is None  # answer unread
    assert think_consistent("3", {**meta, "think": False}) is None
    compound = {"kind": "compound", "answer": [[2, "bus"], [3, "car"]], "think": True, "extra": {}}
    compound["answer"] = [[2, "bus"], [3, "car"], "fewer"]
    assert think_consistent("<think>2 < 3 so fewer</think><answer>2 buses, 3 cars: fewer</answer>", compound) == 1.0
    assert think_consistent("<think>so more</think><answer>2 buses, 3 cars: fewer</answer>", compound) == 0.0


def test_majority_baseline_from_train_counts_each_question_once():
    train = [task_record(f"t{i}", "spatial", "integer", a, 3, program=SPATIAL, image=f"{i}.png")
             for i, a in enumerate([2, 2, 3])]
    # Three pairs of one question (same image and text) vote once: 2 and 3 tie at two votes each,
    # and a tie goes to the answer text first in order, "2".
    train += [task_record(f"d{j}", "spatial", "integer", 3, 3, program=SPATIAL, image="dup.png", question="q")
              for j in range(3)]
    train += [task_record(f"c{i}", "compare", "verdict", v, 3, program=COMPARE, image=f"c{i}.png")
              for i, v in enumerate(["more", "fewer", "fewer"])]
    majority = majority_answers(train)
    assert majority == {"spatial:filter>relate>count": "2", "compare:count>count>compare": "fewer"}
    evals = [task_record("e0", "spatial", "integer", 2, 3, program=SPATIAL),
             task_record("e1", "spatial", "integer", 3, 3, program=SPATIAL),
             task_record("e2", "compare", "verdict", "fewer", 3, program=COMPARE),
             task_record("e3", "compare", "verdict", "more", 3, program=COMPARE, think=True),
             task_record("e4", "arithmetic", "integer", 0, 2, program=ARITH)]  # type never seen: empty answer
    assert majority_completion(evals[3], majority) == "<think></think><answer>fewer</answer>"
    assert majority_completion(evals[4], majority) == ""
    answers = ["9"] * len(evals)
    samples = [base_sample(r, a) for r, a in zip(evals, answers)]
    score_tasks(evals, answers, samples, seed=0)
    m = score_baselines(None, None, evals, samples, train, False, 4, 8, seed=0)
    assert m["baseline/majority/task/accuracy"]["value"] == pytest.approx(2 / 5)
    assert m["baseline/majority/family/spatial/accuracy"]["value"] == pytest.approx(1 / 2)
    assert m["baseline/majority/family/compare/accuracy"]["value"] == pytest.approx(1 / 2)
    assert m["baseline/majority/family/arithmetic/accuracy"]["value"] == 0.0
    assert not any(k.startswith("baseline/blank/") for k in m)
    assert samples[0]["majority_answer"] == "2"
    # Without a training file the evaluated records are the source (optimistic: 1 of 2 per type
    # here too, ties broken by the text's order).
    fallback = score_baselines(None, None, evals, samples, None, False, 4, 8, seed=0)
    assert fallback["baseline/majority/family/spatial/accuracy"]["value"] == pytest.approx(1 / 2)


def test_breakdown_tables_put_baselines_beside_the_model():
    entry = lambda v, n: {"value": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "n": n}  # noqa: E731
    metrics = {"task/accuracy": entry(0.5, 4), "family/count/accuracy": entry(0.25, 2),
               "family/spatial/accuracy": entry(0.75, 2), "hops/1/accuracy": entry(0.5, 4),
               "baseline/majority/task/accuracy": entry(0.3, 4),
               "baseline/majority/family/count/accuracy": entry(0.2, 2)}
    text = breakdown_tables([("model", metrics)])
    lines = text.splitlines()
    assert lines[0].split() == ["accuracy", "by", "family", "n", "model", "majority", "answer"]
    assert lines[1].split()[:6] == ["all", "4", "50.0%", "[40.0,", "60.0]", "30.0%"]
    assert lines[2].split()[:6] == ["count", "2", "25.0%", "[15.0,", "35.0]", "20.0%"]
    assert lines[3].split()[:5] == ["spatial", "2", "75.0%", "[65.0,", "85.0]"] and lines[3].split()[-1] == "-"
    assert "hop count" not in text  # one hop count only: no table repeating "all"
    assert breakdown_tables([("model", {"exact_match": entry(1.0, 1)})]) == ""


@pytest.fixture(scope="module")
def mixed_files(tmp_path_factory) -> tuple[Path, Path]:
    """A mixed-family eval file built by `vlmtune data tasks` (one record per family and two OOD),
    and the build's training file."""
    from vlmtune.cli import main
    from vlmtune.data.formats import iter_records
    from vlmtune.data.synth import generate_scenes
    from vlmtune.data.writers import write_records

    root = tmp_path_factory.mktemp("mixed")
    scenes = generate_scenes(root / "scenes", 12, seed=3, image_size=112, layout="free", count_range=(0, 4),
                             attributes=True, workers=1)
    assert main(["data", "tasks", "--scenes", str(scenes), "--out", str(root / "tasks"), "--rejects", "1"]) == 0
    picked, seen = [], set()
    for record in iter_records(root / "tasks" / "train.jsonl"):
        if record.metadata["task"]["family"] not in seen:
            seen.add(record.metadata["task"]["family"])
            picked.append(record)
    picked += list(iter_records(root / "tasks" / "ood_objects.jsonl"))[:2]
    return write_records(picked, root / "mixed.jsonl", "vlmtune"), root / "tasks" / "train.jsonl"


def test_eval_cli_on_a_mixed_file_with_both_baselines(tiny_model_dir, mixed_files, tmp_path, capsys):
    from vlmtune.cli import main

    data, train = mixed_files
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                 "--train-data", str(train), "--blank-baseline", "--max-new-tokens", "6", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    families = {r["family"] for r in rows}
    assert families == {"count", "compare", "arithmetic", "spatial", "attribute", "grounding", "list", "multihop"}
    for family in families:
        entry = metrics[f"family/{family}/accuracy"]
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
        assert f"baseline/majority/family/{family}/accuracy" in metrics
        assert f"baseline/blank/family/{family}/accuracy" in metrics
    assert metrics["axis/objects/accuracy"]["n"] == 2
    assert {"family/grounding/iou", "family/grounding/acc@0.5", "task/truncation_rate", "task/format_rate"} <= set(metrics)
    assert all(isinstance(r["blank_answer"], str) for r in rows)
    # A tiny random model writes to its limit: the truncation rate is what the lengths say.
    truncated = [r["values"]["task/truncation_rate"] for r in rows]
    assert metrics["task/truncation_rate"]["value"] == pytest.approx(sum(truncated) / len(rows))
    assert "accuracy by family" in printed and "majority answer" in printed and "blank image" in printed
    assert "accuracy by OOD axis" in printed and f"majority answer per question type from {train}" in printed
    for family in families:
        assert any(line.startswith(family + " ") for line in printed.splitlines())


def test_eval_cli_baseline_flags_need_data(tmp_path, capsys):
    from vlmtune.cli import main

    assert main(["eval", "--model", "m", "--mme", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--blank-baseline"]) == 2
    assert "--train-data and --blank-baseline go with --data" in capsys.readouterr().err


def mixed_eval_dirs(root: Path) -> list:
    """Evaluation folders of a base and a tuned model on :func:`mixed_records`; the tuned model
    gets r1 (arithmetic) and r4 (grounding) right as well."""
    from vlmtune.eval.run import write_results
    from vlmtune.report.inputs import RunResult

    records, answers = mixed_records()
    tuned_answers = list(answers)
    tuned_answers[1] = "3"
    tuned_answers[4] = "[0, 0, 10, 10]"
    runs = []
    for name, said in (("base", answers), ("tuned", tuned_answers)):
        samples = [base_sample(r, a) for r, a in zip(records, said)]
        metrics = score_tasks(records, said, samples, seed=0)
        metrics.update(score_baselines(None, None, records, samples, None, False, 4, 8, seed=0))
        runs.append(RunResult(name, write_results(root / name, metrics, samples)))
    return runs


def test_report_has_family_tables_with_paired_deltas_and_a_family_filter(tmp_path):
    import re

    from vlmtune.report.html import write_report

    html = write_report(tmp_path / "out", mixed_eval_dirs(tmp_path)).read_text()
    deltas = json.loads((tmp_path / "out" / "comparison.json").read_text())["models"]["tuned"]["deltas"]
    # Paired over the two grounding records: (0 + 1) / 2; arithmetic over its three: 1 / 3.
    assert deltas["family/grounding/accuracy"]["delta"] == pytest.approx(1 / 2)
    assert deltas["family/arithmetic/accuracy"]["delta"] == pytest.approx(1 / 3)
    assert deltas["family/spatial/accuracy"]["delta"] == 0.0
    assert deltas["baseline/majority/task/accuracy"]["delta"] == 0.0  # the same guesses for both
    section = re.search(r'<section class="groups" data-group="family">(.*?)</section>', html, re.S)[1]
    assert "Accuracy by family" in section and "majority answer" in section
    rows = dict(re.findall(r'<tr data-family="([^"]+)">(.*?)</tr>', section))
    assert set(rows) == {"all", "spatial", "arithmetic", "compare", "grounding", "count", "attribute"}
    assert "50.0%" in rows["grounding"] and "100.0%" in rows["grounding"] and "+50.0" in rows["grounding"]
    assert 'data-group="hops"' in html and 'data-group="axis"' in html
    assert "(from the evaluated data itself: optimistic)" in section
    # On mixed data the headline is task accuracy (the exact match covers the one counting record).
    assert "tuned vs base: task accuracy +20.0 points" in html
    # The metrics table leaves the tables' rows to them, and keeps the rest.
    metric_rows = set(re.findall(r'<tr data-metric="([^"]+)"', html))
    assert {"task/accuracy", "family/grounding/iou", "exact_match", "task/format_rate"} <= metric_rows
    assert not any(m.startswith("baseline/") or m == "family/spatial/accuracy" for m in metric_rows)
    cards = dict(re.findall(r'data-id="([^"]+)" data-family="([^"]+)"', html))
    assert cards["r3"] == "grounding" and cards["r5"] == "count" and len(cards) == 10
    options = re.search(r'<select id="family">(.*?)</select>', html)[1]
    assert re.findall(r'value="([^"]+)"', options) == ["all", "arithmetic", "attribute", "compare", "count",
                                                       "grounding", "spatial"]
    assert 'getAttribute("data-family")' in html
    # Right / wrong comes from the task for every family: r4 was wrong and is now right.
    assert re.search(r'data-vs-1="improved" data-id="r4"', html)


def test_eval_cli_refuses_a_task_record_it_cannot_score_before_loading_a_model(tmp_path, capsys):
    from PIL import Image

    from vlmtune.cli import main
    from vlmtune.data.writers import write_records

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    good = task_record("good", "spatial", "integer", 2, 3)
    bad = task_record("bad", "spatial", "integer", 2, 3)
    del bad.metadata["task"]["kind"]
    for record in (good, bad):
        record.images = [str(tmp_path / "a.png")]
    data = write_records([good, bad], tmp_path / "data.jsonl", "vlmtune")
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {data}: record bad: its metadata.task cannot be scored (missing 'kind'); a task record needs " \
           "family, kind and answer as `vlmtune data tasks` writes them: rebuild the file or fix the record" in err


def test_eval_and_report_ask_the_task_and_import_no_counting_code():
    import ast

    import vlmtune

    root = Path(vlmtune.__file__).parent
    for path in [*(root / "eval").glob("*.py"), *(root / "report").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):  # "from vlmtune.tasks import counting" too
                names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.startswith("vlmtune.tasks.counting") or n == "vlmtune.rewards" for n in names), path
