"""The fast pair forward: one sequence per pair, ``prompt | chosen | rejected``, images encoded once.

The plain forward (``vlmtune.forward.plain``) runs the chosen and the rejected sequence separately,
so the prompt (mostly image tokens) goes through the language model twice and the images through
the vision encoder twice. Here each pair is one row:

    [ prompt (P) + the answers' common first tokens (M) | chosen (C - M) | rejected (R - M) | padding ]

and a 4D attention mask makes the row compute exactly what the two separate rows compute:

- shared and chosen tokens attend causally to the shared and chosen tokens before them;
- rejected tokens attend to the shared part and causally to the rejected tokens, never to chosen ones;
- padding attends only to itself (a row with nothing to attend to would give NaN under sdpa).

The answers' common first tokens (``M``: "There are 2 cars, " when only a later count differs)
have the same hidden states in both answers (same tokens, same positions, causal attention), so
they run once, as part of the shared segment; their log-probabilities are gathered for both sides,
and their gradients add up as they would from two copies. On counting answers this is ~6% of the
tokens of a pair.

Positions are the ones each side would get on its own (M-RoPE, three rows for Qwen-VL): the model's
``get_rope_index`` is run on ``prompt + chosen`` and on ``prompt + rejected`` and the rest of the
rejected answer's positions is copied after the chosen ones, so both continue from the shared part.
``position_ids`` of shape ``(3, B, L)`` are passed explicitly, which keeps transformers off its
packed-sequence path (that one takes a fourth row of text positions).

The first token of each answer is predicted by the last prompt position, shared by both answers;
the first token after the common part by the last shared position, for both answers. Logits are
computed only at the positions that predict answer tokens: the language model runs to its hidden
states, those rows are gathered and only they go through ``lm_head``; with a vocabulary of 150k
this is most of the memory of the plain path.
The last decoder layer itself runs only at those positions
(``vlmtune.forward.last_layer``): its keys and values are computed everywhere, its queries, MLP and
norms only where they are read.

Images: the vision tower runs once per image per call (``encode_images``), or not at all when the
caller passes features computed earlier (shared between policy and reference, or read from the
disk cache in ``vlmtune.forward.vision_cache``); they reach the model through transformers'
``mm_encoder_outputs``. Qwen2-VL's and Qwen2.5-VL's vision attention is per image, and Qwen3-VL's
deepstack features are placed by the image-token mask, so all of this is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

from vlmtune.batch import IGNORE_INDEX, PairBatch
from vlmtune.errors import VlmtuneError
from vlmtune.forward import last_layer
from vlmtune.forward.inner import attention_implementation, attention_mask, unsupported_reason, unwrap
from vlmtune.forward.plain import ForwardStats, PairLogps

if TYPE_CHECKING:
    import torch

PAD, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3


@dataclass
class PackedPairs:
    """A batch of pairs packed as ``prompt | chosen | rejected`` rows, plus what the forward needs.

    ``segments`` marks each token (``PAD``, ``PROMPT``, ``CHOSEN``, ``REJECTED``); ``PROMPT`` covers
    the shared part, the prompt and the answers' common first tokens (``shared_lengths`` per row). For each side,
    ``*_source`` are flat indices into ``B * L`` of the positions whose hidden state predicts an
    answer token, ``*_targets`` those tokens and ``*_rows`` the pair they belong to. ``pairs`` is
    the plain two-sided batch it was made from (kept for the rope index and for the plain path).
    """

    input_ids: torch.Tensor
    segments: torch.Tensor
    chosen_source: torch.Tensor
    chosen_targets: torch.Tensor
    chosen_rows: torch.Tensor
    rejected_source: torch.Tensor
    rejected_targets: torch.Tensor
    rejected_rows: torch.Tensor
    pairs: PairBatch
    shared_lengths: list[int] = field(default_factory=list)  # per row: prompt + the answers' common first tokens
    position_ids: torch.Tensor | None = None
    images_per_pair: list[int] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)  # in pixel_values order; for the vision cache

    @property
    def ids(self) -> list[str]:
        return self.pairs.ids

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def pixel_values(self):
        return self.pairs.chosen.get("pixel_values")

    @property
    def image_grid_thw(self):
        return self.pairs.chosen.get("image_grid_thw")

    def to(self, device) -> PackedPairs:
        import torch

        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {name: t.to(device) for name, t in tensors.items() if isinstance(t, torch.Tensor)}
        return replace(self, pairs=self.pairs.to(device), **moved)


def pack_pairs(pairs: PairBatch, pad_id: int, image_paths: list[str] | None = None) -> PackedPairs:
    """Pack a two-sided batch (from ``vlmtune.batch.encode_pairs``) into one row per pair.

    Uses exactly the tokens (and truncation) of ``pairs``, so the packed forward and the plain
    forward score the same answers.
    """
    import torch

    rows, segments, shared_lengths = [], [], []
    sources, targets, pair_rows = ({CHOSEN: [], REJECTED: []} for _ in range(3))
    packed = []
    for i, prompt_len in enumerate(pairs.prompt_lengths):
        prompt = pairs.chosen["input_ids"][i, :prompt_len].tolist()
        answers = {side: _answer(pairs.chosen if side == CHOSEN else pairs.rejected, i, prompt_len)
                   for side in (CHOSEN, REJECTED)}
        packed.append((answers, *_row(prompt, answers[CHOSEN], answers[REJECTED])))
    width = max(len(ids) for _, ids, _, _, _ in packed)
    for i, (answers, ids, marks, shared, positions) in enumerate(packed):
        pad = width - len(ids)
        rows.append(ids + [pad_id] * pad)
        segments.append(marks + [PAD] * pad)
        shared_lengths.append(shared)
        for side in (CHOSEN, REJECTED):
            sources[side] += [i * width + position for position in positions[side]]
            targets[side] += answers[side]
            pair_rows[side] += [i] * len(answers[side])
    long = dict(dtype=torch.long)
    return PackedPairs(
        input_ids=torch.tensor(rows, **long),
        segments=torch.tensor(segments, dtype=torch.int8),
        chosen_source=torch.tensor(sources[CHOSEN], **long),
        chosen_targets=torch.tensor(targets[CHOSEN], **long),
        chosen_rows=torch.tensor(pair_rows[CHOSEN], **long),
        rejected_source=torch.tensor(sources[REJECTED], **long),
        rejected_targets=torch.tensor(targets[REJECTED], **long),
        rejected_rows=torch.tensor(pair_rows[REJECTED], **long),
        pairs=pairs,
        shared_lengths=shared_lengths,
        images_per_pair=_images_per_pair(pairs),
        image_paths=list(image_paths or []),
    )


def _answer(side: dict, row: int, prompt_len: int) -> list[int]:
    labels = side["labels"][row]
    answer = labels[prompt_len:]
    return answer[answer != IGNORE_INDEX].tolist()


def _row(prompt: list[int], chosen: list[int], rejected: list[int]):
    """One pair's tokens, their segment marks, the shared length, and per side the positions that predict its answer.

    The answers' common first tokens join the prompt. An answer's last token predicts nothing and no
    other token sees it (rejected tokens never see chosen ones), so it is left out of its own segment.
    """
    p, m = len(prompt), _common_prefix(chosen, rejected)
    own = {CHOSEN: chosen[m:-1], REJECTED: rejected[m:-1]}
    ids = prompt + chosen[:m] + own[CHOSEN] + own[REJECTED]
    marks = [PROMPT] * (p + m) + [CHOSEN] * len(own[CHOSEN]) + [REJECTED] * len(own[REJECTED])
    starts = {CHOSEN: p + m, REJECTED: p + m + len(own[CHOSEN])}
    answers = {CHOSEN: chosen, REJECTED: rejected}
    # Token k is predicted by the position of token k - 1 (the prompt's last for k = 0): a shared
    # one for k <= m, else one of the side's own segment.
    positions = {
        side: [p + k - 1 if k <= m else starts[side] + k - 1 - m for k in range(len(answer))]
        for side, answer in answers.items()
    }
    return ids, marks, p + m, positions


def _common_prefix(chosen: list[int], rejected: list[int]) -> int:
    """How many first tokens the two answers have in common."""
    m = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        m += 1
    return m


def _images_per_pair(pairs: PairBatch) -> list[int]:
    if "mm_token_type_ids" not in pairs.chosen or "image_grid_thw" not in pairs.chosen:
        return [0] * len(pairs)
    # An image is a run of image tokens preceded by a non-image token.
    types = pairs.chosen["mm_token_type_ids"]
    starts = (types[:, 1:] != 0) & (types[:, :-1] == 0)
    return (starts.sum(dim=1) + (types[:, 0] != 0)).tolist()


def rope_positions(model, packed: PackedPairs):
    """M-RoPE position ids ``(3, B, L)`` of the packed rows, each side as the model numbers it alone."""
    import torch

    inner = unwrap(model).model
    pairs = packed.pairs
    sides = []
    for side in (pairs.chosen, pairs.rejected):
        kwargs = dict(attention_mask=side["attention_mask"])
        if "image_grid_thw" in side:
            kwargs["image_grid_thw"] = side["image_grid_thw"]
        types = side["mm_token_type_ids"]
        positions, _ = inner.get_rope_index(side["input_ids"], mm_token_type_ids=types, **kwargs)
        sides.append(positions)
    chosen_pos, rejected_pos = sides
    batch, width = packed.input_ids.shape
    out = torch.zeros(3, batch, width, dtype=torch.long, device=packed.input_ids.device)
    for i, s in enumerate(packed.shared_lengths):
        c = int((packed.segments[i] == CHOSEN).sum())
        r = int((packed.segments[i] == REJECTED).sum())
        out[:, i, : s + c] = chosen_pos[:, i, : s + c]
        out[:, i, s + c : s + c + r] = rejected_pos[:, i, s : s + r]
    return out


def attention_mask_4d(segments, attention: str, dtype):
    """The ``(B, 1, L, L)`` mask of the packed rows: bool (True = attend) for sdpa, additive for eager."""
    import torch

    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    query = segments.unsqueeze(2)
    key = segments.unsqueeze(1)
    allowed = causal & (key != PAD) & (query != PAD)
    allowed &= ~((query == REJECTED) & (key == CHOSEN))
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device) & (query == PAD)
    return attention_mask(allowed.unsqueeze(1), attention, dtype)


def encode_images(model, packed: PackedPairs, stats: ForwardStats | None = None):
    """Run the vision tower once over the batch's images; gradients flow if the context allows."""
    if packed.pixel_values is None:
        return None
    inner = unwrap(model).model
    if stats is not None:
        stats.images_encoded += len(packed.image_grid_thw)
    return inner.get_image_features(packed.pixel_values, packed.image_grid_thw, return_dict=True)


