"""Per-token log-probabilities of G completions that share one prompt and its images (GRPO).

Every completion of a group is conditioned on the same prompt and images, so the work they share
is done once:

- **Images**: the vision tower runs once per image (``image_features``); its output is handed
  to the language model through transformers' ``mm_encoder_outputs`` instead of ``pixel_values``,
  repeated for the G rows where needed: the G completions never re-encode the image.
- **Prompt** (``shared_prompt_logps``, the default): one sequence per group,
  ``prompt | c1 | c2 | ... | cG``, with a block attention mask in which each completion sees the
  prompt and its own earlier tokens only, and M-RoPE positions that restart right after the
  prompt for every completion. Each completion then sees exactly what it would see alone, so its
  log-probs equal the per-sequence ones; the prompt's tokens are run once instead of G times.
  The custom 4D mask needs the eager or SDPA attention (not flash-attention).
- ``repeated_prompt_logps`` is the simple layout: G rows ``prompt | c_g`` (the prompt repeated),
  the image still encoded once. It works with every attention implementation.

Both return ``(logps, entropy)`` of shape ``(N*G, T)`` aligned with ``GroupBatch.completion_ids``:
``logps[r, t] = log p(c_r[t] | prompt, c_r[<t])`` in float32, with the logits divided by
``temperature`` first (the distribution the completions were sampled from, as TRL does; top-p's
truncation is not applied), and the entropy of that distribution (no gradient); both are 0 where
``completion_mask`` is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from vlmtune.errors import VlmtuneError
from vlmtune.forward import last_layer
from vlmtune.forward.inner import attention_implementation, attention_mask, unwrap
from vlmtune.models.load import MASKED_ATTENTION

if TYPE_CHECKING:
    import torch

_TENSORS = ("prompt_ids", "prompt_mask", "prompt_mm_types", "pixel_values", "image_grid_thw", "completion_ids",
            "completion_attention", "completion_mask")


@dataclass
class GroupBatch:
    """N prompts (left-padded, as the sampler encoded them) and G completions each (right-padded).

    ``prompt_*``: ``(N, P)``; ``pixel_values`` and ``image_grid_thw``: each image once, prompts in
    order (None for text-only prompts); ``completion_ids``: ``(N*G, T)``, a prompt's G
    completions together; ``completion_attention`` is 1 on every token of a completion (its stop
    token included), ``completion_mask`` on the tokens that are scored (the same, minus any vision
    special token, which is replaced by padding: see ``build_group_batch``).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_mm_types: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    images_per_prompt: list[int]
    completion_ids: torch.Tensor
    completion_attention: torch.Tensor
    completion_mask: torch.Tensor
    group_size: int
    pad_id: int

    def to(self, device) -> GroupBatch:
        moved = {name: getattr(self, name) for name in _TENSORS if getattr(self, name) is not None}
        return replace(self, **{name: value.to(device) for name, value in moved.items()})

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


def build_group_batch(
    prompts, completions: list[list[int]], group_size: int, images_per_prompt: list[int], pad_id: int,
    vision_ids: list[int],
) -> GroupBatch:
    """Join the sampler's prompt batch with the completions' token ids (a prompt's G together).

    ``prompts`` is the processor's left-padded output for the N prompts (``input_ids``,
    ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``). A vision
    special token inside a completion (possible with a backend that cannot suppress it) would break
    the image-token count of the forward pass: it is replaced by padding and not scored.
    """
    import torch

    n = prompts["input_ids"].shape[0]
    if len(completions) != n * group_size:
        raise VlmtuneError(f"{len(completions)} completions for {n} prompts x {group_size} per group")
    width = max(1, max(len(c) for c in completions))
    ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(completions), width), dtype=torch.long)
    for row, completion in enumerate(completions):
        ids[row, : len(completion)] = torch.tensor(completion, dtype=torch.long)
        attention[row, : len(completion)] = 1
    vision = torch.isin(ids, torch.tensor(vision_ids, dtype=torch.long)) & attention.bool()
    ids = ids.masked_fill(vision, pad_id)
    mm_types = prompts.get("mm_token_type_ids")
    return GroupBatch(
        prompt_ids=prompts["input_ids"],
        prompt_mask=prompts["attention_mask"],
        prompt_mm_types=mm_types if mm_types is not None else torch.zeros_like(prompts["input_ids"]),
        pixel_values=prompts.get("pixel_values"),
        image_grid_thw=prompts.get("image_grid_thw"),
        images_per_prompt=list(images_per_prompt),
        completion_ids=ids,
        completion_attention=attention,
        completion_mask=attention * (~vision).long(),
        group_size=group_size,
        pad_id=pad_id,
    )


