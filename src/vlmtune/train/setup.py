"""Build what a run trains: the policy (LoRA or full), its reference, the optimizer and the schedule."""

from __future__ import annotations

import math

import torch

from vlmtune.config import Config
from vlmtune.errors import VlmtuneError
from vlmtune.models.load import add_lora, frozen_copy, load_model
from vlmtune.train.steps import needs_reference


def build_model(config: Config, trust_remote_code: bool = False):
    """``(policy, processor, reference)``; ``reference`` is None when the adapter-off policy serves.

    The model is loaded with ``model.loader``; ``trust_remote_code`` comes from the command line.
    """
    m, lora = config.model, config.lora
    if m.loader == "unsloth":
        check_unsloth_settings(config)
    model, processor = load_model(
        m.name_or_path,
        dtype=m.dtype,
        attn_implementation=m.attn_implementation,
        min_pixels=m.min_pixels,
        max_pixels=m.max_pixels,
        trust_remote_code=trust_remote_code,
        load_in_4bit=m.quantization == "4bit",
        loader=m.loader,
        gradient_checkpointing=config.train.gradient_checkpointing,
    )
    model.config.use_cache = False
    if lora.enabled and m.loader == "unsloth":
        from vlmtune.models.unsloth_loader import add_lora_unsloth

        model = add_lora_unsloth(model, lora.rank, lora.alpha, lora.dropout, lora.vision, config.train.seed)
        return model, processor, None
    if lora.enabled:
        model = add_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules, lora.vision, lora.merger)
        return model, processor, None
    freeze_for_full_finetuning(model, lora.vision, lora.merger)
    return model, processor, frozen_copy(model) if needs_reference(config) else None


def check_unsloth_settings(config: Config) -> None:
    """The settings Unsloth's LoRA cannot honour are refused before anything is loaded."""
    lora = config.lora
    if not lora.enabled:
        raise VlmtuneError(
            "model.loader=unsloth trains LoRA adapters only: set lora.enabled=true or model.loader=transformers"
        )
    refused = [name for name, unsupported in (
        ("lora.target_modules (Unsloth picks the attention and MLP layers itself)", lora.target_modules is not None),
        ("lora.vision=full (Unsloth trains the vision tower with LoRA or not at all)", lora.vision == "full"),
        ("lora.merger=true (Unsloth does not train the projector on its own)", lora.merger),
    ) if unsupported]
    if refused:
        raise VlmtuneError(
            f"model.loader=unsloth cannot use {'; '.join(refused)}: change these or use model.loader=transformers"
        )


def freeze_for_full_finetuning(model, vision: str, merger: bool) -> None:
    """Full fine-tuning trains the language model; the vision tower and merger as ``lora.vision``/``merger`` say."""
    if vision == "lora":
        raise VlmtuneError("lora.vision=lora needs lora.enabled=true; for full fine-tuning choose frozen or full")
    model.requires_grad_(True)
    visual = model.model.visual
    if vision == "frozen":
        visual.requires_grad_(False)
        if merger:
            visual.merger.requires_grad_(True)
    elif not merger:
        visual.merger.requires_grad_(False)


def build_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no decay on biases and norms (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise VlmtuneError("the model has no trainable parameters: check the lora and model settings")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def build_scheduler(optimizer, schedule: str, warmup_ratio: float, total_steps: int):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine, linear or constant."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[schedule]
    warmup = math.ceil(warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
