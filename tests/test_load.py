"""Loading families, LoRA on the language model only, and the reference as the adapter switched off."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
import yaml
from PIL import Image

from vlmtune.batch import encode_pairs
from vlmtune.cli import main
from vlmtune.data.records import PreferenceRecord, user_prompt
from vlmtune.errors import VlmtuneError
from vlmtune.forward.plain import sequence_logps
from vlmtune.models.info import model_info
from vlmtune.models.load import add_lora, frozen_copy, load_model, reference_mode
from vlmtune.models.tiny import build_tiny
from vlmtune.models.unsloth_loader import unsloth_missing

LM_LINEAR = re.compile(r".*language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return build_tiny("qwen3-vl", tmp_path_factory.mktemp("tiny-qwen3-vl-load"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("load-images") / "scene.png"
    Image.new("RGB", (112, 112), (40, 90, 160)).save(path)
    return [PreferenceRecord("x", [str(path)], user_prompt("Count the cars."), "There are 2 cars.", "1 bus.")]


def lora_module_names(model):
    return sorted({name.rsplit(".lora_A", 1)[0] for name, _ in model.named_modules() if ".lora_A" in name})


def test_load_families_dtype_and_pixels(tiny_model_dir, tiny_qwen25_dir, qwen3_dir):
    for folder, cls in (
        (tiny_model_dir, "Qwen2VLForConditionalGeneration"),
        (tiny_qwen25_dir, "Qwen2_5_VLForConditionalGeneration"),
        (qwen3_dir, "Qwen3VLForConditionalGeneration"),
    ):
        model, processor = load_model(folder, dtype="bf16")
        assert type(model).__name__ == cls
        assert next(model.parameters()).dtype == torch.bfloat16

    model, processor = load_model(tiny_model_dir, max_pixels=56 * 56)
    grid = processor.image_processor(images=[Image.new("RGB", (112, 112))])["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]  # 4 image tokens instead of 16


def test_load_errors(tmp_path):
    with pytest.raises(VlmtuneError, match="no model folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(VlmtuneError, match="unknown dtype"):
        load_model(tmp_path, dtype="int3")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(VlmtuneError, match="'llama' model; vlmtune supports Qwen2-VL"):
        load_model(tmp_path / "llama")


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen25_dir", "qwen3_dir"])
def test_lora_targets_only_language_model_linears(fixture, request):
    model, _ = load_model(request.getfixturevalue(fixture))
    n_layers = model.config.text_config.num_hidden_layers
    peft_model = add_lora(model, rank=4, alpha=8)
    names = lora_module_names(peft_model)
    assert len(names) == 7 * n_layers
    assert all(LM_LINEAR.match(name) for name in names), names
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name and "visual" not in name for name in trainable)


def test_lora_on_vision_and_full_vision(tiny_qwen25_dir):
    model, _ = load_model(tiny_qwen25_dir)
    names = lora_module_names(add_lora(model, rank=4, train_vision="lora"))
    assert any("visual.blocks.0.mlp.gate_proj" in n for n in names)  # same short name as the LM's
    assert not any("merger" in n for n in names)

    model, _ = load_model(tiny_qwen25_dir)
    peft_model = add_lora(model, rank=4, train_vision="full", train_merger=True)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any(re.search(r"visual\.blocks\.1\.modules_to_save\.default\.attn\.qkv", n) for n in trainable)
    assert any("visual.merger" in n for n in trainable)
    with pytest.raises(VlmtuneError, match="train_vision"):
        add_lora(load_model(tiny_qwen25_dir)[0], train_vision="half")


@pytest.mark.parametrize("train_vision", ["frozen", "full"])
def test_reference_mode_is_the_base_model(tiny_model_dir, pair, train_vision):
    model, processor = load_model(tiny_model_dir)
    model.eval()
    inputs = encode_pairs(pair, processor, max_length=128).chosen
    with torch.no_grad():
        base, _ = sequence_logps(model, inputs)

    peft_model = add_lora(model, rank=4, train_vision=train_vision, train_merger=train_vision == "full")
    torch.manual_seed(0)
    with torch.no_grad():  # move every trainable weight so the adapter changes the output
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    adapted, _ = sequence_logps(peft_model, inputs)
    assert not torch.allclose(adapted, base)

    with reference_mode(peft_model):
        reference, _ = sequence_logps(peft_model, inputs)
    assert not reference.requires_grad
    torch.testing.assert_close(reference, base)
    adapted_again, _ = sequence_logps(peft_model, inputs)
    torch.testing.assert_close(adapted_again, adapted)  # the adapter is back on afterwards


def test_reference_mode_needs_an_adapter_and_frozen_copy(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    with pytest.raises(VlmtuneError, match="frozen_copy"):
        with reference_mode(model):
            pass
    reference = frozen_copy(model)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q) and not q.requires_grad and p.data_ptr() != q.data_ptr(), name
    assert not reference.training


def test_unknown_loader_is_refused(tiny_model_dir):
    with pytest.raises(VlmtuneError, match="unknown loader 'fast': choose one of transformers, unsloth"):
        load_model(tiny_model_dir, loader="fast")


def test_gradient_checkpointing_is_switched_on_by_the_loader(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, gradient_checkpointing=True)
    assert model.is_activation_checkpointing
    assert not load_model(tiny_model_dir)[0].is_activation_checkpointing


def test_model_info_counts_the_image_tokens_the_processor_makes(tiny_model_dir, qwen3_dir, capsys):
    """The token count of ``vlmtune model info`` is the number of <|image_pad|> the processor puts in
    a prompt for such an image (merge size read from the processor, not assumed)."""
    for folder, side in ((tiny_model_dir, 112), (qwen3_dir, 128), (tiny_model_dir, 56)):
        processor = load_model(folder)[1]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count."}]}],
            add_generation_prompt=True,
        )
        inputs = processor(text=[prompt], images=[Image.new("RGB", (side, side))], return_tensors="pt")
        pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        expected = int((inputs["input_ids"] == pad).sum())
        info = model_info(folder, image_size=side)
        assert info.image_tokens == expected and info.patch_grid == tuple(inputs["image_grid_thw"][0].tolist())
        assert main(["model", "info", str(folder), "--image-size", str(side)]) == 0
        out = capsys.readouterr().out
        assert f"image tokens for {side} px: {expected} " in out
        assert f"parameters: {info.parameters:,}" in out and info.parameters == sum(
            p.numel() for p in load_model(folder)[0].parameters())


# ----- QLoRA and Unsloth: the feature on a GPU, the clear error where it cannot run -----


def four_bit_possible() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()


def write_config(tmp_path, model_dir, data_file, **model_keys):
    config = {"model": {"name_or_path": str(model_dir), **model_keys},
              "data": {"train": str(data_file), "max_length": 128},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.skipif(four_bit_possible(), reason="4-bit loading can run here: test_qlora_trains_on_a_gpu covers it")
def test_four_bit_says_what_is_missing(tiny_model_dir, synth_pairs_file, tmp_path, capsys):
    config = write_config(tmp_path, tiny_model_dir, synth_pairs_file, quantization="4bit")
    assert main(["train", "--config", config]) == 2
    err = capsys.readouterr().err
    assert "error: 4-bit loading (QLoRA) needs" in err and "load without 4-bit instead" in err
    assert ("a CUDA device" in err) == (not torch.cuda.is_available())
    assert ("bitsandbytes" in err) == (importlib.util.find_spec("bitsandbytes") is None)
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.skipif(not unsloth_missing(),
                    reason="Unsloth can run here: test_unsloth_loads_and_trains_on_a_gpu covers it")
def test_unsloth_loader_says_what_is_missing(tiny_model_dir, synth_pairs_file, pair, tmp_path, capsys):
    missing = " and ".join(unsloth_missing())
    config = write_config(tmp_path, tiny_model_dir, synth_pairs_file, loader="unsloth")
    commands = [
        ["train", "--config", config],
        ["infer", "--loader", "unsloth", "--model", str(tiny_model_dir), "--image", pair[0].images[0],
         "--prompt", "Count."],
        ["eval", "--loader", "unsloth", "--model", str(tiny_model_dir), "--data", str(synth_pairs_file),
         "--out", str(tmp_path / "eval")],
        ["compare", "--loader", "unsloth", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir),
         "--data", str(synth_pairs_file), "--out", str(tmp_path / "cmp")],
        ["study", "create", "--loader", "unsloth", "--db", str(tmp_path / "s.db"), "--name", "s",
         "--data", str(synth_pairs_file), "--a", str(tiny_model_dir), "--b", str(tiny_model_dir)],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: loader 'unsloth' (model.loader / --loader) needs {missing}; use the default loader" in err


def test_unsloth_settings_it_cannot_honour_are_refused_before_loading(tiny_model_dir, synth_pairs_file, tmp_path,
                                                                      capsys):
    config = write_config(tmp_path, tiny_model_dir, synth_pairs_file, loader="unsloth")
    for overrides, message in (
        (["lora.enabled=false"], "model.loader=unsloth trains LoRA adapters only"),
        (["lora.merger=true", "lora.vision=full"], "cannot use lora.vision=full (Unsloth trains the vision tower "
         "with LoRA or not at all); lora.merger=true"),
    ):
        assert main(["train", "--config", config, *overrides]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.gpu
def test_qlora_trains_on_a_gpu(tiny_model_dir, pair):
    """NF4 language model, full-precision vision tower and head, LoRA on top: a step moves only LoRA,
    and the adapter switched off gives the quantised base model's output."""
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs the bitsandbytes package")
    model, processor = load_model(tiny_model_dir, dtype="bfloat16", load_in_4bit=True)
    linears = {name: type(m) for name, m in model.named_modules() if LM_LINEAR.match(name)}
    assert linears and all(cls is bnb.nn.Linear4bit for cls in linears.values())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for name, m in model.named_modules()
                   if "visual" in name or name == "lm_head")
    inputs = {k: v.to("cuda") for k, v in encode_pairs(pair, processor, max_length=128).chosen.items()}
    with torch.no_grad():
        base, _ = sequence_logps(model.eval(), inputs)
    peft_model = add_lora(model, rank=4, alpha=8)
    _one_step_moves_only_lora(peft_model, inputs)
    with reference_mode(peft_model):
        reference, _ = sequence_logps(peft_model, inputs)
    torch.testing.assert_close(reference, base)


