"""Export: the adapter merged into the base gives the same logits as base + adapter, with plain transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vlmtune.batch import encode_pairs
from vlmtune.cli import main
from vlmtune.config import validate_config
from vlmtune.data.load import load_records
from vlmtune.errors import VlmtuneError
from vlmtune.train.export import export_run
from vlmtune.train.loop import Trainer


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, synth_pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    raw = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "lora": {"rank": 4, "alpha": 8, "vision": "lora", "merger": True},
        "data": {"train": str(synth_pairs_file), "max_length": 128},
        "train": {"output_dir": str(out), "lr": 5e-2, "max_steps": 2, "batch_size": 2, "progress": False},
    }
    Trainer(validate_config(raw)).train()
    return out


def test_merged_model_gives_the_logits_of_base_plus_adapter(trained_run, tiny_model_dir, synth_pairs_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    merged_dir = tmp_path / "merged"
    assert main(["export", "--merge", str(trained_run), str(merged_dir)]) == 0
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()

    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    processor = AutoProcessor.from_pretrained(merged_dir)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, trained_run / "final").eval()
    inputs = encode_pairs(load_records(synth_pairs_file)[:2], processor, 128).chosen
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        expected = with_adapter(**inputs).logits
        got = merged(**inputs).logits
        plain_base = with_adapter.get_base_model()
        with with_adapter.disable_adapter():
            untouched = plain_base(**inputs).logits
    assert (expected - untouched).abs().max() > 1e-3, "the adapter must change the model for this test to mean anything"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_export_without_merge_copies_the_adapter_and_refuses_bad_targets(trained_run, tmp_path):
    out = export_run(trained_run, tmp_path / "adapter", merge=False)
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    with pytest.raises(VlmtuneError, match="not empty"):
        export_run(trained_run, out)
    with pytest.raises(VlmtuneError, match="no final/ folder"):
        export_run(tmp_path, tmp_path / "x")


def test_a_run_records_the_base_model_its_adapter_was_trained_on(trained_run, tiny_model_dir):
    record = json.loads((trained_run / "final" / "base_model.json").read_text())
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert record["name_or_path"] == str(tiny_model_dir)
    assert record["model_type"] == config["model_type"] == "qwen2_vl"
    assert record["architecture"] == config["architectures"][0]
    assert record["hidden_size"] == config["text_config"]["hidden_size"]
    assert record["num_hidden_layers"] == config["text_config"]["num_hidden_layers"]
    assert record["vision_depth"] == config["vision_config"]["depth"]


def test_export_refuses_a_run_folder_that_names_no_base(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "final", run / "final")
    for text, message in (("model: {dtype: float32}\n", "names no base model"),
                          ("model: [unclosed\n", "not a readable YAML file")):
        (run / "config.yaml").write_text(text)
        with pytest.raises(VlmtuneError, match=message):
            export_run(run, tmp_path / "merged")
