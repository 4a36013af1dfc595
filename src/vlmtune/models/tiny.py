"""Tiny random models of the real Qwen-VL architectures, with a locally trained tokenizer.

``build_tiny(family, out_dir)`` writes a folder in the standard checkpoint layout (config.json,
model.safetensors, tokenizer files, preprocessor_config.json, chat template) that plain
``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained`` load like a
downloaded checkpoint. Nothing touches the network: the byte-level BPE tokenizer is trained here on
a small corpus of counting sentences made in code, with Qwen2's own pre-tokenizer (which splits
numbers into single digits) and the family's special tokens and chat template.

Sizes: ``tiny`` (~0.3M parameters, for tests; a 112 px image becomes 8x8 patches, 16 image tokens),
``small`` (~30M parameters, for benchmarks; 224 px images, 64 image tokens) and, for Qwen2-VL only,
``2b``: every shape of the released Qwen2-VL-2B (2,208,985,600 parameters: 28 layers of width 1536,
a 32-block vision tower of width 1280, the 151,936-row embedding, tied), random weights, for timing
on a GPU without a download; its processor caps images at 448 x 448 px (256 image tokens), and the
embedding rows past the small local tokenizer's vocabulary are never looked up.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.models.chat_templates import QWEN2_VL_CHAT_TEMPLATE, QWEN3_VL_CHAT_TEMPLATE

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
SIZES = ("tiny", "small", "2b")

# The special tokens every Qwen-VL tokenizer carries, in the order of the real vocabularies.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2's pre-tokenizer regex (transformers' tokenization_qwen2.PRETOKENIZE_REGEX): ``\p{N}`` alone
# makes every digit its own token, which a counting task needs.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True)
class TinySize:
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    image_patches: int  # patches per image side at the largest image size (before 2x2 merge)
    vocab_size: int  # target size of the trained BPE vocabulary
    embedding_rows: int | None = None  # the model's vocabulary when it is wider than the tokenizer's
    families: tuple[str, ...] = FAMILIES  # the families this size has real dimensions for


TINY_SIZES = {
    "tiny": TinySize(64, 2, 4, 2, 128, 64, 2, 4, 128, 8, 400),
    "small": TinySize(512, 8, 8, 4, 1408, 256, 6, 4, 1024, 16, 1000),
    # Qwen2-VL-2B-Instruct's config.json: text 1536 x 28 layers, 12 heads (2 KV), MLP 8960; vision
    # 1280 x 32 blocks, 16 heads, MLP ratio 4; vocabulary 151,936.
    "2b": TinySize(1536, 28, 12, 2, 8960, 1280, 32, 16, 5120, 32, 1000, embedding_rows=151936,
                   families=("qwen2-vl",)),
}


def build_tiny(family: str, out_dir: str | Path, size: str = "tiny", seed: int = 0,
               image_patches: int | None = None) -> Path:
    """Write a random ``family`` model of ``size`` with a trained tokenizer and processor to ``out_dir``.

    The same ``seed`` gives byte-identical weights and tokenizer files. ``image_patches`` (even)
    replaces the size's patches per image side: 16 lets the ``tiny`` size see a 224 px Qwen2-VL
    image whole (64 image tokens) instead of shrinking it to 112 px (16 tokens).
    """
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    config, processor = tiny_config(family, size, seed, image_patches)
    tokenizer = processor.tokenizer
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # Real checkpoints also ship the image processor on its own; older loaders look for it there.
    processor.image_processor.save_pretrained(out)
    return out


def tiny_config(family: str, size: str = "tiny", seed: int = 0, image_patches: int | None = None):
    """The model config and the processor (with its freshly trained tokenizer) that ``build_tiny`` writes."""
    if family not in FAMILIES:
        raise VlmtuneError(f"unknown model family {family!r}: choose one of {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise VlmtuneError(f"unknown tiny model size {size!r}: choose one of {', '.join(SIZES)}")
    if image_patches is not None and (image_patches < 2 or image_patches % 2):
        raise VlmtuneError(f"image_patches {image_patches}: use an even number of at least 2 (2x2 patches merge)")
    dims = TINY_SIZES[size] if image_patches is None else replace(TINY_SIZES[size], image_patches=image_patches)
    if family not in dims.families:
        raise VlmtuneError(f"size {size!r} has real dimensions only for {', '.join(dims.families)}, not {family}")
    processor = _processor(family, dims, seed)
    return _config(family, dims, processor.tokenizer), processor


def image_side(family: str, size: str = "tiny") -> int:
    """The image side in pixels that fills a tiny model's patch grid exactly (112 or 128 for tiny)."""
    return TINY_SIZES[size].image_patches * _patch_size(family)


