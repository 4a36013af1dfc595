"""Tiny real-architecture models: they load with plain transformers, are deterministic, and their
tokenizer speaks the Qwen chat format."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image

from vlmtune.errors import VlmtuneError
from vlmtune.models.tiny import FAMILIES, build_tiny, image_side, mrope_section, tiny_config

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the cars."}]}]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tiny_model_dir, tiny_qwen25_dir):
    return {
        "qwen2-vl": tiny_model_dir,
        "qwen2.5-vl": tiny_qwen25_dir,
        "qwen3-vl": build_tiny("qwen3-vl", tmp_path_factory.mktemp("tiny-qwen3-vl"), seed=0),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_transformers_loads_and_generates(family, tiny_dirs):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs[family])
    processor = AutoProcessor.from_pretrained(tiny_dirs[family])
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 1_000_000

    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    image = Image.new("RGB", (112, 112), (200, 30, 30))
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == 16

    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert prompt_length < out.shape[1] <= prompt_length + 4  # may stop early on <|im_end|>


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_files(family, tmp_path):
    def digests(folder):
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}

    a = digests(build_tiny(family, tmp_path / "a", seed=3))
    b = digests(build_tiny(family, tmp_path / "b", seed=3))
    c = digests(build_tiny(family, tmp_path / "c", seed=4))
    assert a == b
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(a)
    assert a["model.safetensors"] != c["model.safetensors"]


def test_tokenizer_digits_and_special_tokens(tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    tokenizer = processor.tokenizer
    config = json.loads((tiny_model_dir / "config.json").read_text())

    for number in ("7", "12", "305", "2026"):
        pieces = tokenizer.tokenize(f"There are {number} cars")
        assert [p for p in pieces if p.strip("Ġ").isdigit()] == list(number)
    assert len(tokenizer) <= 500

    expected_ids = {
        "<|image_pad|>": config["image_token_id"],
        "<|video_pad|>": config["video_token_id"],
        "<|vision_start|>": config["vision_start_token_id"],
        "<|vision_end|>": config["vision_end_token_id"],
    }
    for token, token_id in expected_ids.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert config["text_config"]["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(tokenizer) <= config["text_config"]["vocab_size"]


def test_chat_template_renders_qwen_format(tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    messages = PROMPT + [{"role": "assistant", "content": [{"type": "text", "text": "There are 2 cars."}]}]
    text = processor.apply_chat_template(messages)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Count the cars.<|im_end|>\n"
        "<|im_start|>assistant\nThere are 2 cars.<|im_end|>\n"
    )
    # Round trip: the tokenizer decodes what it encodes.
    ids = processor.tokenizer.encode(text, add_special_tokens=False)
    assert processor.tokenizer.decode(ids) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_mrope_sections_fit_head_dim(family):
    for head_dim in (16, 64, 128):
        section = mrope_section(family, head_dim)
        assert sum(section) == head_dim // 2 and min(section) > 0
    assert mrope_section("qwen2-vl", 128) == [16, 24, 24]  # the released Qwen2-VL split
    assert mrope_section("qwen3-vl", 128) == [24, 20, 20]  # the released Qwen3-VL split


def test_image_side_fills_the_patch_grid():
    assert image_side("qwen2-vl") == 112 and image_side("qwen3-vl") == 128
    assert image_side("qwen2.5-vl", "small") == 224


def test_image_patches_widen_the_patch_grid(tmp_path):
    """A tiny Qwen2-VL with 16 patches a side sees a 224 px image whole: 16x16 patches, 64 tokens."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = build_tiny("qwen2-vl", tmp_path / "m224", seed=0, image_patches=16)
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (224, 224), (200, 30, 30))], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
    with pytest.raises(VlmtuneError, match="even number"):
        build_tiny("qwen2-vl", tmp_path / "odd", image_patches=7)


def test_unknown_family_and_size(tmp_path):
    with pytest.raises(VlmtuneError, match="unknown model family"):
        build_tiny("llava", tmp_path)
    with pytest.raises(VlmtuneError, match="unknown tiny model size"):
        build_tiny("qwen2-vl", tmp_path, size="huge")
    with pytest.raises(VlmtuneError, match="real dimensions only for qwen2-vl"):
        build_tiny("qwen3-vl", tmp_path, size="2b")


def test_2b_size_has_every_shape_of_qwen2_vl_2b():
    from transformers import AutoModelForImageTextToText

    config, processor = tiny_config("qwen2-vl", "2b")
    with torch.device("meta"):  # shapes only: no 9 GB of weights
        model = AutoModelForImageTextToText.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    # Qwen2-VL-2B-Instruct counted by hand from its config: text = embedding 151,936 x 1,536 (tied)
    # + 28 layers x 46,797,824 + final norm 1,536; vision = patch embedding 1,280 x 1,176
    # + 32 blocks x 19,677,440 + merger 34,087,936.
    assert sum(p.numel() for p in model.parameters()) == 2_208_985_600
    assert shapes["model.language_model.embed_tokens.weight"] == (151936, 1536)
    assert shapes["model.language_model.layers.27.mlp.down_proj.weight"] == (1536, 8960)
    assert shapes["model.language_model.layers.0.self_attn.k_proj.weight"] == (256, 1536)  # 2 KV heads of 128
    assert shapes["model.visual.blocks.31.attn.qkv.weight"] == (3840, 1280)
    assert processor.image_processor.size["longest_edge"] == 448 * 448 and image_side("qwen2-vl", "2b") == 448


def test_cli_model_tiny(tmp_path, capsys):
    from vlmtune.cli import main

    assert main(["model", "tiny", "--family", "qwen2.5-vl", "--out", str(tmp_path / "m"), "--seed", "1"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert "wrote a tiny qwen2.5-vl model" in capsys.readouterr().out
    assert main(["model", "info", str(tmp_path / "missing")]) == 2
    assert "no model folder" in capsys.readouterr().err
