"""Loading families, LoRA on the language model only, and the reference as the adapter switched off."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from PIL import Image

from vlmrl.batch import encode_pairs
from vlmrl.data.records import PreferenceRecord, user_prompt
from vlmrl.errors import VlmrlError
from vlmrl.forward.plain import sequence_logps
from vlmrl.models.load import add_lora, frozen_copy, load_model, reference_mode
from vlmrl.models.tiny import build_tiny

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
    with pytest.raises(VlmrlError, match="no model folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(VlmrlError, match="unknown dtype"):
        load_model(tmp_path, dtype="int3")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(VlmrlError, match="'llama' model; vlmrl supports Qwen2-VL"):
        load_model(tmp_path / "llama")


def test_four_bit_needs_bitsandbytes_and_cuda(tiny_model_dir):
    if importlib.util.find_spec("bitsandbytes") and torch.cuda.is_available():
        pytest.skip("bitsandbytes and CUDA are both present: 4-bit loading is possible here")
    with pytest.raises(VlmrlError, match="4-bit loading .* needs"):
        load_model(tiny_model_dir, load_in_4bit=True)


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
    with pytest.raises(VlmrlError, match="train_vision"):
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
    with pytest.raises(VlmrlError, match="frozen_copy"):
        with reference_mode(model):
            pass
    reference = frozen_copy(model)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q) and not q.requires_grad and p.data_ptr() != q.data_ptr(), name
    assert not reference.training


def test_unsloth_loader_says_what_is_missing(tiny_model_dir):
    from vlmrl.models.unsloth_loader import load_model_unsloth, unsloth_missing

    missing = unsloth_missing()
    if not missing:
        pytest.skip("unsloth and CUDA are both present: the Unsloth loader can run here")
    with pytest.raises(VlmrlError, match="loader 'unsloth' needs"):
        load_model_unsloth(tiny_model_dir)
