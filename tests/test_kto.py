"""KTO end to end: unpaired records (read, written, checked, converted from pairs), the KTO step
against a plain computation on a tiny model, and runs through the CLI with exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from test_train import train_and_check_only_trainables_change

from vlmtune.batch import encode_sft
from vlmtune.cli import main
from vlmtune.config import LossConfig, validate_config
from vlmtune.data.check import check_records
from vlmtune.data.formats import detect_format, read_records
from vlmtune.data.load import load_records
from vlmtune.data.records import PreferenceRecord, unpair, unpaired, user_prompt
from vlmtune.data.writers import write_records
from vlmtune.errors import VlmtuneError
from vlmtune.models.load import add_lora, load_model
from vlmtune.train.kto_step import KtoStep
from vlmtune.train.loop import Trainer
from vlmtune.train.steps import needs_reference

KTO_NAMES = {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
             "logps/rejected", "lr", "grad_norm", "step", "epoch", "pairs_per_s"}


def image(path: Path) -> str:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return str(path)


def unpaired_rows(folder: Path, n: int = 4) -> list[dict]:
    """Canonical unpaired rows: even ids desirable, odd ones undesirable."""
    picture = image(folder / "red.png")
    return [{"id": f"u{i}", "images": [picture], "prompt": user_prompt(f"How many red squares? ({i})"),
             "completion": f"There are {i % 3} red squares.", "label": i % 2 == 0, "metadata": {"n": i}}
            for i in range(n)]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- records and formats


def test_unpaired_record_keeps_pairs_unchanged_and_puts_its_answer_on_its_side():
    pair = PreferenceRecord("p", [], user_prompt("2+2?", 0), "4", "5")
    assert set(pair.to_dict()) == {"id", "images", "prompt", "chosen", "rejected", "metadata"}
    assert not pair.is_unpaired and PreferenceRecord.from_dict(pair.to_dict()) == pair
    good, bad = unpaired("g", [], pair.prompt, "4", True), unpaired("b", [], pair.prompt, "5", False)
    assert (good.chosen, good.rejected, good.answer) == ("4", "", "4")
    assert (bad.chosen, bad.rejected, bad.answer) == ("", "5", "5")
    assert bad.to_dict() == {"id": "b", "images": [], "prompt": pair.prompt, "completion": "5", "label": False,
                             "metadata": {}}
    assert PreferenceRecord.from_dict(bad.to_dict()) == bad
    # the same answer as desirable and as undesirable is not the same content
    as_good, as_bad = unpaired("x", [], pair.prompt, "4", True), unpaired("x", [], pair.prompt, "4", False)
    assert as_good.content_key() != as_bad.content_key()


def test_unpair_splits_a_pair_like_trl_and_copies_the_metadata():
    pair = PreferenceRecord("p", ["a.png"], user_prompt("Count."), "2", "3", {"counts": {"car": 2}})
    desirable, undesirable = unpair(pair)
    assert (desirable.id, desirable.answer, desirable.label) == ("p-desirable", "2", True)
    assert (undesirable.id, undesirable.answer, undesirable.label) == ("p-undesirable", "3", False)
    desirable.metadata["counts"]["car"] = 9
    assert undesirable.metadata == pair.metadata == {"counts": {"car": 2}}
    assert unpair(desirable) == [desirable]


def test_canonical_and_trl_unpaired_rows_are_read(tmp_path):
    rows = unpaired_rows(tmp_path, 2)
    canonical = jsonl(tmp_path / "c.jsonl", rows)
    trl_rows = [{"images": ["red.png"], "prompt": r["prompt"], "label": r["label"],
                 "completion": [{"role": "assistant", "content": [{"type": "text", "text": r["completion"]}]}]}
                for r in rows]
    trl = jsonl(tmp_path / "t.jsonl", trl_rows)
    assert detect_format(canonical) == "vlmtune" and detect_format(trl) == "trl"
    for path in (canonical, trl):
        records = read_records(path)
        assert [(r.answer, r.label) for r in records] == [(r["completion"], r["label"]) for r in rows]
        assert records[0].chosen == rows[0]["completion"] and records[1].rejected == rows[1]["completion"]
        assert records[0].images == [str(tmp_path / "red.png")]


def test_trl_standard_unpaired_row_with_text_prompt_and_completion(tmp_path):
    image(tmp_path / "red.png")
    path = jsonl(tmp_path / "t.jsonl", [{"images": ["red.png"], "prompt": "How many? <image>", "completion": "2",
                                         "label": False}])
    assert detect_format(path) == "trl"
    (record,) = read_records(path)
    assert record.prompt == [{"role": "user", "content": [{"type": "text", "text": "How many?"}, {"type": "image"}]}]
    assert (record.chosen, record.rejected, record.label, record.id) == ("", "2", False, "t-0")


@pytest.mark.parametrize("label", ["yes", 1, None])
def test_a_label_that_is_not_a_boolean_is_a_bad_value(tmp_path, label):
    row = {**unpaired_rows(tmp_path, 1)[0], "label": label}
    report = check_records(jsonl(tmp_path / "d.jsonl", [row]), kto=True)
    assert report.counts() == {"bad-value": 1}
    assert "'label' must be true (a desirable answer) or false (an undesirable one)" in report.problems[0].message


def test_unpaired_round_trip_through_vlmtune_and_trl(tmp_path):
    records = read_records(jsonl(tmp_path / "in.jsonl", unpaired_rows(tmp_path)))
    for fmt, name in (("vlmtune", "a.jsonl"), ("trl", "b.json"), ("trl", "c.jsonl")):
        assert read_records(write_records(records, tmp_path / name, fmt)) == records


@pytest.mark.parametrize("fmt, name", [("seed", "o.jsonl"), ("llamafactory", "o.json"), ("swift", "o.jsonl"),
                                       ("hf", "o.parquet")])
def test_formats_without_a_label_refuse_unpaired_records(tmp_path, fmt, name):
    records = read_records(jsonl(tmp_path / "in.jsonl", unpaired_rows(tmp_path, 1)))
    with pytest.raises(VlmtuneError, match=f"record u0 has one answer \\(unpaired\\), which format {fmt} cannot "
                                         "hold \\(it holds pairs\\); write unpaired records as vlmtune or trl"):
        write_records(records, tmp_path / name, fmt)


def test_cli_convert_unpair_then_round_trip(synth_pairs_file, tmp_path, capsys):
    pairs = read_records(synth_pairs_file)
    out = tmp_path / "unpaired.jsonl"
    assert main(["data", "convert", str(synth_pairs_file), str(out), "--to", "vlmtune", "--unpair"]) == 0
    assert f"wrote {2 * len(pairs)} records" in capsys.readouterr().out
    records = read_records(out)
    assert records == [one for pair in pairs for one in unpair(pair)]
    assert [r.label for r in records[:4]] == [True, False, True, False]
    assert records[0].answer == pairs[0].chosen and records[1].answer == pairs[0].rejected
    assert main(["data", "convert", str(out), str(tmp_path / "trl.jsonl"), "--to", "trl"]) == 0
    assert main(["data", "convert", str(tmp_path / "trl.jsonl"), str(tmp_path / "back.jsonl"), "--to", "vlmtune"]) == 0
    assert read_records(tmp_path / "back.jsonl") == records
    assert main(["data", "convert", str(out), str(tmp_path / "seed.jsonl"), "--to", "seed"]) == 2
    assert "has one answer (unpaired), which format seed cannot hold" in capsys.readouterr().err


# ---------------------------------------------------------------- data check


def test_check_refuses_unpaired_records_unless_for_kto(tmp_path, capsys):
    path = jsonl(tmp_path / "d.jsonl", unpaired_rows(tmp_path, 2))
    report = check_records(path)
    assert report.counts() == {"unpaired": 2} and report.bad_records == 2
    assert [p.location for p in report.problems] == [f"{path}:1", f"{path}:2"]
    assert report.problems[1].message == ("record u1 has one answer (unpaired); unpaired records train only with "
                                          "--algo kto (check them with `vlmtune data check --for kto`)")
    assert check_records(path, kto=True).ok
    assert main(["data", "check", str(path)]) == 1
    assert "record u0 has one answer (unpaired); unpaired records train only with --algo kto" in capsys.readouterr().out
    assert main(["data", "check", "--for", "kto", str(path)]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_check_for_kto_still_finds_an_empty_or_duplicate_completion(tmp_path):
    rows = unpaired_rows(tmp_path, 3)
    rows[1]["completion"] = "  "
    rows[2] = {**rows[0], "id": "again"}
    report = check_records(jsonl(tmp_path / "d.jsonl", rows), kto=True)
    assert report.counts() == {"empty-answer": 1, "duplicate-content": 1}
    assert "'completion' is empty" in report.problems[0].message
    assert "same images, prompt, completion and label as" in report.problems[1].message


def test_load_records_for_kto_splits_pairs_and_for_dpo_refuses_unpaired(synth_pairs_file, tmp_path):
    pairs = load_records(synth_pairs_file)
    assert load_records(synth_pairs_file, kto=True) == [one for pair in pairs for one in unpair(pair)]
    path = jsonl(tmp_path / "d.jsonl", unpaired_rows(tmp_path, 2))
    with pytest.raises(VlmtuneError, match=r"record u0 has one answer \(unpaired\); unpaired records train only "
                                         r"with --algo kto"):
        load_records(path)
    assert len(load_records(path, kto=True)) == 2


# ---------------------------------------------------------------- config


def test_config_for_kto(tmp_path):
    base = {"model": {"name_or_path": "m"}, "data": {"train": "d.jsonl"},
            "train": {"algo": "kto", "batch_size": 4}}
    config = validate_config({**base, "loss": {"kto_desirable_weight": 1.33, "beta": 0.2}})
    assert (config.loss.kto_desirable_weight, config.loss.kto_undesirable_weight) == (1.33, 1.0)
    assert "λ_D" in LossConfig.model_fields["kto_desirable_weight"].description
    refusals = [
        ({"train": {"algo": "kto", "batch_size": 1}}, "needs train.batch_size of 2 or more"),
        ({"loss": {"reference_free": True}}, "--algo kto measures every answer against the reference"),
        ({"loss": {"sft_weight": 0.5}}, "has no SFT term"),
        ({"loss": {"kto_undesirable_weight": 0}}, r"loss\.kto_undesirable_weight"),
        ({"loss": {"name": "kto"}}, r"loss\.name: .*use `train --algo kto`"),
    ]
    assert needs_reference(config)  # the reference point and the rewards compare with it
    for change, message in refusals:
        with pytest.raises(VlmtuneError, match=message):
            validate_config({**base, **change})


# ---------------------------------------------------------------- the step on a tiny model


def lora_model(model_dir):
    torch.manual_seed(0)
    model, processor = load_model(model_dir)
    model = add_lora(model, rank=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # zero at init; random so policy and reference differ
            p.data.normal_(0, 0.05)
    return model, processor


def one_logp(model, processor, record, answer: str) -> float:
    """log π(answer | record's prompt and images), one sequence on its own."""
    from vlmtune.forward.plain import sequence_logps

    row = PreferenceRecord(record.id, record.images, record.prompt, answer, "x")
    with torch.no_grad():
        return sequence_logps(model, encode_sft([row], processor, 128))[0].item()


def test_step_loss_is_kto_computed_by_hand_from_the_model_log_probs(tiny_model_dir, synth_pairs_file):
    model, processor = lora_model(tiny_model_dir)
    model.eval()
    records = load_records(synth_pairs_file, kto=True)[:3] + load_records(synth_pairs_file, kto=True)[5:6]
    assert [r.label for r in records] == [True, False, True, False]
    beta, w_d, w_u = 0.5, 1.3, 0.7
    step = KtoStep(model, processor, 128, LossConfig(beta=beta, kto_desirable_weight=w_d, kto_undesirable_weight=w_u))
    loss, metrics = step.loss_and_metrics(step.encode(records))

    policy = [one_logp(model, processor, r, r.answer) for r in records]
    with model.disable_adapter():
        ref = [one_logp(model, processor, r, r.answer) for r in records]
        ref_kl = [one_logp(model, processor, r, records[i - 1].answer) for i, r in enumerate(records)]
    policy_kl = [one_logp(model, processor, r, records[i - 1].answer) for i, r in enumerate(records)]
    z0 = max(0.0, sum(p - q for p, q in zip(policy_kl, ref_kl)) / 4)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    rewards = [beta * (p - q) for p, q in zip(policy, ref)]
    losses = [w_d * (1 - sigmoid(r - beta * z0)) if rec.label else w_u * (1 - sigmoid(beta * z0 - r))
              for r, rec in zip(rewards, records)]
    assert rewards[0] != 0 and z0 > 0  # the adapter matters and the reference point is not clamped away
    assert loss.item() == pytest.approx(sum(losses) / 4, rel=1e-4, abs=1e-6)
    assert metrics["kl"] == pytest.approx(z0, rel=1e-4, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx((rewards[0] + rewards[2]) / 2, rel=1e-4, abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx((rewards[1] + rewards[3]) / 2, rel=1e-4, abs=1e-6)
    assert metrics["logps/chosen"] == pytest.approx((policy[0] + policy[2]) / 2, rel=1e-4)
    assert metrics["logps/rejected"] == pytest.approx((policy[1] + policy[3]) / 2, rel=1e-4)
    assert metrics["rewards/margins"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"])
    # gradients reach the adapter through the matched answers only
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora" in n)


def test_a_side_without_answers_has_no_mean(tiny_model_dir, synth_pairs_file):
    model, processor = lora_model(tiny_model_dir)
    records = [r for r in load_records(synth_pairs_file, kto=True) if r.label][:2]
    step = KtoStep(model, processor, 128, LossConfig())
    loss, metrics = step.loss_and_metrics(step.encode(records))
    assert math.isfinite(loss.item()) and math.isfinite(metrics["rewards/chosen"])
    assert all(math.isnan(metrics[n]) for n in ("rewards/rejected", "logps/rejected", "rewards/margins"))


# ---------------------------------------------------------------- runs


def kto_config(model_dir, data, out, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "max_length": 128},
        "loss": {"beta": 0.5},
        "train": {"algo": "kto", "output_dir": str(out), "lr": 1e-2, "max_steps": 3, "batch_size": 4,
                  "grad_accum": 1, "warmup_ratio": 0.0, "schedule": "constant", "progress": False, **train},
    }


def train_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_cli_kto_run_on_unpaired_data_changes_the_adapter(tiny_model_dir, synth_pairs_file, tmp_path):
    data = tmp_path / "unpaired.jsonl"
    assert main(["data", "convert", str(synth_pairs_file), str(data), "--to", "vlmtune", "--unpair"]) == 0
    run = tmp_path / "run"
    path = tmp_path / "c.yaml"
    raw = kto_config(tiny_model_dir, data, run, save_every=1)
    raw["train"]["algo"] = "dpo"  # --algo on the command line decides
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(path)]) == 2  # dpo refuses the unpaired records
    assert main(["train", "--algo", "kto", "--config", str(path)]) == 0
    rows = train_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert set(rows[0]) == KTO_NAMES and all(r["kl"] >= 0 for r in rows)
    from safetensors.torch import load_file

    final = load_file(run / "final" / "adapter_model.safetensors")
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in final.items())  # B starts at zero