@pytest.mark.gpu
def test_unsloth_loads_and_trains_on_a_gpu(tiny_model_dir, pair):
    """The Unsloth loader gives a CUDA model whose Unsloth LoRA trains, and whose adapter switched off
    is the loaded base model."""
    pytest.importorskip("unsloth", reason="the Unsloth loader needs the unsloth package")
    from vlmtune.models.unsloth_loader import add_lora_unsloth

    model, processor = load_model(tiny_model_dir, dtype="bfloat16", loader="unsloth")
    assert next(model.parameters()).is_cuda
    inputs = {k: v.to("cuda") for k, v in encode_pairs(pair, processor, max_length=128).chosen.items()}
    with torch.no_grad():
        base, _ = sequence_logps(model.eval(), inputs)
    peft_model = add_lora_unsloth(model, rank=4, alpha=8)
    _one_step_moves_only_lora(peft_model, inputs)
    with reference_mode(peft_model):
        reference, _ = sequence_logps(peft_model, inputs)
    torch.testing.assert_close(reference, base)


def _one_step_moves_only_lora(peft_model, inputs) -> None:
    """One SGD step on the chosen answer's NLL changes every LoRA weight and nothing else."""
    peft_model.train()
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    logps, _ = sequence_logps(peft_model, inputs)
    (-logps.sum()).backward()
    torch.optim.SGD(trainable, lr=1.0).step()
    for name, p in peft_model.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        if ".lora_B" in name:  # lora_B starts at zero, so only it moves in the first step
            assert moved, name
        elif not p.requires_grad:
            assert not moved, name
    peft_model.eval()
