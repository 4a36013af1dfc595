"""Images done once: processor outputs kept in memory, vision-tower outputs kept on disk.

Two caches, both exact:

- ``EncodedRecordCache``: an LRU (bounded in bytes) of what the processor and tokenizer make of a
  record (prompt ids with the image tokens expanded, pixel values, answer ids), keyed by the
  record's content and each image's path, modification time and size. A record seen again (the
  next epoch) is not decoded, resized or templated again. ``encode_pairs_cached`` gives exactly
  ``vlmrl.batch.encode_pairs``'s batch.
- ``VisionFeatureCache``: the vision tower's (and merger's) output per image on disk, as
  safetensors files written atomically. Valid only while the tower is frozen (``vision_is_frozen``):
  the key is a fingerprint of the tower's weights, the image file's bytes and the image processor's
  settings, so any change to one of them gives new keys (old files are simply not read).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from vlmrl.batch import PairBatch, RecordEncoding, check_not_empty, collate_pairs, collate_sft, encode_record
from vlmrl.data.records import PreferenceRecord
from vlmrl.errors import VlmrlError
from vlmrl.forward.cache_files import save_safetensors_atomic, weights_fingerprint
from vlmrl.forward.plain import ForwardStats
from vlmrl.forward.inner import unwrap
from vlmrl.forward.shared_prefix import PackedPairs

if TYPE_CHECKING:
    import torch


# --- processor outputs, in memory -------------------------------------------------------------


class EncodedRecordCache:
    """LRU of per-record encodings, at most ``max_bytes`` of pixel values (default 512 MiB)."""

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


def encode_pairs_cached(
    records: Sequence[PreferenceRecord], processor, max_length: int, cache: EncodedRecordCache
) -> PairBatch:
    """``vlmrl.batch.encode_pairs``, reading each record's processor output from ``cache``."""
    check_not_empty(records)
    return collate_pairs(records, [cache.get(r, processor, max_length) for r in records], processor, max_length)


def encode_sft_cached(
    records: Sequence[PreferenceRecord], processor, max_length: int, cache: EncodedRecordCache
) -> dict:
    """``vlmrl.batch.encode_sft``, reading each record's processor output from ``cache``."""
    check_not_empty(records)
    return collate_sft([cache.get(r, processor, max_length) for r in records], processor, max_length)


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


# --- vision features, shared and on disk ------------------------------------------------------


def vision_is_frozen(model) -> bool:
    """True when the policy's vision tower and merger give the same output as the reference's.

    That holds when nothing in the tower is trained: no parameter requires grad and no LoRA layer
    sits in it (an adapter switched off by ``reference_mode`` would change its output).
    """
    visual = unwrap(model).model.visual
    if any(p.requires_grad for p in visual.parameters()):
        return False
    return not any("lora_" in name or "modules_to_save" in name for name, _ in visual.named_modules())


def split_features(features) -> list[dict[str, torch.Tensor]]:
    """The vision tower's batch output as one dict per image: ``embeds`` and ``deepstack.{i}``."""
    per_image = [{"embeds": e} for e in features.pooler_output]
    for layer, tensors in enumerate(getattr(features, "deepstack_features", None) or []):
        for item, tensor in zip(per_image, tensors):
            item[f"deepstack.{layer}"] = tensor
    return per_image


def join_features(per_image: list[dict[str, torch.Tensor]]):
    """Per-image dicts back into the object transformers takes as ``mm_encoder_outputs["image"]``."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    embeds = tuple(item["embeds"] for item in per_image)
    n_layers = sum(1 for name in per_image[0] if name.startswith("deepstack."))
    if n_layers == 0:
        return BaseModelOutputWithPooling(pooler_output=embeds)
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    deepstack = [tuple(item[f"deepstack.{i}"] for item in per_image) for i in range(n_layers)]
    return BaseModelOutputWithDeepstackFeatures(pooler_output=embeds, deepstack_features=deepstack)


class VisionFeatureCache:
    """Vision-tower outputs per image under ``directory``; only for a frozen tower.

    ``features(model, packed)`` returns the batch's features, running the tower (under no_grad)
    only on the images not stored yet. ``hits``/``misses`` count images.
    """

    def __init__(self, directory: str | Path, model, processor):
        if not vision_is_frozen(model):
            raise VlmrlError(
                "data.cache_vision needs a frozen vision tower and merger "
                "(lora.vision=frozen, lora.merger=false): a trained tower's outputs change every step"
            )
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.settings = _settings_hash(model, processor)
        self.hits = 0
        self.misses = 0
        self._file_hashes: dict[tuple, str] = {}

    def features(self, model, packed: PackedPairs, stats: ForwardStats | None = None):
        import torch

        if packed.pixel_values is None:
            return None
        grids = packed.image_grid_thw
        if len(packed.image_paths) != len(grids):
            raise VlmrlError("the vision cache needs the batch's image paths (pack_pairs(..., image_paths=...))")
        paths = [self.directory / f"{self._key(p)}.safetensors" for p in packed.image_paths]
        stored = [_load(path) for path in paths]
        missing = [i for i, item in enumerate(stored) if item is None]
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        if missing:
            pixels = torch.split(packed.pixel_values, grids.prod(-1).tolist())
            with torch.no_grad():
                inner = unwrap(model).model
                fresh = inner.get_image_features(
                    torch.cat([pixels[i] for i in missing]), grids[missing], return_dict=True
                )
            if stats is not None:
                stats.images_encoded += len(missing)
            for i, item in zip(missing, split_features(fresh)):
                stored[i] = item
                save_safetensors_atomic(paths[i], item)
        device = packed.input_ids.device
        return join_features([{k: v.to(device) for k, v in item.items()} for item in stored])

    def _key(self, image_path: str) -> str:
        st = os.stat(image_path)
        stamp = (image_path, st.st_mtime_ns, st.st_size)
        if stamp not in self._file_hashes:
            self._file_hashes[stamp] = hashlib.sha256(Path(image_path).read_bytes()).hexdigest()
        return hashlib.sha256(f"{self.settings}:{self._file_hashes[stamp]}".encode()).hexdigest()


def processor_settings(processor) -> str:
    """The image processor's settings as canonical JSON (sizes, pixels bounds, normalisation)."""
    return json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str)


def _settings_hash(model, processor) -> str:
    visual = unwrap(model).model.visual
    text = f"{weights_fingerprint(visual.state_dict())}:{processor_settings(processor)}"
    return hashlib.sha256(text.encode()).hexdigest()


def _load(path: Path) -> dict | None:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    return load_file(path)
