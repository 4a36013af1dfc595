"""What the fast forwards read from a model: the transformers model under its wrappers, whether its
attention takes a custom 4D mask, and a mask in the form that attention takes.

The packed pair forward (``vlmtune.forward.shared_prefix``), the group forward
(``vlmtune.forward.group``) and the cut last layer (``vlmtune.forward.last_layer``) all hand the model
their own ``(B, 1, Q, K)`` attention mask. transformers' sdpa attention takes it as booleans
(True: attend); eager attention adds it to the scores, so it needs 0 where a query attends and the
dtype's most negative value where it does not. flash-attention takes no such mask at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmtune.models.load import MASKED_ATTENTION, SUPPORTED_MODEL_TYPES

if TYPE_CHECKING:
    import torch


def unwrap(model):
    """The ``...ForConditionalGeneration`` inside ``model`` (distributed and peft wrappers removed).

    With peft the adapters are injected in place, so calling this object's ``model`` runs them (or
    not, inside ``disable_adapter``). Only read from it: the forward itself goes through ``model``.
    """
    from accelerate.utils import extract_model_from_parallel
    from peft import PeftModel

    model = extract_model_from_parallel(model)
    return model.get_base_model() if isinstance(model, PeftModel) else model


def attention_implementation(model) -> str:
    """The attention implementation of ``model``'s language model (``"sdpa"``, ``"eager"``, ...)."""
    return unwrap(model).model.language_model.config._attn_implementation


def unsupported_reason(model) -> str | None:
    """Why the fast forwards cannot run ``model`` exactly, or None when they can."""
    model_type = getattr(unwrap(model).config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    attention = attention_implementation(model)
    if attention not in MASKED_ATTENTION:
        return f"attention implementation {attention!r} takes no 4D mask (use {' or '.join(MASKED_ATTENTION)})"
    return None


def attention_mask(allowed: torch.Tensor, attention: str, dtype) -> torch.Tensor:
    """``allowed`` (bool, True: the query attends to the key) as ``attention`` takes it.

    sdpa: the booleans themselves. Otherwise (eager) an additive float mask of ``dtype``: 0 where
    allowed, the dtype's most negative value elsewhere.
    """
    import torch

    if attention == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