def group_logps(model, batch: GroupBatch, temperature: float = 1.0, shared_prompt: bool = True):
    """``(logps, entropy)`` of every completion token, ``(N*G, T)``; see the module docstring."""
    if shared_prompt:
        return shared_prompt_logps(model, batch, temperature)
    return repeated_prompt_logps(model, batch, temperature)


def repeated_prompt_logps(model, batch: GroupBatch, temperature: float = 1.0):
    """G rows ``prompt | c_g`` per prompt, the image encoded once and its features repeated."""
    import torch

    g, width = batch.group_size, batch.completion_ids.shape[1]
    inputs = {
        "input_ids": torch.cat([batch.prompt_ids.repeat_interleave(g, 0), batch.completion_ids], dim=1),
        "attention_mask": torch.cat(
            [batch.prompt_mask.repeat_interleave(g, 0), batch.completion_attention], dim=1
        ),
        "mm_token_type_ids": torch.cat(
            [batch.prompt_mm_types.repeat_interleave(g, 0), torch.zeros_like(batch.completion_ids)], dim=1
        ),
    }
    if batch.pixel_values is not None:
        order = _image_order(batch.images_per_prompt, g)
        inputs["mm_encoder_outputs"] = {"image": image_features(model, batch, order)}
        inputs["image_grid_thw"] = batch.image_grid_thw[order]
    # Only the last T + 1 positions' logits are needed: position P-1+t predicts completion token t.
    logits = model(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
    return completion_token_logps(logits, batch.completion_ids, temperature, batch.completion_mask)


def shared_prompt_logps(model, batch: GroupBatch, temperature: float = 1.0):
    """One sequence ``prompt | c1 | ... | cG`` per prompt with a block mask; see the module docstring."""
    import torch

    base = unwrap(model)
    attention = attention_implementation(model)
    if attention not in MASKED_ATTENTION:
        raise VlmtuneError(
            f"the shared-prompt GRPO forward needs {' or '.join(MASKED_ATTENTION)} attention (a custom block mask), "
            f"not {attention}; set grpo.shared_prompt=false"
        )
    layout = _shared_layout(base, batch, attention)
    inputs = {"input_ids": layout.input_ids, "position_ids": layout.position_ids, "attention_mask": layout.mask}
    if batch.pixel_values is not None:
        order = list(range(len(batch.image_grid_thw)))
        inputs["mm_encoder_outputs"] = {"image": image_features(model, batch, order)}
    # Logits only from the first position that predicts a completion token on (the rest is prompt);
    # the last decoder layer runs only there too (``vlmtune.forward.last_layer``), exactly.
    first = int(layout.predictor.min())
    n_rows, width = layout.input_ids.shape
    read = torch.arange(first, width, device=layout.input_ids.device).expand(n_rows, -1)
    with last_layer.rows_only(base.model, read):
        logits = model(**inputs, logits_to_keep=width - first, use_cache=False).logits
    rows = layout.row_of_completion.unsqueeze(1).expand_as(layout.predictor)
    return completion_token_logps(
        logits[rows, layout.predictor - first], batch.completion_ids, temperature, batch.completion_mask
    )


def completion_token_logps(logits, targets, temperature: float = 1.0, mask=None):
    """``log_softmax(logits / temperature)`` at ``targets`` in float32, and the entropy (no grad).

    ``logits``: ``(B, T, V)``; ``targets``: ``(B, T)``. Only positions where ``mask`` is set are
    turned into float32 distributions (a real vocabulary is ~150k wide); the others are 0.
    """
    import torch

    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
    logps_all = torch.log_softmax(logits[keep].float() / temperature, dim=-1)  # (n, V)
    picked = logps_all.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
    logps = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device).masked_scatter(keep, picked)
    with torch.no_grad():
        entropy = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
        entropy = entropy.masked_scatter(keep, -(logps_all.exp() * logps_all).sum(-1))
    return logps, entropy


def image_features(model, batch: GroupBatch, order: list[int]):
    """The vision tower's output for each image once, laid out as ``order`` (indices of images).

    Returns the model's own output object (``pooler_output``: a tuple of per-image features; for
    Qwen3-VL also ``deepstack_features``) for ``mm_encoder_outputs={"image": ...}``.
    """
    base = unwrap(model)
    encoded = base.get_image_features(batch.pixel_values, batch.image_grid_thw, return_dict=True)
    laid_out = {"pooler_output": tuple(encoded.pooler_output[i] for i in order)}
    if encoded.get("deepstack_features") is not None:
        laid_out["deepstack_features"] = [tuple(layer[i] for i in order) for layer in encoded.deepstack_features]
    return type(encoded)(**laid_out)


