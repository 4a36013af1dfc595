"""The demo: the simulated rater by hand, stage reuse, the verdict, and a cut-down run end to end."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from vlmtune.cli import main
from vlmtune.demo import (CONTROL, DEFAULT_METHOD, METHODS, RFT, DemoSettings, budget_points, control_for, final_dir,
                        make_data, results_table, scored_samples, train_config, verdict)
from vlmtune.demo_rater import rater_choice, total_error
from vlmtune.report.plots import budget_curves
from vlmtune.errors import VlmtuneError
from vlmtune.stages import run_stage, stage_key
from vlmtune.tasks.counting import DEFAULT_CLASSES, CountingTask

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


def _row(name, em, loss=None, algo="dpo", scored=1600):
    m = {"value": em, "ci_low": em - 0.05, "ci_high": em + 0.05}
    return {"method": name, "algo": algo, "em": m, "em_ood": m, "class_acc": m, "parse_fail": m, "pref_acc": m,
            "final_loss": loss, "wall_s": 1.0, "scored": scored}


def test_table_and_verdict_report_the_numbers_given():
    rows = [_row("warm-up (before)", 0.20, algo="sft"), _row("sft-on-chosen", 0.28, 0.5, algo="sft"),
            _row("dpo", 0.10, 0.7), _row("dpop", 0.33, 0.6)]
    table = results_table(rows)
    assert "| dpop | 33.0 [28.0, 38.0]" in table
    assert "| scored samples | wall s |" in table and "| 0.600 | 1,600 | 1 |" in table
    assert verdict(rows) == ("best preference method: dpop, held-out exact match 20.0% -> 33.0% (+13.0 points); "
                             "control (SFT on the same chosen answers) 28.0% (+5.0 points vs control)")


def test_verdict_reports_grpo_beside_the_preference_losses_not_as_one():
    rows = [_row("warm-up (before)", 0.217, algo="sft"), _row("sft-on-chosen", 0.223, algo="sft"),
            _row("dpop", 0.230), _row("grpo", 0.607, algo="grpo")]
    text = verdict(rows)
    assert text.startswith("best preference method: dpop, held-out exact match 21.7% -> 23.0% (+1.3 points)")
    assert text.endswith("grpo (RL on the rater's count reward, not a preference loss): held-out exact match "
                         "21.7% -> 60.7% (+39.0 points), +38.4 vs sft-on-chosen")
    only_grpo = verdict([rows[0], rows[3]])
    assert "best preference method" not in only_grpo and "21.7% -> 60.7%" in only_grpo
    assert verdict([rows[0], rows[1]]) == "no preference method was run"


def test_verdict_compares_an_online_method_with_rft_and_grpo_with_rft():
    rows = [_row("warm-up (before)", 0.20, algo="sft"), _row("sft-on-chosen", 0.30, algo="sft"),
            _row("dpop", 0.22), _row("rft", 0.25, algo="rft", scored=25600),
            _row("online-dpop", 0.31, algo="online_dpo", scored=25600), _row("grpo", 0.24, algo="grpo", scored=25600)]
    assert verdict(rows) == (
        "best preference method: online-dpop, held-out exact match 20.0% -> 31.0% (+11.0 points); "
        "control (RFT, SFT on the best of the same samples) 25.0% (+6.0 points vs control); "
        "grpo (RL on the rater's count reward, not a preference loss): held-out exact match 20.0% -> 24.0% "
        "(+4.0 points), -1.0 vs rft")
    # RFT is the control of online and iterative DPO, never a preference method itself
    assert "best preference method: dpop" in verdict(rows[:4])


def test_each_method_has_the_control_that_sees_the_same_information():
    by_name = {m.name: m for m in METHODS}
    assert control_for(by_name["dpop"]) == CONTROL and control_for(by_name["mpo"]) == CONTROL
    for name in ("online-dpop", "online-mpo", "iterative-dpop", "grpo"):
        assert control_for(by_name[name]) == RFT
    assert control_for(DEFAULT_METHOD) in METHODS


def _config(method, tmp_path, s=None):
    s = s or DemoSettings(out=tmp_path)
    return train_config(s, tmp_path / "model", tmp_path / "pairs.jsonl", tmp_path / "run", method.algo,
                        steps=method.steps or s.pref_steps, lr=method.lr or s.pref_lr,
                        batch_size=method.batch_size or s.pref_batch_size, lora=True, loss=method.loss,
                        grpo=method.grpo, online=method.online)


def test_scored_samples_count_every_answer_a_reward_or_the_rater_scored(tmp_path):
    by_name = {m.name: m for m in METHODS}
    budget = {name: scored_samples(_config(by_name[name], tmp_path), pool=800, rated=800 * 2) for name in by_name}
    assert budget["grpo"] == 800 * 8 * 16  # steps x images per step x group size = 102,400
    assert budget["online-dpop"] == budget["online-mpo"] == budget["rft"] == 200 * 16 * 8  # 25,600
    assert budget["iterative-dpop"] == 4 * 800 * 8  # rounds x pool x k = 25,600
    assert budget["dpop"] == budget["sft-on-chosen"] == budget["mpo"] == 1600  # the rater's 2 answers x 800 images
    # gradient accumulation multiplies the prompts of a step
    cfg = _config(by_name["rft"], tmp_path)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_accum": 3})})
    assert scored_samples(cfg, pool=800, rated=0) == 200 * 16 * 3 * 8


def test_budget_points_start_at_the_warm_up_and_charge_the_offline_methods_for_the_raters_samples():
    rows = [_row("warm-up (before)", 0.20, algo="sft", scored=0), _row("dpop", 0.25),
            _row("online-dpop", 0.30, algo="online_dpo", scored=25600)]
    points = budget_points(rows, pairs_s=7.0)
    assert points["dpop"][0] == points["online-dpop"][0]
    assert points["dpop"][0]["scored"] == 0 and points["dpop"][0]["seconds"] == 0.0
    assert points["dpop"][0]["em"] == pytest.approx(20.0) and points["dpop"][0]["ci"] == pytest.approx([15.0, 25.0])
    # the offline method's seconds: its training (1 s) and the 7 s of sampling the rater scored
    assert points["dpop"][1]["scored"] == 1600 and points["dpop"][1]["seconds"] == 8.0
    assert points["online-dpop"][1]["scored"] == 25600 and points["online-dpop"][1]["seconds"] == 1.0
    assert points["online-dpop"][1]["em"] == pytest.approx(30.0)
    assert points["online-dpop"][1]["ci"] == pytest.approx([25.0, 35.0])
    svg = budget_curves(points)
    assert svg.startswith("<svg") and "online-dpop" in svg and "scored samples" in svg and "seconds" in svg
    assert budget_curves({}) == "" and budget_curves({"dpop": []}) == ""


def test_final_dir_of_iterative_dpo_is_the_last_rounds(tmp_path):
    by_name = {m.name: m for m in METHODS}
    last_round = tmp_path / "run" / "rounds" / "r3"  # 4 rounds: r0 ... r3
    assert final_dir(_config(by_name["iterative-dpop"], tmp_path)) == last_round / "train" / "final"
    assert final_dir(_config(by_name["online-dpop"], tmp_path)) == tmp_path / "run" / "final"


def test_no_method_skips_bad_data_and_rft_keeps_only_exactly_right_answers(tmp_path):
    # iterative DPO's rounds write only pairs their loader accepts (tests/test_iterative.py): nothing to skip
    assert not any(_config(m, tmp_path).data.skip_bad for m in METHODS)
    # count exact (1) + partial (1): the threshold keeps an answer only when every count is right
    assert _config(RFT, tmp_path).online.rft_threshold == 2.0


def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert stage in printed
    assert "| method | EM test |" in printed and "report:" in printed
    best = DEFAULT_METHOD.name
    for path in ("model/config.json", "runs/warmup/final", "data/pref_pairs.jsonl", "results.json",
                 "results.md", "report/report.html", "eval/warmup/test/metrics.json",
                 f"eval/{best}/test/metrics.json", "eval/sft-on-chosen/ood/samples.jsonl",
                 f"runs/{best}/metrics.jsonl", f"runs/{best}/final/adapter_config.json"):
        assert (out / path).exists(), path
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["warm-up (before)", control_for(DEFAULT_METHOD).name, best]
    pairs = [json.loads(line) for line in (out / "data" / "pref_pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    html = (out / "report" / "report.html").read_text()
    assert best in html and control_for(DEFAULT_METHOD).name in html and "<svg" in html
    # The same command again reuses every stage: nothing is retrained or re-evaluated.
    stages = ("model", "runs/warmup", f"runs/{best}", f"eval/{best}/test")
    for stage in stages:
        (out / stage / "marker").write_text("removed if the stage reruns")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert all((out / stage / "marker").exists() for stage in stages)
    assert json.loads((out / "results.json").read_text()) == rows


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_every_method_makes_a_valid_training_config(method, tmp_path):
    """A typo in a method's loss or grpo overrides fails here, not an hour into `demo --full`."""
    cfg = _config(method, tmp_path)
    assert cfg.train.algo == method.algo
    for key, value in method.loss.items():
        assert getattr(cfg.loss, key) == value
    for key, value in method.grpo.items():
        if key != "rewards":
            assert getattr(cfg.grpo, key) == value
    for key, value in method.online.items():
        if key != "rewards":
            assert getattr(cfg.online, key) == value


