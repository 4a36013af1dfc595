"""`vlmtune infer --num-samples K`: K answers per record drawn by GRPO's sampler (one prefill per record)."""

from __future__ import annotations

import json

from test_train import small_eval_file
from vlmtune.cli import main
from vlmtune.data.formats import read_records
from vlmtune.models.load import load_model
from vlmtune.sampling.sampler import sample_groups


def test_infer_num_samples_writes_the_samplers_answers(tiny_model_dir, synth_pairs_file, tmp_path, capsys):
    data = small_eval_file(synth_pairs_file, tmp_path / "three.jsonl", n=3)
    out = tmp_path / "samples.jsonl"
    assert main(["infer", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "4", "--temperature", "1.3", "--num-samples", "3", "--batch-size", "2",
                 "--seed", "5"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    records = read_records(data)
    assert [(r["id"], r["metadata"]["sample"]) for r in rows] == [(rec.id, k) for rec in records for k in range(3)]

    model, processor = load_model(tiny_model_dir)
    items = [(r.images, r.prompt) for r in records]
    expected = []
    for start, seed in ((0, 5), (2, 7)):  # batches of 2 items, seeded --seed + the batch's first item
        samples = sample_groups(model, processor, items[start : start + 2], 3, 4, 1.3, seed=seed)
        expected += [processor.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in samples.answers()]
    assert [r["answer"] for r in rows] == expected
    assert len(set(expected)) > 1  # sampled, not one answer repeated

    capsys.readouterr()
    assert main(["infer", "--model", str(tiny_model_dir), "--data", str(data), "--num-samples", "2"]) == 2
    assert "error: --num-samples 2 needs sampling: give --temperature > 0 (e.g. 1.0)" in capsys.readouterr().err
    assert main(["infer", "--model", str(tiny_model_dir), "--data", str(data), "--num-samples", "0"]) == 2
    assert "error: --num-samples and --batch-size must be at least 1 (got 0, 16)" in capsys.readouterr().err


def test_infer_one_sampled_answer_uses_the_sampler_too(tiny_model_dir, synth_pairs_file, tmp_path):
    data = small_eval_file(synth_pairs_file, tmp_path / "two.jsonl", n=2)
    out = tmp_path / "one.jsonl"
    assert main(["infer", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "4", "--temperature", "0.9", "--top-p", "0.8"]) == 0
    model, processor = load_model(tiny_model_dir)
    records = read_records(data)
    samples = sample_groups(model, processor, [(r.images, r.prompt) for r in records], 1, 4, 0.9, top_p=0.8, seed=0)
    expected = [processor.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in samples.answers()]
    assert [json.loads(line)["answer"] for line in out.read_text().splitlines()] == expected
