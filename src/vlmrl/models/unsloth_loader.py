"""Optional loading through Unsloth (``loader: unsloth``): faster LoRA/QLoRA kernels on CUDA.

Everything Unsloth-specific lives here, so the rest of vlmrl never imports it. Unsloth patches
transformers when imported, which is why this module imports it only when asked for, and why
``loader: unsloth`` is a choice made once, before any model is loaded. The result is the same
``(model, processor)`` pair ``vlmrl.models.load.load_model`` returns, and ``add_lora_unsloth``
gives a peft model, so ``reference_mode`` (adapter off) works on it unchanged.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vlmrl.errors import VlmrlError


def unsloth_missing() -> list[str]:
    """What this machine lacks for Unsloth (empty when it can be used)."""
    import torch

    missing = []
    if importlib.util.find_spec("unsloth") is None:
        missing.append("the unsloth package (pip install unsloth)")
    if not torch.cuda.is_available():
        missing.append("a CUDA device")
    return missing


def load_model_unsloth(
    name_or_path: str | Path,
    dtype: str = "bfloat16",
    load_in_4bit: bool = False,
    max_seq_length: int = 2048,
    gradient_checkpointing: bool = True,
):
    """Load ``(model, processor)`` with Unsloth's ``FastVisionModel``."""
    missing = unsloth_missing()
    if missing:
        raise VlmrlError(f"loader 'unsloth' needs {' and '.join(missing)}; use the default loader instead")
    import torch
    from unsloth import FastVisionModel

    from vlmrl.models.load import DTYPES

    if dtype not in DTYPES:
        raise VlmrlError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    model, processor = FastVisionModel.from_pretrained(
        str(name_or_path),
        dtype=getattr(torch, DTYPES[dtype]),
        load_in_4bit=load_in_4bit,
        max_seq_length=max_seq_length,
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
    )
    return model, processor


def add_lora_unsloth(
    model,
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    train_vision: str = "frozen",
    seed: int = 0,
):
    """LoRA through Unsloth: language-model attention and MLP layers, the vision tower when asked."""
    from unsloth import FastVisionModel

    if train_vision not in ("frozen", "lora"):
        raise VlmrlError(f"with loader 'unsloth', train_vision must be 'frozen' or 'lora', not {train_vision!r}")
    return FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=train_vision == "lora",
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        random_state=seed,
    )
