"""`evaluate`, `load_for_eval` and the `infer` / `eval` commands on a tiny model and synthetic pairs."""

from __future__ import annotations

import json

import pytest
import torch

from vlmtune.cli import main
from vlmtune.data.formats import read_records
from vlmtune.data.writers import write_records
from vlmtune.errors import VlmtuneError
from vlmtune.eval import metrics as M
from vlmtune.eval.run import base_sample, evaluate, load_for_eval, score_tasks
from vlmtune.tasks.counting import CountingTask


@pytest.fixture(scope="module")
def records(synth_pairs_file):
    return read_records(synth_pairs_file)[:6]


@pytest.fixture(scope="module")
def small_file(records, tmp_path_factory):
    return write_records(records, tmp_path_factory.mktemp("pairs") / "small.jsonl", "vlmtune")


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A training run folder as training leaves it: a peft adapter in final/, non-zero LoRA B."""
    from vlmtune.models.load import add_lora, load_model

    model, _ = load_model(tiny_model_dir)
    model = add_lora(model, rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    run = tmp_path_factory.mktemp("run")
    model.save_pretrained(run / "final")
    return run


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_counting_metrics_from_hand_answers(records):
    r0, r1 = records[0], records[1]
    answers = [r0.chosen, r1.rejected]
    samples = [base_sample(r, a) for r, a in zip(records[:2], answers)]
    metrics = score_tasks(records[:2], answers, samples, seed=0)
    task = CountingTask()
    wrong = task.score(task.parse(r1.rejected), r1.metadata["counts"])
    assert metrics["exact_match"]["value"] == pytest.approx(0.5)
    assert metrics["class_accuracy"]["value"] == pytest.approx((1.0 + wrong.class_accuracy) / 2)
    assert metrics["parse_failure"]["value"] == 0.0
    assert samples[0]["correct"] is True and samples[1]["correct"] is False
    assert samples[0]["gold_counts"] == r0.metadata["counts"]
    assert samples[1]["parsed_counts"] == task.parse(r1.rejected).counts


def test_evaluate_with_adapter_against_plain_references(tiny_model_dir, run_dir, records, tmp_path):
    from vlmtune.batch import encode_pairs
    from vlmtune.forward.plain import plain_pair_logps
    from vlmtune.models.load import load_model

    model, processor = load_for_eval(tiny_model_dir, adapter=run_dir)
    out = tmp_path / "ev"
    metrics = evaluate(model, processor, records, out, batch_size=4, max_new_tokens=6, beta=0.5)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    samples = _read_jsonl(out / "samples.jsonl")
    assert [s["id"] for s in samples] == [r.id for r in records]

    # The reference log-probs are those of the plain base model; the policy's those of base + adapter.
    base, _ = load_model(tiny_model_dir)
    with torch.no_grad():
        ref = plain_pair_logps(base, encode_pairs(records, processor, 1024))
        pol = plain_pair_logps(model, encode_pairs(records, processor, 1024))
    assert [s["ref_chosen_logp"] for s in samples] == pytest.approx(ref.chosen.tolist(), abs=1e-4)
    assert [s["ref_rejected_logp"] for s in samples] == pytest.approx(ref.rejected.tolist(), abs=1e-4)
    assert [s["chosen_logp"] for s in samples] == pytest.approx(pol.chosen.tolist(), abs=1e-4)
    assert not torch.allclose(pol.chosen, ref.chosen)  # the adapter changes something

    margins = [0.5 * ((s["chosen_logp"] - s["ref_chosen_logp"]) - (s["rejected_logp"] - s["ref_rejected_logp"]))
               for s in samples]
    assert metrics["rewards/margins"]["value"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    assert metrics["rewards/accuracies"]["value"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    logp_acc = [s["chosen_logp"] > s["rejected_logp"] for s in samples]
    assert metrics["logps/accuracy"]["value"] == pytest.approx(sum(logp_acc) / len(logp_acc))
    # Text metrics are those of the written answers against the chosen answers.
    answers, chosen = [s["answer"] for s in samples], [r.chosen for r in records]
    assert metrics["text/bleu"]["value"] == pytest.approx(M.corpus_bleu(answers, chosen))
    assert metrics["text/rouge_l"]["value"] == pytest.approx(
        sum(M.rouge_l(a, c) for a, c in zip(answers, chosen)) / len(answers))
    # Every metric carries its CI and n.
    for name, entry in metrics.items():
        assert entry["ci_low"] <= entry["value"] + 1e-9 and entry["value"] <= entry["ci_high"] + 1e-9, name
        assert entry["n"] == len(records)

    # An explicit reference model gives the same rewards as the adapter switched off.
    explicit = evaluate(model, processor, records[:3], tmp_path / "ev2", reference=base, batch_size=3,
                        max_new_tokens=1, beta=0.5)
    assert explicit["rewards/margins"]["value"] == pytest.approx(sum(margins[:3]) / 3, abs=1e-5)


def test_plain_model_has_no_reward_metrics(tiny_model_dir, records, tmp_path):
    model, processor = load_for_eval(tiny_model_dir)
    metrics = evaluate(model, processor, records[:3], tmp_path, batch_size=3, max_new_tokens=2)
    assert "logps/accuracy" in metrics and "exact_match" in metrics
    assert not any(k.startswith("rewards/") for k in metrics)
    assert all(s["ref_chosen_logp"] is None for s in _read_jsonl(tmp_path / "samples.jsonl"))


def test_load_for_eval_finds_adapters_and_their_base(run_dir, tmp_path):
    from peft import PeftModel

    model, _ = load_for_eval(None, adapter=run_dir)  # the base named in adapter_config.json
    assert isinstance(model, PeftModel)
    model, _ = load_for_eval(None, adapter=run_dir / "final")
    assert isinstance(model, PeftModel)
    with pytest.raises(VlmtuneError, match="no peft adapter"):
        load_for_eval(None, adapter=tmp_path)


def test_infer_cli_single_image_and_data_file(tiny_model_dir, run_dir, records, small_file, tmp_path, capsys):
    assert main(["infer", "--model", str(tiny_model_dir), "--image", records[0].images[0],
                 "--prompt", "Count the vehicles.", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    out = tmp_path / "answers.jsonl"
    assert main(["infer", "--adapter", str(run_dir), "--data", str(small_file), "--out", str(out),
                 "--max-new-tokens", "5", "--batch-size", "4"]) == 0
    rows = _read_jsonl(out)
    assert [set(r) for r in rows] == [{"id", "images", "prompt", "answer", "metadata"}] * len(records)
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert rows[0]["prompt"] == records[0].prompt and rows[0]["metadata"] == records[0].metadata
    # The CLI's answers are generate()'s greedy answers with the same adapter.
    from vlmtune.generate import generate

    model, processor = load_for_eval(tiny_model_dir, adapter=run_dir)
    expected = generate(model, processor, [(r.images, r.prompt) for r in records], 5, 2)
    assert [r["answer"] for r in rows] == expected

    sampled = tmp_path / "sampled.jsonl"
    assert main(["infer", "--model", str(tiny_model_dir), "--data", str(small_file), "--out", str(sampled),
                 "--max-new-tokens", "3", "--temperature", "1.0", "--num-samples", "2"]) == 0
    rows = _read_jsonl(sampled)
    assert len(rows) == 2 * len(records)
    assert [r["metadata"]["sample"] for r in rows[:4]] == [0, 1, 0, 1]


def test_eval_cli_and_bad_input(tiny_model_dir, run_dir, records, small_file, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--adapter", str(run_dir), "--data", str(small_file), "--out", str(out),
                 "--max-new-tokens", "4", "--batch-size", "6"]) == 0
    printed = capsys.readouterr().out
    assert "rewards/accuracies" in printed and "exact_match" in printed
    assert (out / "metrics.json").is_file() and len(_read_jsonl(out / "samples.jsonl")) == len(records)

    bad = tmp_path / "bad.jsonl"
    lines = small_file.read_text().splitlines()
    bad.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(bad), "--out", str(tmp_path / "b"),
                 "--skip-bad", "--max-new-tokens", "2"]) == 0
    assert "skipped" in capsys.readouterr().err
    assert len(_read_jsonl(tmp_path / "b" / "samples.jsonl")) == 2
    assert main(["infer", "--data", str(small_file)]) == 2
    assert "--model" in capsys.readouterr().err


def test_merged_export_answers_like_base_plus_adapter(tiny_model_dir, run_dir, records, tmp_path):
    from vlmtune.batch import encode_pairs
    from vlmtune.forward.plain import plain_pair_logps
    from vlmtune.generate import generate

    adapted, processor = load_for_eval(tiny_model_dir, adapter=run_dir)
    merged_dir = tmp_path / "merged"
    load_for_eval(tiny_model_dir, adapter=run_dir)[0].merge_and_unload().save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
    merged, merged_processor = load_for_eval(merged_dir)
    items = [(r.images, r.prompt) for r in records[:3]]
    assert generate(merged, merged_processor, items, 5, 3) == generate(adapted, processor, items, 5, 3)
    with torch.no_grad():
        a = plain_pair_logps(adapted, encode_pairs(records[:3], processor, 1024))
        b = plain_pair_logps(merged, encode_pairs(records[:3], merged_processor, 1024))
    torch.testing.assert_close(a.chosen, b.chosen, atol=1e-3, rtol=1e-4)


def test_counting_numbers_are_todays_on_every_record(synth_pairs_file):
    """Regression: every counting key equals the plain CountingTask computation of before tasks."""
    every = read_records(synth_pairs_file)
    answers = [(r.chosen, r.rejected, "I see 2 cars.", "A lovely day.")[i % 4] for i, r in enumerate(every)]
    samples = [base_sample(r, a) for r, a in zip(every, answers)]
    metrics = score_tasks(every, answers, samples, seed=0)
    task = CountingTask()
    scores = [task.score(task.parse(a), r.metadata["counts"]) for r, a in zip(every, answers)]
    assert metrics["exact_match"]["value"] == pytest.approx(sum(s.exact for s in scores) / len(every))
    assert metrics["class_accuracy"]["value"] == pytest.approx(sum(s.class_accuracy for s in scores) / len(every))
    assert metrics["parse_failure"]["value"] == pytest.approx(sum(s.parse_failure for s in scores) / len(every))
    for cls in task.classes:
        assert metrics[f"accuracy/{cls}"]["value"] == pytest.approx(sum(s.hits[cls] for s in scores) / len(every))
        errors = [s.abs_errors[cls] for s in scores if s.abs_errors[cls] is not None]
        assert metrics[f"abs_error/{cls}"]["value"] == pytest.approx(sum(errors) / len(errors))
    totals = [s.total_error for s in scores if s.total_error is not None]
    assert metrics["total_abs_error"]["value"] == pytest.approx(sum(totals) / len(totals))
    assert [s["correct"] for s in samples] == [s.exact for s in scores]
    # The strict task accuracy reads only a well-formed answer: the chosen sentences pay, the rest not.
    assert metrics["family/count/accuracy"]["value"] == pytest.approx(sum(i % 4 == 0 for i in range(len(every))) / len(every))