# ----------------------------------------------------------------------------- stage reuse
def _build(path: Path, text: str, calls: list[str]):
    def build():
        calls.append(text)
        path.mkdir(parents=True, exist_ok=True)
        (path / "out.txt").write_text(text)
    return build


def test_a_stage_is_reused_with_the_same_settings_and_rerun_on_any_difference(tmp_path):
    out, record, calls = tmp_path / "stage", tmp_path / "stage.json", []
    quick, full = {"n": 4, "range": (0, 3)}, {"n": 1600, "range": (0, 3)}
    assert run_stage(record, quick, [out], _build(out, "quick", calls))
    (out / "stale.txt").write_text("left by the quick run")
    assert not run_stage(record, {"range": [0, 3], "n": 4}, [out], _build(out, "again", calls))  # same, as JSON
    assert calls == ["quick"] and (out / "stale.txt").exists()
    assert run_stage(record, full, [out], _build(out, "full", calls))
    assert calls == ["quick", "full"] and (out / "out.txt").read_text() == "full"
    assert not (out / "stale.txt").exists()  # the old stage's outputs went before the rerun
    (out / "out.txt").unlink()
    assert run_stage(record, full, [out / "out.txt"], _build(out, "restored", calls))  # an output gone
    assert stage_key(quick) != stage_key(full) and stage_key(full) == stage_key({"range": [0, 3], "n": 1600})


