"""The vision tower's outputs computed once per image: shared by policy and reference, kept on disk.

``VisionFeatureCache`` stores the vision tower's (and merger's) output per image on disk, as
safetensors files written atomically (``vlmtune.forward.cache_files``). It is exact and valid only
while the tower is frozen (``vision_is_frozen``): the key is a fingerprint of the tower's weights,
the image file's bytes and the image processor's settings, so any change to one of them gives new
keys (old files are simply not read). ``split_features`` / ``join_features`` convert between the
model's batch output and one dict of tensors per image.

(The processor-output cache, ``EncodedRecordCache``, lives beside the encoding in ``vlmtune.batch``.)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vlmtune.errors import VlmtuneError
from vlmtune.forward.cache_files import save_safetensors_atomic, weights_fingerprint
from vlmtune.forward.inner import unwrap
from vlmtune.forward.plain import ForwardStats
from vlmtune.forward.shared_prefix import PackedPairs

if TYPE_CHECKING:
    import torch


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
            raise VlmtuneError(
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
            raise VlmtuneError("the vision cache needs the batch's image paths (pack_pairs(..., image_paths=...))")
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
