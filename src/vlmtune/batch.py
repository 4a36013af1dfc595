"""Preference records become model inputs: chat template, processor, labels on the answer only.

Each sequence is ``prompt`` (the model's own chat template with the generation prompt, image
placeholders expanded by the processor) followed by the assistant's answer as the same template
renders it, up to and including the end-of-turn token ``<|im_end|>``. The newline the template
writes after ``<|im_end|>`` is left out: it is not something the model chooses.

Labels are ``-100`` on the prompt and padding and equal to the input ids on the answer tokens and
the closing ``<|im_end|>``: DPO's log-probability of an answer includes the decision to stop there,
as in TRL (which appends EOS to the completion).

Truncation never touches the prompt: the answer's end is cut to fit ``max_length``. A prompt that
leaves no room for an answer is refused, and the message says when the cut would have fallen
inside an image's tokens (the crash other trainers give as a shape mismatch deep in the model).
Sequences are padded on the right, for training.

``EncodedRecordCache`` keeps what the processor and tokenizer make of each record (prompt ids with
the image tokens expanded, pixel values, answer ids), so a record seen again (the next epoch) is
not decoded, resized or templated again; ``encode_pairs`` and ``encode_sft`` read from one when
given it and return exactly the batch they return without it.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError

IGNORE_INDEX = -100


@dataclass
class PairBatch:
    """The chosen and rejected sides of a batch of pairs; each side is a dict of model inputs.

    Both sides share the images (the same ``pixel_values`` tensor). ``prompt_lengths[i]`` is the
    number of prompt tokens of pair ``i``, the same on both sides.
    """

    chosen: dict
    rejected: dict
    ids: list[str] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)

    def to(self, device) -> PairBatch:
        """Both sides on ``device``; the shared image tensors are moved once and stay shared."""
        moved: dict[int, object] = {}

        def move(inputs: dict) -> dict:
            return {k: moved.setdefault(id(v), v.to(device)) for k, v in inputs.items()}

        return PairBatch(move(self.chosen), move(self.rejected), self.ids, self.prompt_lengths)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class EncodedPrompt:
    """One record's prompt, encoded once and shared by its answers."""

    record_id: str
    prompt_ids: list[int]
    mm_token_type_ids: list[int]
    vision: dict  # pixel_values and image_grid_thw of this record's images (empty without images)


@dataclass
class RecordEncoding:
    """What the processor and tokenizer make of one record: its prompt and both answers' ids."""

    prompt: EncodedPrompt
    chosen: list[int]
    rejected: list[int]

    @property
    def n_bytes(self) -> int:
        """Bytes of its image tensors (the bulk of it)."""
        return sum(t.numel() * t.element_size() for t in self.prompt.vision.values())


class EncodedRecordCache:
    """LRU of per-record encodings, at most ``max_bytes`` of pixel values (default 512 MiB).

    Keyed by the record's content, ``max_length`` and each image's path, modification time and
    size, so an edited image file is encoded again.
    """

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = max_bytes
        self.n_bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, RecordEncoding] = OrderedDict()

    def get(self, record: PreferenceRecord, processor, max_length: int) -> RecordEncoding:
        key = _record_key(record, max_length)
        item = self._items.get(key)
        if item is not None:
            self.hits += 1
            self._items.move_to_end(key)
            return item
        self.misses += 1
        item = encode_record(record, processor, max_length)
        self._items[key] = item
        self.n_bytes += item.n_bytes
        while self.n_bytes > self.max_bytes and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self.n_bytes -= dropped.n_bytes
        return item


def encode_pairs(
    records: Sequence[PreferenceRecord], processor, max_length: int, cache: EncodedRecordCache | None = None
) -> PairBatch:
    """Encode records into a chosen side and a rejected side, labels on the answers only."""
    return collate_pairs(records, _encodings(records, processor, max_length, cache), processor, max_length)


