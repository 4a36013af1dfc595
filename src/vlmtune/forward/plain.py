"""The obvious pair forward: chosen and rejected as two separate full forward passes.

This is the reference the fast pair forward (image encoded once, shared prompt) is checked
against, so it is written for clarity, not speed: every pass re-encodes the images and re-reads
the prompt. ``ForwardStats`` counts that work so a benchmark can print what the fast path saves.

The log-probability of an answer is the sum over its labelled tokens of
``log p(token_t | tokens_<t, images)``: the logits at position ``t - 1`` predict the token at
``t``, so labels are shifted left by one. The softmax is taken in float32 whatever the model's
dtype, since bf16 log-probabilities summed over an answer lose the small differences DPO uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlmtune.batch import IGNORE_INDEX, PairBatch

if TYPE_CHECKING:
    import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


@dataclass
class ForwardStats:
    """Work done by forward passes, accumulated across calls.

    ``images_encoded``: images run through the vision encoder (one per image per pass).
    ``prompt_tokens``: prompt tokens run through the language model (image tokens included).
    ``answer_tokens``: labelled answer tokens run through the language model.
    ``passes``: model forward calls.
    """

    images_encoded: int = 0
    prompt_tokens: int = 0
    answer_tokens: int = 0
    passes: int = 0

    def add(self, inputs: dict) -> None:
        answer = int((inputs["labels"] != IGNORE_INDEX).sum())
        self.images_encoded += len(inputs["image_grid_thw"]) if "image_grid_thw" in inputs else 0
        self.prompt_tokens += int(inputs["attention_mask"].sum()) - answer
        self.answer_tokens += answer
        self.passes += 1


@dataclass
class PairLogps:
    """Summed answer log-probabilities of each side, shape ``(B,)``, and their token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def sequence_logps(model, inputs: dict, stats: ForwardStats | None = None):
    """Summed log-probabilities of the labelled tokens of each row: ``(logps [B], n_tokens [B])``.

    ``inputs`` comes from ``vlmtune.batch`` (``labels`` is -100 outside the answer). Gradients flow
    through ``logps`` when the model is in a grad context.
    """
    if stats is not None:
        stats.add(inputs)
    logits = model(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs}, use_cache=False).logits
    return token_logps_sum(logits, inputs["labels"])


def token_logps_sum(logits, labels):
    """Sum of ``log_softmax(logits)[t - 1, labels[t]]`` over labelled positions ``t``, per row."""
    import torch

    logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    # Only the labelled positions are turned into float32 log-probabilities: [n_labelled, vocab].
    picked = torch.log_softmax(logits[mask].float(), dim=-1)
    token_logps = picked.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(mask)[mask]
    logps = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device)
    logps = logps.index_add(0, rows, token_logps)
    return logps, mask.sum(dim=1)


def plain_pair_logps(model, batch: PairBatch, stats: ForwardStats | None = None) -> PairLogps:
    """Chosen and rejected answers' summed log-probabilities, as two separate forward passes."""
    chosen, chosen_tokens = sequence_logps(model, batch.chosen, stats)
    rejected, rejected_tokens = sequence_logps(model, batch.rejected, stats)
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)
