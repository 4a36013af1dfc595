"""What a loaded folder may not do: run its own code without --trust-remote-code, load pickle
weights, or put an adapter on a model it was not trained on. Each case as a user hits it, through
the CLI: exit 2, a message that names the folder and what to do, and nothing run or loaded."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from vlmtune.cli import main
from vlmtune.models.adapters import BASE_RECORD, adapter_misfits, record_base
from vlmtune.models.load import add_lora, check_model_source, load_model
from vlmtune.models.tiny import build_tiny

# Code a hostile folder ships: importing or unpickling it would create MARKER.
EVIL_MODULE = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


class _Touch:
    """Unpickling this object creates a file: what a hostile adapter_model.bin could do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "ran"))


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return build_tiny("qwen3-vl", tmp_path_factory.mktemp("tiny-qwen3-vl-safety"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("safety-image") / "scene.png"
    Image.new("RGB", (112, 112), (40, 90, 160)).save(path)
    return path


@pytest.fixture(scope="module")
def qwen2_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny Qwen2-VL (language model and vision tower), saved as a run saves it."""
    model, _ = load_model(tiny_model_dir)
    peft_model = add_lora(model, rank=4, alpha=8, train_vision="lora")
    folder = tmp_path_factory.mktemp("qwen2-adapter")
    peft_model.save_pretrained(folder, safe_serialization=True)
    record_base(peft_model, folder)
    return folder


def infer(model: Path | None, adapter: Path | None, image: Path, *extra: str) -> int:
    argv = ["infer", "--image", str(image), "--prompt", "Count the cars.", "--max-new-tokens", "2", *extra]
    argv += ["--model", str(model)] if model else []
    argv += ["--adapter", str(adapter)] if adapter else []
    return main(argv)


def with_custom_code(model_dir: Path, out: Path, marker: Path, file: str = "config.json") -> Path:
    """A copy of ``model_dir`` whose ``file`` names custom code (``auto_map``) that would create ``marker``."""
    shutil.copytree(model_dir, out)
    (out / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    data = json.loads((out / file).read_text())
    data["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoProcessor": "evil.EvilProcessor"}
    (out / file).write_text(json.dumps(data))
    return out


def write_run(run: Path, base: Path | str, adapter: Path, **model_keys) -> Path:
    """A training-run folder as `vlmtune train` leaves it: config.yaml naming ``base``, the adapter in final/."""
    shutil.copytree(adapter, run / "final")
    config = {"model": {"name_or_path": str(base), **model_keys}, "data": {"train": "train.jsonl"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


# ----- remote code: only the command-line flag turns it on -----


def test_a_config_file_cannot_turn_on_remote_code(tiny_model_dir, tmp_path, capsys):
    config = {"model": {"name_or_path": str(tiny_model_dir), "trust_remote_code": True},
              "data": {"train": str(tmp_path / "train.jsonl")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "model.trust_remote_code cannot be set in a config file" in err
    assert "pass --trust-remote-code on the command line" in err


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_a_model_folder_with_its_own_code_is_refused_by_every_command(
    file, tiny_model_dir, synth_pairs_file, image, tmp_path, capsys
):
    marker = tmp_path / "ran"
    folder = with_custom_code(tiny_model_dir, tmp_path / "custom", marker, file)
    config = {"model": {"name_or_path": str(folder)}, "data": {"train": str(synth_pairs_file)},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    commands = [
        ["infer", "--model", str(folder), "--image", str(image), "--prompt", "Count."],
        ["eval", "--model", str(folder), "--data", str(synth_pairs_file), "--out", str(tmp_path / "eval")],
        ["compare", "--base", str(folder), "--tuned", str(folder), "--data", str(synth_pairs_file),
         "--out", str(tmp_path / "cmp")],
        ["model", "info", str(folder)],
        ["train", "--config", str(tmp_path / "c.yaml")],
        ["study", "create", "--db", str(tmp_path / "s.db"), "--name", "s", "--data", str(synth_pairs_file),
         "--a", str(folder), "--b", str(folder)],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{folder}: {file} has an auto_map" in err, argv
        assert "only when you pass --trust-remote-code on the command line" in err, argv
        assert not marker.exists(), argv
    # The flag is what opens the gate (the code itself is not run here).
    assert check_model_source(str(folder), trust_remote_code=True)["model_type"] == "qwen2_vl"


def test_export_does_not_take_trust_remote_code_from_the_run_folder(tiny_model_dir, qwen2_adapter, tmp_path, capsys):
    marker = tmp_path / "ran"
    folder = with_custom_code(tiny_model_dir, tmp_path / "custom", marker)
    run = write_run(tmp_path / "run", folder, qwen2_adapter, trust_remote_code=True)
    assert main(["export", "--merge", str(run), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "cannot do" in err and f"{folder}: config.json has an auto_map" in err
    assert "--trust-remote-code" in err
    assert not marker.exists() and not (tmp_path / "merged").exists()


# ----- adapters: safetensors only -----


def test_a_pickle_adapter_is_refused_and_never_unpickled(tiny_model_dir, qwen2_adapter, synth_pairs_file, image,
                                                         tmp_path, capsys):
    marker = tmp_path / "ran"
    adapter = tmp_path / "pickled"
    adapter.mkdir()
    shutil.copy(qwen2_adapter / "adapter_config.json", adapter)
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    run = write_run(tmp_path / "run", tiny_model_dir, adapter)
    commands = [
        (adapter, lambda: infer(tiny_model_dir, adapter, image)),
        (adapter, lambda: main(["eval", "--adapter", str(adapter), "--data", str(synth_pairs_file),
                                "--out", str(tmp_path / "e")])),
        (run / "final", lambda: main(["export", "--merge", str(run), str(tmp_path / "merged")])),
    ]
    for folder, command in commands:
        assert command() == 2, folder
        err = capsys.readouterr().err
        assert f"{folder} holds adapter_model.bin (a pickle file, which can run code when loaded)" in err
        assert "vlmtune loads adapters from safetensors only" in err
        assert not marker.exists(), folder


# ----- adapters: only on the model they were trained on -----


@pytest.mark.parametrize("other", ["tiny_qwen25_dir", "qwen3_dir"])
def test_an_adapter_on_another_family_is_refused(other, request, tiny_model_dir, qwen2_adapter, synth_pairs_file,
                                                 image, tmp_path, capsys):
    other_dir = request.getfixturevalue(other)
    family = {"tiny_qwen25_dir": "Qwen2.5-VL", "qwen3_dir": "Qwen3-VL"}[other]
    run = write_run(tmp_path / "run", other_dir, qwen2_adapter)
    commands = [
        lambda: infer(other_dir, qwen2_adapter, image),
        lambda: main(["eval", "--model", str(other_dir), "--adapter", str(qwen2_adapter),
                      "--data", str(synth_pairs_file), "--out", str(tmp_path / "e")]),
        lambda: main(["export", "--merge", str(run), str(tmp_path / "merged")]),
    ]
    for i, command in enumerate(commands):
        assert command() == 2, i
        err = capsys.readouterr().err
        assert f"was trained on {tiny_model_dir} (Qwen2-VL" in err, i
        assert f"the model {other_dir} is {family}" in err, i
        assert "put the adapter on the model it was trained on" in err, i
    assert not (tmp_path / "merged").exists()


def test_an_adapter_on_its_own_base_loads(tiny_model_dir, qwen2_adapter, image, capsys):
    assert infer(tiny_model_dir, qwen2_adapter, image) == 0
    assert infer(None, qwen2_adapter, image) == 0  # the base named in adapter_config.json
    assert "error" not in capsys.readouterr().err


def test_without_a_record_the_named_base_folder_and_the_shapes_are_checked(
    tiny_model_dir, tiny_qwen25_dir, qwen2_adapter, image, tmp_path, capsys
):
    # An adapter saved by plain peft: no base_model.json, but its base folder is here to read.
    plain = tmp_path / "plain"
    shutil.copytree(qwen2_adapter, plain)
    (plain / BASE_RECORD).unlink()
    assert infer(tiny_qwen25_dir, plain, image) == 2
    assert f"was trained on {tiny_model_dir} (Qwen2-VL" in capsys.readouterr().err

    # Its base is a hub id that is not here, and one factor is sized for a wider model.
    far = tmp_path / "far"
    shutil.copytree(plain, far)
    config = json.loads((far / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/wider-vl"
    (far / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(far / "adapter_model.safetensors")
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    assert weights[key].shape == (4, 64)
    weights[key] = torch.zeros(4, 96)
    save_file(weights, far / "adapter_model.safetensors")
    assert infer(tiny_model_dir, far, image) == 2
    err = capsys.readouterr().err
    assert "(trained on someone/wider-vl) does not fit the model" in err
    assert "layers.0.self_attn.q_proj.lora_A.weight: [4, 96] in the adapter, [4, 64] for the model" in err


def test_adapter_misfits_by_hand(tmp_path):
    """A linear layer 3 -> 5: lora_A is [r, 3], lora_B [5, r]; a copied parameter keeps its shape."""
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(3, 5)
    cases = [
        ("lin.lora_A.weight", (2, 3), None),
        ("lin.lora_B.weight", (5, 2), None),
        ("lin.bias", (5,), None),
        ("lin.lora_A.weight", (2, 4), "lin.lora_A.weight: [2, 4] in the adapter, [2, 3] for the model"),
        ("lin.lora_B.weight", (6, 2), "lin.lora_B.weight: [6, 2] in the adapter, [5, 2] for the model"),
        ("lin.weight", (5, 4), "lin.weight: [5, 4] in the adapter, [5, 3] for the model"),
        ("gone.lora_A.weight", (2, 3), "gone.lora_A.weight: the model has no such module"),
    ]
    for i, (key, shape, problem) in enumerate(cases):
        path = tmp_path / f"{i}.safetensors"
        save_file({f"base_model.model.{key}": torch.zeros(shape)}, path)
        assert adapter_misfits(path, model) == ([problem] if problem else []), key
