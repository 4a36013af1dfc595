"""Loading through Unsloth (``model.loader: unsloth`` or ``--loader unsloth``): its LoRA/QLoRA kernels on CUDA.

Everything Unsloth-specific lives here, so the rest of vlmtune never imports it. Unsloth patches
transformers when imported, which is why this module imports it only once that loader is chosen,
from ``vlmtune.models.load.load_model`` (which also checks the model folder and loads the
processor). ``add_lora_unsloth`` gives a peft model, so ``reference_mode`` (adapter off) works on
it unchanged. On a machine without a CUDA device or the unsloth package, choosing this loader is a
``VlmtuneError`` that says what is missing.
"""

from __future__ import annotations

import importlib.util

from vlmtune.errors import VlmtuneError


def unsloth_missing() -> list[str]:
    """What this machine lacks for Unsloth (empty when it can be used)."""
    import torch

    missing = []
    if importlib.util.find_spec("unsloth") is None:
        missing.append("the unsloth package (pip install unsloth)")
    if not torch.cuda.is_available():
        missing.append("a CUDA device")
    return missing


def require_unsloth() -> None:
    """Raise a ``VlmtuneError`` naming what this machine lacks for the Unsloth loader, if anything."""
    missing = unsloth_missing()
    if missing:
        raise VlmtuneError(
            f"loader 'unsloth' (model.loader / --loader) needs {' and '.join(missing)}; "
            "use the default loader, transformers, instead"
        )


def load_model_unsloth(source: str, torch_dtype, load_in_4bit: bool, gradient_checkpointing: bool,
                       trust_remote_code: bool):
    """The model of ``source`` loaded with Unsloth's ``FastVisionModel`` (its processor is not used)."""
    require_unsloth()
    from unsloth import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(
        source,
        dtype=torch_dtype,
        load_in_4bit=load_in_4bit,
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,  # forwarded to transformers' from_pretrained: no pickle weights
    )
    return model


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
        raise VlmtuneError(f"with loader 'unsloth', lora.vision must be 'frozen' or 'lora', not {train_vision!r}")
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
