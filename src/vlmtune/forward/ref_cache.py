"""Reference log-probabilities computed once, before training, and kept on disk.

The reference model never changes during DPO, so its log-probabilities of every pair can be
computed once (open-instruct and TRL's ``precompute_ref_log_probs`` do this for text; TRL refuses
it for vision data). ``precompute_reference`` runs the reference (the policy with its adapter
switched off, or a separate frozen model) over all records with the fast pair forward and stores
the result as one safetensors file named by two fingerprints:

- the model: sha256 of the reference weights (adapter layers left out, peft's wrapper names
  normalised, so the same base model with another LoRA config gives the same key);
- the data: sha256 of every record's id, prompt, answers and image bytes, ``max_length``, the
  image processor's settings and the chat template.

Any change to one of them gives a new file; a later run (or epoch) with the same model and data
reads the file instead of running the reference. ``ReferenceLogps.lookup(ids)`` returns a batch's
values in the batch's order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from vlmtune.batch import EncodedRecordCache, encode_pairs
from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError
from vlmtune.forward.cache_files import save_safetensors_atomic, weights_fingerprint
from vlmtune.forward.plain import ForwardStats, PairLogps, plain_pair_logps
from vlmtune.forward.inner import unsupported_reason, unwrap
from vlmtune.forward.shared_prefix import pack_pairs, packed_pair_logps
from vlmtune.forward.vision_cache import processor_settings

if TYPE_CHECKING:
    import torch

_COLUMNS = ("chosen", "rejected", "chosen_tokens", "rejected_tokens")


@dataclass
class ReferenceLogps:
    """Reference log-probs of every record, shape ``(N,)`` each, found by record id."""

    ids: list[str]
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def __post_init__(self):
        self._index = {rid: i for i, rid in enumerate(self.ids)}

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._index

    def lookup(self, ids: Sequence[str], device="cpu") -> PairLogps:
        """The values of ``ids``, in that order; a missing id is an error naming it."""
        import torch

        missing = [rid for rid in ids if rid not in self._index]
        if missing:
            raise VlmtuneError(
                f"record(s) {', '.join(missing[:5])} have no precomputed reference log-probs: the data changed "
                "since they were computed; run precompute_reference on the current data"
            )
        rows = torch.tensor([self._index[rid] for rid in ids])
        return PairLogps(*(getattr(self, name)[rows].to(device) for name in _COLUMNS))


def precompute_reference(
    model,
    processor,
    records: Sequence[PreferenceRecord],
    max_length: int,
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
    reference=None,
    encode_cache: EncodedRecordCache | None = None,
    stats: ForwardStats | None = None,
) -> ReferenceLogps:
    """Reference log-probs of ``records``, read from ``cache_dir`` when stored there, else computed.

    ``model`` is the LoRA policy (its adapter is switched off) unless ``reference``, a separate
    frozen model, is given. Record ids must be unique. ``encode_cache``, when given, supplies (and
    keeps) each record's processor output.
    """
    _check_unique(records)
    net = reference if reference is not None else model
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{cache_key(net, processor, records, max_length)}.safetensors"
        if path.is_file():
            return _read(path)
    separate = reference is not None
    result = _compute(net, processor, records, max_length, batch_size, encode_cache, separate, stats)
    if path is not None:
        _write(path, result)
    return result


def cache_key(model, processor, records: Sequence[PreferenceRecord], max_length: int) -> str:
    """``<model fingerprint>-<data fingerprint>``, 16 hex digits each."""
    return f"{reference_fingerprint(model)[:16]}-{data_fingerprint(records, processor, max_length)[:16]}"


def reference_fingerprint(model) -> str:
    """sha256 of the reference weights: adapter parameters left out, wrapper names normalised."""
    return weights_fingerprint(_reference_state(model))


def data_fingerprint(records: Sequence[PreferenceRecord], processor, max_length: int) -> str:
    """sha256 of the records (ids, prompts, answers, image bytes) and the settings that encode them."""
    digest = hashlib.sha256()
    digest.update(f"max_length={max_length}\n{processor_settings(processor)}\n".encode())
    digest.update(str(getattr(processor, "chat_template", "")).encode())
    for record in records:
        content = [record.id, record.prompt, record.chosen, record.rejected]
        digest.update(json.dumps(content, sort_keys=True, default=str).encode())
        for image in record.images:
            try:
                digest.update(hashlib.sha256(Path(image).read_bytes()).digest())
            except OSError as e:
                raise VlmtuneError(f"record {record.id}: cannot read image {image}: {e}") from e
    return digest.hexdigest()


def _reference_state(model) -> dict:
    state = {}
    for name, tensor in unwrap(model).state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        state[name.replace(".base_layer", "").replace(".original_module", "")] = tensor
    return state


def _compute(net, processor, records, max_length, batch_size, encode_cache, separate, stats) -> ReferenceLogps:
    import torch

    from vlmtune.models.load import reference_forward
    from vlmtune.progress import progress_bar

    fast = unsupported_reason(net) is None
    pad_id = processor.tokenizer.pad_token_id
    device = next(net.parameters()).device
    parts = []
    bar = progress_bar(total=len(records), desc="reference log-probs")
    with bar, reference_forward(net if separate else None, net) as net:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            pairs = encode_pairs(chunk, processor, max_length, encode_cache)
            if fast:
                out = packed_pair_logps(net, pack_pairs(pairs, pad_id).to(device), stats=stats)
            else:
                out = plain_pair_logps(net, pairs.to(device), stats)
            parts.append(out)
            bar.update(len(chunk))
    columns = [torch.cat([getattr(p, name).detach().cpu() for p in parts]) for name in _COLUMNS]
    return ReferenceLogps([r.id for r in records], *columns)


def _check_unique(records: Sequence[PreferenceRecord]) -> None:
    seen = set()
    for record in records:
        if record.id in seen:
            raise VlmtuneError(
                f"record id {record.id!r} appears twice: precomputed reference log-probs are found by id; "
                "give every record a unique id"
            )
        seen.add(record.id)


def _read(path: Path) -> ReferenceLogps:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        ids = json.loads(f.metadata()["ids"])
        tensors = {k: f.get_tensor(k) for k in _COLUMNS}
    return ReferenceLogps(ids, **tensors)


def _write(path: Path, result: ReferenceLogps) -> None:
    tensors = {k: getattr(result, k) for k in _COLUMNS}
    save_safetensors_atomic(path, tensors, metadata={"ids": json.dumps(result.ids)})