def test_an_interrupted_stage_runs_again_and_unrecorded_outputs_are_never_deleted(tmp_path):
    out, record = tmp_path / "stage", tmp_path / "stage.json"

    def interrupted():
        out.mkdir()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(record, {"n": 1}, [out], interrupted)
    calls: list[str] = []
    assert run_stage(record, {"n": 1}, [out], _build(out, "done", calls)) and calls == ["done"]
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(VlmtuneError, match=r"mine exists, but no stage record .*delete it or choose another"):
        run_stage(tmp_path / "mine.stage.json", {"n": 1}, [mine], _build(mine, "x", calls))
    assert mine.is_dir() and calls == ["done"]


def test_make_data_reruns_only_the_split_whose_settings_changed(tmp_path):
    sizes = dict(n_sft=3, n_pref=2, n_test=2, n_ood=2)
    first = make_data(DemoSettings(out=tmp_path, **sizes))
    marker = tmp_path / "data" / "scenes-sft" / "marker"
    marker.write_text("still here if the sft split is reused")
    again = make_data(DemoSettings(out=tmp_path, **sizes))
    assert again == first and marker.exists()
    changed = make_data(DemoSettings(out=tmp_path, **{**sizes, "n_test": 3}))
    assert len(changed["test"].path.read_text().splitlines()) == 3
    assert changed["test"].key != first["test"].key and changed["sft"] == first["sft"] and marker.exists()
    reseeded = make_data(DemoSettings(out=tmp_path, seed=1, **sizes))
    assert all(reseeded[name].key != first[name].key for name in first) and not marker.exists()