def packed_pair_logps(model, packed: PackedPairs, image_features=None, stats: ForwardStats | None = None) -> PairLogps:
    """Chosen and rejected answers' summed log-probabilities from one packed forward pass.

    ``image_features``: the vision tower's output for the batch's images (``encode_images`` or the
    vision cache); None passes the pixels to the model, which runs the tower once per image inside
    this call's grad context. The call goes through ``model`` itself (peft, a DistributedDataParallel
    wrapper: their hooks run), asking it for logits only at the read positions (transformers'
    ``logits_to_keep`` as a boolean mask). ``packed.position_ids`` are used when set
    (``FastPreferenceStep.encode`` sets them once for policy and reference), else computed for this
    call; ``packed`` itself is left unchanged.
    """
    import torch

    reason = unsupported_reason(model)
    if reason is not None:
        raise VlmtuneError(f"the fast pair forward cannot run this model: {reason}; use the plain forward")
    inner = unwrap(model).model
    positions = packed.position_ids if packed.position_ids is not None else rope_positions(model, packed)
    embed_dtype = inner.get_input_embeddings().weight.dtype
    inputs = dict(
        input_ids=packed.input_ids,
        attention_mask=attention_mask_4d(packed.segments, attention_implementation(model), embed_dtype),
        position_ids=positions,
        use_cache=False,
    )
    if image_features is not None:
        inputs["mm_encoder_outputs"] = {"image": image_features}
    elif packed.pixel_values is not None:
        inputs.update(pixel_values=packed.pixel_values, image_grid_thw=packed.image_grid_thw)
        if stats is not None:
            stats.images_encoded += len(packed.image_grid_thw)
    n_chosen = len(packed.chosen_source)
    source = torch.cat([packed.chosen_source, packed.rejected_source])
    rows = torch.cat([packed.chosen_rows, packed.rejected_rows])
    index, window_source = read_positions(source, rows, packed.input_ids.shape)
    with last_layer.rows_only(inner, index) as cut:
        # The read positions of the hidden states the model returns: the windows, or the full rows.
        read = window_source if cut else source
        keep = torch.zeros(index.numel() if cut else packed.input_ids.numel(), dtype=torch.bool, device=source.device)
        keep[read] = True
        logits = model(**inputs, logits_to_keep=keep.view(len(packed), -1)).logits  # (read positions, V)
    _count(stats, packed)
    # Positions read by both answers (the prompt's last, the common first tokens) have one logits row.
    row_of = keep.cumsum(0) - 1
    targets = torch.cat([packed.chosen_targets, packed.rejected_targets])
    token_logps = torch.log_softmax(logits[row_of[read]].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    batch = len(packed)
    zeros = torch.zeros(batch, dtype=torch.float32, device=source.device)
    chosen = zeros.index_add(0, packed.chosen_rows, token_logps[:n_chosen])
    rejected = zeros.index_add(0, packed.rejected_rows, token_logps[n_chosen:])
    return PairLogps(chosen, rejected, _counts(packed.chosen_rows, batch), _counts(packed.rejected_rows, batch))


def read_positions(source, rows, shape):
    """The window of positions each row's answers are read from, and the sources re-indexed into it.

    ``source``: flat indices into ``B * L`` of the positions that predict answer tokens, ``rows``
    their batch rows. Returns ``index`` ``(B, Q)``: row ``b``'s positions ``start_b .. start_b + Q - 1``
    (from its first read position; past the row's end clamped to its last position, read by no one),
    and the flat indices of ``source`` into ``B * Q``.
    """
    import torch

    batch, width = shape
    positions = source % width
    start = torch.full((batch,), width - 1, dtype=torch.long, device=source.device)
    start = start.scatter_reduce(0, rows, positions, reduce="amin")
    offset = positions - start[rows]
    span = int(offset.max()) + 1 if len(offset) else 1
    index = (start.unsqueeze(1) + torch.arange(span, device=source.device)).clamp(max=width - 1)
    return index, rows * span + offset


def _counts(rows, batch: int):
    import torch

    return torch.bincount(rows, minlength=batch)


def _count(stats: ForwardStats | None, packed: PackedPairs) -> None:
    if stats is None:
        return
    stats.prompt_tokens += sum(packed.pairs.prompt_lengths)
    stats.answer_tokens += len(packed.chosen_targets) + len(packed.rejected_targets)
    stats.passes += 1