def _image_order(images_per_prompt: list[int], group_size: int) -> list[int]:
    """Image indices for G rows per prompt: each prompt's images, G times, prompts in order."""
    order, start = [], 0
    for k in images_per_prompt:
        order += list(range(start, start + k)) * group_size
        start += k
    return order


@dataclass
class _SharedLayout:
    input_ids: torch.Tensor  # (N, L): prompt | c1 | ... | cG | padding
    position_ids: torch.Tensor  # (3, N, L)
    mask: torch.Tensor  # (N, 1, L, L): boolean for sdpa (True: attend), additive float for eager
    row_of_completion: torch.Tensor  # (N*G,)
    predictor: torch.Tensor  # (N*G, T): position whose logits predict completion token t


def _shared_layout(base, batch: GroupBatch, attention: str) -> _SharedLayout:
    import torch

    g = batch.group_size
    device = batch.prompt_ids.device
    prompt_positions = _prompt_positions(base, batch)  # (3, N, P), 0 on left padding
    lengths = batch.completion_attention.sum(1).tolist()
    rows, positions, blocks, predictors = [], [], [], []
    for i in range(batch.prompt_ids.shape[0]):
        keep = batch.prompt_mask[i].bool()
        prompt = batch.prompt_ids[i][keep]
        pos = prompt_positions[:, i][:, keep]
        p = prompt.shape[0]
        next_pos = int(pos[:, -1].max()) + 1  # text after the prompt continues from its last position
        pieces, piece_pos, block = [prompt], [pos], [torch.zeros(p, dtype=torch.long, device=device)]
        start = p
        for j in range(g):
            r = i * g + j
            n = lengths[r]
            pieces.append(batch.completion_ids[r, :n])
            piece_pos.append((next_pos + torch.arange(n, device=device)).expand(3, n))
            block.append(torch.full((n,), j + 1, dtype=torch.long, device=device))
            # Token 0 is predicted by the prompt's last position, token t by the block's t-1.
            pred = torch.arange(start - 1, start - 1 + batch.completion_ids.shape[1], device=device)
            pred[0] = p - 1
            predictors.append(pred.clamp(max=max(start + n - 1, p - 1)))  # padding: any position of the row
            start += n
        rows.append(torch.cat(pieces))
        positions.append(torch.cat(piece_pos, dim=1))
        blocks.append(torch.cat(block))
    width = max(r.shape[0] for r in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), batch.pad_id, dtype=torch.long, device=device)
    position_ids = torch.zeros((3, n_rows, width), dtype=torch.long, device=device)
    block_ids = torch.full((n_rows, width), -1, dtype=torch.long, device=device)  # -1: padding
    for i, (ids, pos, blk) in enumerate(zip(rows, positions, blocks)):
        input_ids[i, : ids.shape[0]] = ids
        position_ids[:, i, : ids.shape[0]] = pos
        block_ids[i, : ids.shape[0]] = blk
    return _SharedLayout(
        input_ids=input_ids,
        position_ids=position_ids,
        mask=_block_mask(block_ids, base.dtype, attention),
        row_of_completion=torch.arange(n_rows, device=device).repeat_interleave(g),
        predictor=torch.stack(predictors),
    )


def _prompt_positions(base, batch: GroupBatch):
    """M-RoPE positions of the (left-padded) prompts, as the model computes them."""
    import torch

    if batch.image_grid_thw is None:
        positions = (batch.prompt_mask.cumsum(-1) - 1).clamp(min=0)
        return positions.unsqueeze(0).expand(3, -1, -1)
    positions, _ = base.model.get_rope_index(
        batch.prompt_ids,
        mm_token_type_ids=batch.prompt_mm_types,
        image_grid_thw=batch.image_grid_thw,
        attention_mask=batch.prompt_mask,
    )
    return positions.to(torch.long)


def _block_mask(block_ids, dtype, attention: str):
    """``(N, 1, L, L)`` mask: query q sees key k <= q when k is prompt or in q's own block.

    In the form ``attention`` takes it (``vlmtune.forward.inner.attention_mask``): booleans for sdpa,
    an additive float mask for eager.
    """
    import torch

    length = block_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=block_ids.device).tril()
    key, query = block_ids.unsqueeze(1), block_ids.unsqueeze(2)
    allowed = causal & ((key == 0) | (key == query))
    return attention_mask(allowed.unsqueeze(1), attention, dtype)