# ----------------------------------------------------------------------------- the reasoning demo
def _task_record(record_id: str, family: str, answer, hops: int, think: bool = False):
    from vlmtune.data.records import PreferenceRecord, user_prompt

    task = {"family": family, "kind": "integer", "answer": answer, "hops": hops, "think": think}
    return PreferenceRecord(id=record_id, images=[], prompt=user_prompt("How many?"), chosen=str(answer),
                            rejected=str(answer + 1), metadata={"task": task})


def _write(path, records):
    from vlmtune.data.writers import write_records

    write_records(records, path, "vlmtune")
    return path


def test_majority_baseline_answers_each_question_type_with_its_train_mode_by_hand(tmp_path):
    from dataclasses import replace

    from vlmtune.data.records import user_prompt
    from vlmtune.demo_reasoning import ReasoningSettings, correct_by_id, majority_baseline

    def rec(i, family, answer, hops=1):  # distinct questions: the baseline counts each question once
        return replace(_task_record(f"{family}{i}", family, answer, hops), prompt=user_prompt(f"How many {i}?"))

    # train: spatial's mode is 2 (two votes against one), arithmetic's is 0
    _write(tmp_path / "train.jsonl", [rec(1, "spatial", 2), rec(2, "spatial", 2), rec(3, "spatial", 1),
                                      rec(4, "arithmetic", 0)])
    # test: spatial 2 (right), spatial 1 (wrong), arithmetic 0 (right, 2 hops), count 3 (a type train
    # never saw: empty answer, wrong)
    _write(tmp_path / "test.jsonl", [rec(5, "spatial", 2), rec(6, "spatial", 1), rec(7, "arithmetic", 0, 2),
                                     rec(8, "count", 3)])
    out = majority_baseline(ReasoningSettings(out=tmp_path / "demo"), (tmp_path, "key"), ["test"])["test"]
    assert out["task/accuracy"]["value"] == 0.5 and out["task/accuracy"]["n"] == 4
    assert out["family/spatial/accuracy"]["value"] == 0.5 and out["family/arithmetic/accuracy"]["value"] == 1.0
    assert out["family/count/accuracy"]["value"] == 0.0
    assert out["hops/1/accuracy"]["value"] == 1 / 3 and out["hops/2/accuracy"]["value"] == 1.0
    assert out["task/format_rate"]["value"] == 0.75  # the empty answer has no answer
    assert correct_by_id(tmp_path / "demo" / "eval" / "majority" / "test") == {
        "spatial5": 1.0, "spatial6": 0.0, "arithmetic7": 1.0, "count8": 0.0}


def test_rft_samples_as_grpo_does_and_keeps_only_fully_correct_answers(tmp_path):
    from vlmtune.demo_reasoning import ACCURACY, ReasoningSettings, rl_config
    from vlmtune.stages import Made

    s = ReasoningSettings(out=tmp_path)
    warm, pool = Made(tmp_path / "warm", "w"), Made(tmp_path / "pool.jsonl", "p")
    for think in (False, True):
        grpo, rft = (rl_config(s, warm, pool, algo, algo, think) for algo in ("grpo", "rft"))
        assert rft.train.algo == "rft" and rft.train.batch_size == grpo.train.batch_size == s.rl_prompts
        assert rft.train.max_steps == grpo.train.max_steps and rft.train.lr == grpo.train.lr
        for key in ("group_size", "temperature", "max_new_tokens"):
            assert getattr(rft.online, key) == getattr(grpo.grpo, key), key
        assert rft.online.rft_threshold == 1.0 and [r.name for r in rft.online.rewards] == [ACCURACY]
    assert rl_config(s, warm, pool, "sft-gold", "sft", False).train.batch_size == s.sft_batch_size