def test_resume_after_two_steps_gives_the_identical_curve(tiny_model_dir, synth_pairs_file, tmp_path):
    """Four steps in one go, and two steps then a resumed run to four, log the same numbers."""
    whole = tmp_path / "whole"
    Trainer(validate_config(kto_config(tiny_model_dir, synth_pairs_file, whole, max_steps=4, batch_size=2,
                                       grad_accum=2))).train()
    split = tmp_path / "split"
    # a constant schedule, so that stopping at max_steps=2 first does not change the learning rates
    raw = kto_config(tiny_model_dir, synth_pairs_file, split, max_steps=4, batch_size=2, grad_accum=2, save_every=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(path), "train.max_steps=2"]) == 0
    (split / "final").rename(tmp_path / "final-at-2")
    assert main(["train", "--config", str(path), "--resume"]) == 0
    a, b = train_rows(whole), train_rows(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for name in ra.keys() - {"pairs_per_s"}:
            if ra[name] is None or rb[name] is None:  # a side with no answer in a micro-batch: no mean (JSON null)
                assert ra[name] is rb[name] is None, (ra["step"], name)
                continue
            assert ra[name] == pytest.approx(rb[name], rel=1e-6, abs=1e-6), (ra["step"], name)


@pytest.mark.parametrize("lora", [{}, {"enabled": False}], ids=["lora", "full-fine-tuning"])
def test_every_trainable_parameter_changes_and_no_frozen_one(lora, tiny_model_dir, synth_pairs_file, tmp_path):
    raw = kto_config(tiny_model_dir, synth_pairs_file, tmp_path / "run", max_steps=2)
    raw["lora"].update(lora)
    train_and_check_only_trainables_change(raw)