def encode_sft(
    records: Sequence[PreferenceRecord], processor, max_length: int, cache: EncodedRecordCache | None = None
) -> dict:
    """Encode records for supervised fine-tuning on the chosen answers, labels on the answers only."""
    return collate_sft(_encodings(records, processor, max_length, cache), processor, max_length)


def _encodings(records, processor, max_length: int, cache: EncodedRecordCache | None) -> list[RecordEncoding]:
    """Each record's encoding, from ``cache`` when given (encoded and kept there on a miss)."""
    check_not_empty(records)
    if cache is None:
        return [encode_record(r, processor, max_length) for r in records]
    return [cache.get(r, processor, max_length) for r in records]


def _record_key(record: PreferenceRecord, max_length: int) -> str:
    images = []
    for path in record.images:
        try:
            st = os.stat(path)
        except OSError:  # load_images reports a missing image with the record's id
            images.append([path, None, None])
            continue
        images.append([path, st.st_mtime_ns, st.st_size])
    content = [record.id, record.prompt, record.chosen, record.rejected, images, max_length]
    return json.dumps(content, sort_keys=True, default=str)


def encode_record(record: PreferenceRecord, processor, max_length: int) -> RecordEncoding:
    """One record through the processor (images, chat template) and the tokenizer (answers)."""
    return RecordEncoding(
        _encode_prompt(record, processor, max_length),
        _answer_ids(record, record.chosen, processor),
        _answer_ids(record, record.rejected, processor),
    )


def collate_pairs(records: Sequence[PreferenceRecord], encodings: Sequence[RecordEncoding], processor,
                  max_length: int) -> PairBatch:
    """The two-sided batch of ``records`` from their encodings (``encode_record``, or a cache of them)."""
    prompts = [e.prompt for e in encodings]
    vision = _vision(prompts)  # one tensor, shared by both sides
    return PairBatch(
        chosen={**_collate(prompts, [e.chosen for e in encodings], processor, max_length), **vision},
        rejected={**_collate(prompts, [e.rejected for e in encodings], processor, max_length), **vision},
        ids=[r.id for r in records],
        prompt_lengths=[len(p.prompt_ids) for p in prompts],
    )


def collate_sft(encodings: Sequence[RecordEncoding], processor, max_length: int) -> dict:
    """The supervised batch (chosen answers) from encodings."""
    prompts = [e.prompt for e in encodings]
    return {**_collate(prompts, [e.chosen for e in encodings], processor, max_length), **_vision(prompts)}


def prompt_text(record: PreferenceRecord, processor) -> str:
    """The prompt as the model's chat template renders it, ending with the assistant's turn opening."""
    return processor.apply_chat_template(record.prompt, add_generation_prompt=True, tokenize=False)


def answer_text(record: PreferenceRecord, answer: str, processor) -> str:
    """The answer as the chat template renders it after the prompt: ``answer<|im_end|>``."""
    prompt = prompt_text(record, processor)
    turn = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    full = processor.apply_chat_template(record.prompt + [turn], tokenize=False)
    if not full.startswith(prompt):
        raise VlmtuneError(
            f"record {record.id}: the chat template renders the prompt differently with and without the "
            "answer, so the answer's tokens cannot be told apart; use a prefix-preserving chat template"
        )
    return full[len(prompt) :].rstrip("\n")


def load_images(record: PreferenceRecord) -> list:
    """Open a record's images with PIL, in RGB, checking they match the prompt's image slots."""
    if len(record.images) != record.image_slots():
        raise VlmtuneError(
            f"record {record.id}: {len(record.images)} image(s) but the prompt has {record.image_slots()} "
            'image slot(s) ({"type": "image"}); make them match'
        )
    return [open_image(path, f"record {record.id}") for path in record.images]