def _patch_size(family: str) -> int:
    return 16 if family == "qwen3-vl" else 14


def _processor(family: str, dims: TinySize, seed: int):
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    patch = _patch_size(family)
    factor = patch * 2  # one merged 2x2 block of patches
    pixels = dict(
        min_pixels=(2 * factor) ** 2,
        # At most image_patches x image_patches patches: 8x8 -> 16 tokens after the 2x2 merge.
        max_pixels=(dims.image_patches * patch) ** 2,
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
    )
    if family == "qwen3-vl":  # Qwen3-VL normalises to [-1, 1] rather than with CLIP's statistics
        pixels.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_processor = Qwen2VLImageProcessor(**pixels)
    tokenizer = _tokenizer(dims.vocab_size, seed)
    if family == "qwen3-vl":
        video = Qwen3VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
        return Qwen3VLProcessor(image_processor, tokenizer, video, chat_template=QWEN3_VL_CHAT_TEMPLATE)
    video = Qwen2VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
    cls = Qwen2_5_VLProcessor if family == "qwen2.5-vl" else Qwen2VLProcessor
    return cls(image_processor, tokenizer, video, chat_template=QWEN2_VL_CHAT_TEMPLATE)


def _tokenizer(vocab_size: int, seed: int):
    """A byte-level BPE trained on a generated counting corpus, wrapped as the real Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tokenizer


_CLASSES = ["car", "motorcycle", "bus", "bicycle", "truck", "person", "van", "dog"]
_PLURALS = {"bus": "buses", "person": "people"}
_WORDS = (
    "the a an in on of and there is are image picture photo count how many vehicles each class "
    "answer with number road street traffic you see zero one two three four five six seven eight "
    "nine ten please what describe left right front behind near far big small red blue white black "
    "green yellow parked moving lane crossing scene shows contains helpful assistant system user"
).split()


def _corpus(seed: int) -> list[str]:
    """Counting sentences, prompts and plain English words, generated deterministically from ``seed``."""
    rng = random.Random(seed)
    lines = []
    for _ in range(400):
        classes = rng.sample(_CLASSES, rng.randint(1, 4))
        parts = []
        for name in classes:
            n = rng.randint(0, 12)
            parts.append(f"{n} {name if n == 1 else _PLURALS.get(name, name + 's')}")
        lines.append(f"There are {', '.join(parts)} in the image.")
        lines.append(f"Count the {', '.join(classes)} in the image. Answer with a number for each class.")
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ".")
    lines.append("You are a helpful assistant. How many vehicles do you see? 0123456789")
    return lines


def _config(family: str, dims: TinySize, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = dims.embedding_rows or _round_up(len(tokenizer), 64)
    head_dim = dims.text_hidden // dims.text_heads
    text = dict(
        vocab_size=vocab_size,
        hidden_size=dims.text_hidden,
        intermediate_size=dims.text_intermediate,
        num_hidden_layers=dims.text_layers,
        num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=mrope_section(family, head_dim)),
    )
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    patch = _patch_size(family)
    if family == "qwen2-vl":
        vision = dict(
            depth=dims.vision_depth,
            embed_dim=dims.vision_hidden,
            hidden_size=dims.text_hidden,  # the merger's output width = the LM's width
            mlp_ratio=dims.vision_intermediate // dims.vision_hidden,
            num_heads=dims.vision_heads,
            patch_size=patch,
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
    vision = dict(  # Qwen2.5-VL's and Qwen3-VL's vision configs share these names
        depth=dims.vision_depth,
        hidden_size=dims.vision_hidden,
        intermediate_size=dims.vision_intermediate,
        num_heads=dims.vision_heads,
        out_hidden_size=dims.text_hidden,
        patch_size=patch,
    )
    if family == "qwen2.5-vl":
        vision.update(
            window_size=patch * 2 * 4,  # windows of 4x4 merged tokens, as in the real 112 px / 14 px
            fullatt_block_indexes=[dims.vision_depth - 1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
    text["rope_parameters"]["mrope_interleaved"] = True
    text["head_dim"] = head_dim
    vision.update(num_position_embeddings=dims.image_patches**2, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)


def mrope_section(family: str, head_dim: int) -> list[int]:
    """M-RoPE (temporal, height, width) frequency split; it must sum to ``head_dim // 2``.

    Scaled from the released ratios: Qwen2/2.5-VL use [16, 24, 24] of 64, Qwen3-VL [24, 20, 20]
    (interleaved) of 64.
    """
    half = head_dim // 2
    if family == "qwen3-vl":
        hw = half * 20 // 64
        return [half - 2 * hw, hw, hw]
    hw = half * 24 // 64
    return [half - 2 * hw, hw, hw]


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
