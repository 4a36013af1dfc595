"""The model card: written by every run's final save and by export, loads with huggingface_hub offline,
and says what the run folder says (base model, method, data fingerprints, steps, metrics with CIs)."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from vlmtune import NAME, __version__
from vlmtune.cli import main
from vlmtune.config import validate_config
from vlmtune.errors import VlmtuneError
from vlmtune.model_card import model_card_text, read_eval_results, read_metrics_rows, write_model_card
from vlmtune.train.loop import Trainer


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, synth_pairs_file, tmp_path_factory):
    """A 2-step DPOP run with a held-out file, plus an eval output inside the run folder."""
    out = tmp_path_factory.mktemp("card") / "run"
    raw = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"train": str(synth_pairs_file), "eval": str(synth_pairs_file), "max_length": 128},
        "loss": {"name": "dpop", "beta": 0.25, "dpop_lambda": 7.0},
        "train": {"output_dir": str(out), "lr": 1e-3, "max_steps": 2, "batch_size": 2, "progress": False},
    }
    Trainer(validate_config(raw)).train()
    eval_dir = out / "eval" / "test"
    eval_dir.mkdir(parents=True)
    (eval_dir / "metrics.json").write_text(json.dumps(
        {"count/exact_match": {"value": 0.625, "ci_low": 0.5, "ci_high": 0.75, "n": 40}}))
    return out


def _front_matter(path):
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_every_run_writes_a_card_that_huggingface_hub_loads(trained_run, tiny_model_dir, synth_pairs_file):
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained_run / "final" / "README.md")
    assert card.data.base_model == str(tiny_model_dir)
    assert card.data.library_name == "peft"
    assert card.data.license is None  # left for the user
    assert NAME in card.data.tags and "dpo" in card.data.tags and "lora" in card.data.tags
    digest = hashlib.sha256(synth_pairs_file.read_bytes()).hexdigest()
    assert f"| `{synth_pairs_file}` | `{digest}` |" in card.text
    assert "| optimizer steps | 2 |" in card.text
    assert "| loss.beta | 0.25 |" in card.text and "| loss.dpop_lambda | 7 |" in card.text
    assert "preference optimisation, loss `dpop`" in card.text
    # only the keys DPOP reads: not KTO's weights, SimPO's margin, MPO's weights, a reference-free switch
    for other in ("kto_desirable_weight", "simpo_gamma", "mpo_weights", "reference_free", "bco_reward_shift"):
        assert f"loss.{other}" not in card.text


def test_the_card_shows_the_last_rows_of_metrics_jsonl_and_eval_cis(trained_run):
    text = (trained_run / "final" / "README.md").read_text()
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in rows if "loss" in r][-1]
    last_eval = [r for r in rows if "eval/loss" in r][-1]
    assert f"| loss | {last_train['loss']:.4g} |" in text
    assert f"| eval/loss | {last_eval['eval/loss']:.4g} |" in text
    # The eval output was written after training: the final save's card predates it; export reads it.
    assert "count/exact_match" not in text


def test_export_merge_writes_a_transformers_card_with_eval_cis(trained_run, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "merged"
    assert main(["export", "--merge", str(trained_run), str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "lora" not in card.data.tags
    assert "holds the LoRA adapter merged into the base weights" in card.text
    assert "| count/exact_match | 0.625 | [0.5, 0.75] | 40 |" in card.text
    assert "`eval/test`" in card.text
    assert f"{NAME} train --config config.yaml" in card.text
    quoted = card.text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(quoted) == yaml.safe_load((trained_run / "config.yaml").read_text())


def test_export_without_merge_writes_an_adapter_card(trained_run, tmp_path):
    out = tmp_path / "adapter"
    assert main(["export", str(trained_run), str(out)]) == 0
    front, text = _front_matter(out / "README.md")
    assert front["library_name"] == "peft" and "count/exact_match" in text
    assert "holds a LoRA adapter: load it on the base model with peft" in text


def _config(algo="dpo", lora=True):
    return {"model": {"name_or_path": "Qwen/Qwen2-VL-2B-Instruct"}, "lora": {"enabled": lora, "rank": 8, "alpha": 16},
            "data": {"train": "a.jsonl"}, "loss": {"name": "ipo", "beta": 0.5},
            "grpo": {"group_size": 4, "beta": 0.0}, "train": {"algo": algo, "output_dir": "runs/x", "lr": 1e-5}}


def test_grpo_and_full_weight_cards_show_their_own_parameters():
    text = model_card_text(_config("grpo", lora=False), "x: 1\n", {"a.jsonl": None}, [], {}, adapter=False)
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {"base_model": "Qwen/Qwen2-VL-2B-Instruct", "library_name": "transformers",
                     "pipeline_tag": "image-text-to-text", "tags": [NAME, "grpo"], "license": None}
    assert "| grpo.group_size | 4 |" in text and "loss.beta" not in text
    assert "| weights | full fine-tuning |" in text and "holds the fully fine-tuned weights" in text
    assert "| `a.jsonl` | not found when this card was written |" in text
    assert "The run recorded no metrics." in text and "not recorded (no metrics.jsonl)" in text
    assert f"{NAME} {__version__}" in text


def test_sft_card_names_its_loss_and_a_pipe_in_a_value_does_not_break_the_table():
    config = _config("sft")
    config["model"]["name_or_path"] = "a|b"
    text = model_card_text(config, "", {}, [{"step": 3, "loss": 1.5}], {}, adapter=True)
    assert "negative log-likelihood of the chosen answers" in text
    assert "| base model | `a\\|b` |" in text and "| optimizer steps | 3 |" in text


def test_damaged_run_files_are_named_in_the_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(VlmtuneError, match=r"metrics.jsonl, line 2: not JSON"):
        read_metrics_rows(tmp_path / "metrics.jsonl")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text("{")
    with pytest.raises(VlmtuneError, match=r"eval/metrics.json: not JSON.*eval --out"):
        read_eval_results(tmp_path)
    with pytest.raises(VlmtuneError, match="no config.yaml"):
        write_model_card(tmp_path, tmp_path)
