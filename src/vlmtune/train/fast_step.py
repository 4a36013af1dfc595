"""The preference step on the fast pair forward: images once, shared prompt, cached reference.

``FastPreferenceStep`` has the two methods of ``PreferenceStep`` (``encode(records)`` and
``loss_and_metrics(batch, model=None)``) and gives the same losses, metrics and gradients (fp32:
within 1e-5, ``tests/test_fast_step.py``); the plain forward stays its fallback.
Per pair and step, against the plain step's 4 vision passes and 4 prompt passes:

- the vision tower runs once per image (shared by policy and reference when the tower is frozen),
  or never (``cache_vision``: read from disk after the first epoch);
- the prompt goes through the language model once for both answers (``vlmtune.forward.shared_prefix``);
- the reference costs nothing per step with ``reference_logps`` from ``precompute_reference``;
- each record's processor output is kept in memory (``vlmtune.batch.EncodedRecordCache``).

Where the fast forward cannot run a model exactly (a family other than Qwen2-VL, Qwen2.5-VL and
Qwen3-VL, an attention implementation without 4D masks such as flash-attention) the step logs a
warning (once per step object and reason) and runs the plain path. Under DistributedDataParallel
the packed forward goes through the wrapper, so gradients are reduced as usual
(``tests/test_multiprocess.py``).

Config keys (``vlmtune.config``; ``train.step_factory.make_step`` builds this step from them):

- ``train.fast_path`` (default true) — this step instead of ``PreferenceStep`` (exact, so on);
- ``data.cache_vision`` (default false) — vision outputs on disk, in ``<output_dir>/../vision-cache``
  (bit-identical to recomputing them); only for a frozen tower (``lora.vision=frozen``,
  ``lora.merger=false``), which the config validator enforces;
- ``train.precompute_ref`` (default false) — reference log-probs computed before training into
  ``<output_dir>/../ref-cache`` and reused across epochs and runs (needs unique record ids; the
  main process computes it first, the others read its file).

Eval records not in ``train_records`` are scored with the live reference (lookup falls back
when an id is missing from ``reference_logps``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vlmtune.batch import EncodedRecordCache, encode_pairs
from vlmtune.config import LossConfig
from vlmtune.errors import VlmtuneError
from vlmtune.forward.plain import ForwardStats, PairLogps, plain_pair_logps
from vlmtune.forward.ref_cache import ReferenceLogps
from vlmtune.forward.inner import unsupported_reason
from vlmtune.forward.shared_prefix import PackedPairs, encode_images, pack_pairs, packed_pair_logps, rope_positions
from vlmtune.forward.vision_cache import VisionFeatureCache, vision_is_frozen
from vlmtune.models.load import reference_forward
from vlmtune.train.steps import PreferenceStep, pair_loss

log = logging.getLogger(__name__)


class FastPreferenceStep(PreferenceStep):
    """A DPO-family step on packed pairs; ``PreferenceStep``'s constructor plus the caches.

    ``fast_path=False`` keeps the plain two-sided forward but still uses ``reference_logps`` and the
    in-memory encoding cache; the vision cache needs the fast path (it is ignored, with a warning).
    """

    def __init__(
        self,
        model,
        processor,
        max_length: int,
        loss: LossConfig,
        reference=None,
        unwrapped=None,
        *,
        fast_path: bool = True,
        vision_cache_dir: str | Path | None = None,
        reference_logps: ReferenceLogps | None = None,
        encode_cache: EncodedRecordCache | None = None,
    ):
        super().__init__(model, processor, max_length, loss, reference, unwrapped)
        self._warned: set[str] = set()
        self.reference_logps = reference_logps
        self.encode_cache = encode_cache or EncodedRecordCache()
        self.stats = ForwardStats()
        self.fast = fast_path and self._fast_supported(model, reference)
        # The policy's and the reference's vision outputs are the same function when nothing in the
        # tower trains and the reference is the policy with its adapter off.
        self.share_vision = self.fast and reference is None and vision_is_frozen(self.unwrapped)
        self.vision_cache = None
        if vision_cache_dir is not None and self.share_vision:
            self.vision_cache = VisionFeatureCache(vision_cache_dir, self.unwrapped, processor)
        elif vision_cache_dir is not None and not self.fast:
            self._warn_once("the vision cache needs the fast pair forward; images are encoded every step")
        elif vision_cache_dir is not None:
            raise VlmtuneError(
                "data.cache_vision needs a frozen vision tower and merger and the reference to be the policy "
                "with its adapter off (lora.vision=frozen, lora.merger=false, lora.enabled=true)"
            )

    def encode(self, records, device="cpu"):
        pairs = encode_pairs(records, self.processor, self.max_length, self.encode_cache)
        if not self.fast:
            return pairs.to(device)
        images = [path for record in records for path in record.images]
        packed = pack_pairs(pairs, self.processor.tokenizer.pad_token_id, image_paths=images)
        packed.position_ids = rope_positions(self.unwrapped, packed)
        return packed.to(device)

    def loss_and_metrics(self, batch, model=None) -> tuple[torch.Tensor, dict[str, float]]:
        model = model or self.model
        if isinstance(batch, PackedPairs) and model is not self.model and not self._fast_supported(model):
            batch = batch.pairs  # a model the fast forward cannot run: the plain forward
        features = None
        if isinstance(batch, PackedPairs):
            features = self._frozen_features(batch)
            policy = packed_pair_logps(model, batch, features, self.stats)
        else:
            policy = plain_pair_logps(model, batch, self.stats)
        ref_chosen = ref_rejected = None
        if self.needs_reference:
            ref = self._reference_logps(batch, features)
            ref_chosen, ref_rejected = ref.chosen, ref.rejected
        delta = self._bco_delta(policy, ref_chosen, ref_rejected, model)
        return pair_loss(self.loss, policy, ref_chosen, ref_rejected, delta)

    def _fast_supported(self, *models) -> bool:
        reasons = [unsupported_reason(m) for m in models if m is not None]
        reason = next((r for r in reasons if r is not None), None)
        if reason is not None:
            self._warn_once(f"fast pair forward off, using the plain one: {reason}")
        return reason is None

    def _frozen_features(self, batch: PackedPairs):
        """Vision outputs computed once without gradients, for both policy and reference; or None."""
        if not self.share_vision or batch.pixel_values is None:
            return None
        if self.vision_cache is not None:
            return self.vision_cache.features(self.unwrapped, batch, self.stats)
        with torch.no_grad():
            return encode_images(self.unwrapped, batch, self.stats)

    def _reference_logps(self, batch, features=None) -> PairLogps:
        cached = self.reference_logps
        if cached is not None and all(rid in cached for rid in batch.ids):
            device = batch.input_ids.device if isinstance(batch, PackedPairs) else batch.chosen["input_ids"].device
            return cached.lookup(batch.ids, device=device)
        with reference_forward(self.reference, self.unwrapped) as model:
            if isinstance(batch, PackedPairs):
                return packed_pair_logps(model, batch, features if self.share_vision else None, self.stats)
            return plain_pair_logps(model, batch, self.stats)

    def _warn_once(self, message: str) -> None:
        """Log ``message`` the first time this step meets it (the check runs again for each eval model)."""
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message)