def _reasoning_row(method, value, delta):
    m = {"value": value, "ci_low": value - 0.1, "ci_high": value + 0.1, "n": 10}
    split = {"task/accuracy": m, "family/count/accuracy": m, "family/count/class_accuracy": m,
             "hops/1/accuracy": m, "hops/3/accuracy": m, "task/format_rate": m}
    return {"method": method, "wall_s": 2.0, "paired": {"value": delta, "ci_low": delta - 0.05, "ci_high": delta + 0.05},
            "results": {"test": split, "ood_hops": {"task/accuracy": m}}}


def test_reasoning_tables_and_verdict_report_the_numbers_given():
    from vlmtune.demo_reasoning import tables, verdict

    rows = [_reasoning_row("warm-up", 0.2, 0.0), _reasoning_row("grpo", 0.5, 0.3), _reasoning_row("rft", 0.22, 0.02),
            _reasoning_row("sft-gold", 0.1, -0.1)]
    text = tables(rows)
    assert "| grpo | 50.0 [40.0, 60.0] | +30.0 [+25.0, +35.0] | 50.0 [40.0, 60.0] | 50.0 [40.0, 60.0] | 2 |" in text
    assert "| method | 1 hops | 3 hops |" in text and "| method | OOD hops (n=10) |" in text
    assert verdict(rows) == ("grpo: +30.0 [+25.0, +35.0] points on test, better than its warm-up; "
                             "rft: +2.0 [-3.0, +7.0] points on test, not told apart from its warm-up; "
                             "sft-gold: -10.0 [-15.0, -5.0] points on test, worse than its warm-up")
    with_floor = verdict([*rows[:2], _reasoning_row("majority answer", 0.3, 0.1)])
    assert with_floor == ("grpo: +30.0 [+25.0, +35.0] points on test, better than its warm-up "
                          "(50.0% against the majority answer's 30.0%)")


def test_quick_reasoning_demo_runs_every_method_and_writes_tables_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--task", "reasoning", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| method | all (test) |" in printed and "| method | OOD objects" in printed and "report:" in printed
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["warm-up", "majority answer", "grpo", "rft", "sft-gold",
                                           "warm-up-think", "grpo-think"]
    for path in ("data/tasks/warmup.jsonl", "data/tasks/rl_pool.jsonl", "runs/grpo/final/adapter_config.json",
                 "runs/rft/final/adapter_config.json", "runs/sft-gold/final/adapter_config.json",
                 "eval/grpo-think/test/metrics.json", "report/report.html", "results.md"):
        assert (out / path).exists(), path
    warm = [json.loads(line) for line in (out / "data/tasks/warmup.jsonl").read_text().splitlines()]
    assert {r["metadata"]["task"]["family"] for r in warm} <= {"count", "attribute", "compare"}
    # The RL pool is train records as `data tasks` wrote them: GRPO needs no metadata.counts.
    train = {json.loads(line)["id"]: json.loads(line) for line in (out / "data/tasks/train.jsonl").read_text().splitlines()}
    pool = [json.loads(line) for line in (out / "data/tasks/rl_pool.jsonl").read_text().splitlines()]
    assert len(pool) == 4 and all(r == train[r["id"]] and "counts" not in r["metadata"] for r in pool)
    rft_log = [json.loads(line) for line in (out / "runs/rft/metrics.jsonl").read_text().splitlines()]
    assert rft_log and all("rft/kept" in row for row in rft_log if "loss" in row)
    think = [json.loads(line) for line in (out / "eval/grpo-think/test/samples.jsonl").read_text().splitlines()]
    assert think and all(s["chosen"].startswith("<think>") for s in think)


def test_full_is_refused_for_the_reasoning_demo(tmp_path, capsys):
    assert main(["demo", "--task", "reasoning", "--full", "--out", str(tmp_path)]) == 2
    assert "--task reasoning always runs all its methods" in capsys.readouterr().err