def open_image(image, where: str):
    """A PIL image in RGB from a path, or a PIL image converted; ``where`` (``"record r1"``, ``"item 3"``)
    begins the message of a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(Path(image)) as opened:
            return opened.convert("RGB")
    except FileNotFoundError as e:
        raise VlmtuneError(f"{where}: image {image} does not exist") from e
    except (UnidentifiedImageError, OSError) as e:
        raise VlmtuneError(f"{where}: cannot read image {image}: {e}") from e


def check_not_empty(records: Sequence[PreferenceRecord]) -> None:
    if not records:
        raise VlmtuneError("no records to encode: the batch is empty")


def _encode_prompt(record: PreferenceRecord, processor, max_length: int) -> EncodedPrompt:
    images = load_images(record)
    text = prompt_text(record, processor)
    try:
        encoded = processor(text=[text], images=images or None, return_tensors="pt")
    except (ValueError, RuntimeError) as e:  # e.g. smart_resize: "absolute aspect ratio must be smaller than 200"
        sizes = ", ".join(f"{path} ({im.width}x{im.height})" for path, im in zip(record.images, images))
        raise VlmtuneError(
            f"record {record.id}: the model's processor cannot encode it ({e}); images: {sizes or 'none'}. "
            "`vlmtune data check FILE` finds such images; fix the image or drop the record"
        ) from e
    prompt_ids = encoded["input_ids"][0].tolist()
    if "mm_token_type_ids" in encoded:
        mm_types = encoded["mm_token_type_ids"][0].tolist()
    else:
        mm_types = [0] * len(prompt_ids)
    _check_prompt_fits(record.id, prompt_ids, mm_types, max_length)
    vision = {k: encoded[k] for k in ("pixel_values", "image_grid_thw") if k in encoded}
    return EncodedPrompt(record.id, prompt_ids, mm_types, vision)


def _check_prompt_fits(record_id: str, prompt_ids: list[int], mm_types: list[int], max_length: int) -> None:
    """Refuse a prompt that leaves no room for at least one answer token."""
    if len(prompt_ids) < max_length:
        return
    n_image_tokens = sum(1 for t in mm_types if t != 0)
    hint = "raise max_length, or lower the processor's max_pixels to give each image fewer tokens"
    if any(t != 0 for t in mm_types[max_length:]):
        raise VlmtuneError(
            f"record {record_id}: max_length {max_length} would cut the prompt inside an image's tokens "
            f"(prompt {len(prompt_ids)} tokens, {n_image_tokens} of them image tokens); {hint}"
        )
    raise VlmtuneError(
        f"record {record_id}: the prompt alone is {len(prompt_ids)} tokens ({n_image_tokens} image tokens), "
        f"leaving no room for the answer within max_length {max_length}; {hint}"
    )


def _answer_ids(record: PreferenceRecord, answer: str, processor) -> list[int]:
    return processor.tokenizer.encode(answer_text(record, answer, processor), add_special_tokens=False)


def _collate(prompts: list[EncodedPrompt], answers: list[list[int]], processor, max_length: int) -> dict:
    """Join prompt and answer ids, cut answers to ``max_length``, pad on the right, stack the text inputs."""
    import torch

    pad_id = processor.tokenizer.pad_token_id
    rows = []
    for prompt, answer in zip(prompts, answers):
        answer = answer[: max_length - len(prompt.prompt_ids)]
        ids = prompt.prompt_ids + answer
        labels = [IGNORE_INDEX] * len(prompt.prompt_ids) + answer
        mm_types = prompt.mm_token_type_ids + [0] * len(answer)
        rows.append((ids, labels, mm_types))
    width = max(len(ids) for ids, _, _ in rows)
    batch = {
        "input_ids": torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in rows]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab, _ in rows]),
        "mm_token_type_ids": torch.tensor([mm + [0] * (width - len(mm)) for _, _, mm in rows]),
    }
    return batch


def _vision(prompts: list[EncodedPrompt]) -> dict:
    """The batch's image patches and grids, concatenated in record order (the model's layout)."""
    import torch

    with_images = [p.vision for p in prompts if p.vision]
    if not with_images:
        return {}
    return {
        "pixel_values": torch.cat([v["pixel_values"] for v in with_images]),
        "image_grid_thw": torch.cat([v["image_grid_thw"] for v in with_images]),
    }
