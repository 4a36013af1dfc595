"""The deterministic order in which records are read: a pure function of the seed and the position.

Micro-batch ``k`` (counted from the start of training, over all epochs) of a run with ``world``
processes of ``batch_size`` records each reads the slice ``[j * G, (j + 1) * G)`` of epoch ``e``'s
permutation, where ``G = batch_size * world``, ``e, j = divmod(k, batches_per_epoch)`` and the
permutation comes from a ``torch.Generator`` seeded with ``seed + e``. Process ``rank`` takes its
``batch_size`` records of that slice. So the position needs only ``k`` to be restored, and 2
processes x batch b read exactly the records 1 process x batch 2b reads. The last partial global
batch of an epoch is dropped, so every micro-batch has the same size.
"""

from __future__ import annotations

import torch

from vlmtune.errors import VlmtuneError


def batches_per_epoch(n_records: int, batch_size: int, world: int) -> int:
    per_batch = batch_size * world
    if n_records < per_batch:
        raise VlmtuneError(
            f"the training data has {n_records} records, fewer than one global batch "
            f"({batch_size} per process x {world} process(es)); lower train.batch_size or add data"
        )
    return n_records // per_batch


def epoch_permutation(n_records: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n_records, generator=generator).tolist()


def micro_batch_indices(k: int, n_records: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Indices of the records that process ``rank`` reads in micro-batch ``k``."""
    epoch, j = divmod(k, batches_per_epoch(n_records, batch_size, world))
    order = epoch_permutation(n_records, seed, epoch)
    start = j * batch_size * world + rank * batch_size
    return order[start : start + batch_size]
