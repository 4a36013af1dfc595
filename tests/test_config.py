"""The training config: every shipped config validates; mistakes give clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlmtune.cli import main
from vlmtune.config import Config, apply_override, load_config
from vlmtune.errors import VlmtuneError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINING_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


def write(tmp_path, raw: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


MINIMAL = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_shows_its_command(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert "vlmtune train" in path.read_text().split("\n\n")[0], "the header comment shows the command"


def test_shipped_configs_exist():
    assert {p.name for p in TRAINING_CONFIGS} >= {"demo-cpu.yaml", "qwen2-vl-2b-dpo-lora.yaml"}


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "zero2.yaml", "zero3.yaml"])
def test_accelerate_configs_load_in_accelerate_and_show_the_launch_command(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / "accelerate" / name
    loaded = load_config_from_file(str(path))
    assert loaded.num_processes >= 2
    expected = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "zero2.yaml": "DEEPSPEED", "zero3.yaml": "DEEPSPEED"}
    assert loaded.distributed_type.value == expected[name]
    assert "accelerate launch --config_file configs/accelerate/" + name in path.read_text()


def test_overrides_are_typed_by_yaml(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["train.lr=1e-4", "loss.name=dpop", "lora.enabled=false",
                                                    "lora.target_modules=[q_proj, v_proj]"], algo="sft")
    assert config.train.lr == 1e-4 and config.loss.name == "dpop" and config.lora.enabled is False
    assert config.lora.target_modules == ["q_proj", "v_proj"] and config.train.algo == "sft"


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(VlmtuneError, match=r"train\.lrr: unknown key; did you mean train\.lr\?"):
        load_config(write(tmp_path, MINIMAL), ["train.lrr=1"])
    with pytest.raises(VlmtuneError, match=r"loss\.bta: unknown key; did you mean loss\.beta\?"):
        load_config(write(tmp_path, MINIMAL), ["loss.bta=0.2"])
    with pytest.raises(VlmtuneError, match=r"trian: unknown key; did you mean train\?"):
        load_config(write(tmp_path, {**MINIMAL, "trian": {"lr": 1}}))


def test_wrong_type_and_missing_key_and_bad_choice(tmp_path):
    with pytest.raises(VlmtuneError, match=r"train\.lr: .*valid number.*'fast'"):
        load_config(write(tmp_path, MINIMAL), ["train.lr=fast"])
    with pytest.raises(VlmtuneError, match=r"data: required but missing"):
        load_config(write(tmp_path, {"model": {"name_or_path": "m"}}))
    with pytest.raises(VlmtuneError, match=r"loss\.name"):
        load_config(write(tmp_path, MINIMAL), ["loss.name=kto"])
    with pytest.raises(VlmtuneError, match=r"train\.batch_size"):
        load_config(write(tmp_path, MINIMAL), ["train.batch_size=0"])


def test_inconsistent_settings_are_refused(tmp_path):
    with pytest.raises(VlmtuneError, match="early_stopping_patience needs held-out data"):
        load_config(write(tmp_path, MINIMAL), ["train.early_stopping_patience=2"])
    with pytest.raises(VlmtuneError, match="reference_free cannot be used with dpop"):
        load_config(write(tmp_path, MINIMAL), ["loss.name=dpop", "loss.reference_free=true"])


def test_missing_file_bad_yaml_and_bad_override(tmp_path):
    with pytest.raises(VlmtuneError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(VlmtuneError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(VlmtuneError, match="section.key=value"):
        apply_override({}, "train.lr")
    with pytest.raises(VlmtuneError, match="is a value, not a section"):
        apply_override({"train": 3}, "train.lr=1")


def test_config_validate_command(tmp_path, capsys):
    path = write(tmp_path, MINIMAL)
    assert main(["config", "validate", str(path), "train.lr=2e-5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 2.0e-05" in out and "valid" in out
    assert main(["config", "validate", str(path), "train.lrr=1"]) == 2
    assert "did you mean train.lr?" in capsys.readouterr().err


def test_vision_cache_needs_a_frozen_tower():
    from vlmtune.config import validate_config
    from vlmtune.errors import VlmtuneError

    raw = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl", "cache_vision": True}}
    assert validate_config(raw).data.cache_vision
    for lora in ({"vision": "lora"}, {"merger": True}):
        with pytest.raises(VlmtuneError, match="cache_vision"):
            validate_config({**raw, "lora": lora})


def test_each_loss_names_the_keys_it_reads():
    from vlmtune.config import LossConfig

    assert LossConfig(name="dpop").keys_read() == ("name", "beta", "sft_weight", "dpop_lambda")
    assert LossConfig(name="simpo").keys_read() == ("name", "beta", "sft_weight", "reference_free", "label_smoothing",
                                                    "simpo_gamma")
    assert LossConfig(name="mpo").keys_read() == ("name", "beta", "mpo_weights", "bco_reward_shift")
    assert LossConfig(name="ipo").keys_read() == ("name", "beta", "sft_weight", "reference_free")
    assert LossConfig().keys_read("kto") == ("beta", "kto_desirable_weight", "kto_undesirable_weight")
