"""FSDP 2 for ``vlmtune train``: shard the model where accelerate does not, and gather it back for saving.

``accelerate launch --use_fsdp --fsdp_version 2`` (or ``configs/accelerate/fsdp.yaml``) asks for a
fully sharded model. On GPUs accelerate shards it in ``Accelerator.prepare`` (its
``fsdp2_prepare_model``). On CPU processes (``ACCELERATE_USE_CPU=1``, gloo) accelerate 1.x silently
runs plain DDP instead: its state only turns FSDP on for accelerator devices. There
``shard_like_accelerate`` applies torch's ``fully_shard`` itself, like accelerate's
``TRANSFORMER_BASED_WRAP`` policy: each block named in the model's ``_no_split_modules`` (decoder
layers, vision blocks) is one unit, then the whole model (accelerate also makes the embeddings and
the final norm + ``lm_head`` units of their own; here they stay in the root unit). Of the launcher's
FSDP settings only ``reshard_after_forward`` applies there; for activation checkpointing use
``train.gradient_checkpointing``. Either way the training loop, the checkpoints
(``torch.distributed.checkpoint``) and the gathered final model are the same code.
"""

from __future__ import annotations

import os

import torch

from vlmtune.errors import VlmtuneError


def fsdp_plugin_on_cpu(accelerator):
    """The launcher's FSDP settings when it asked for FSDP but accelerate runs DDP on CPU, else None."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    # ACCELERATE_USE_FSDP is how `accelerate launch --use_fsdp` / an FSDP config hands the choice to
    # each process; accelerate's own state ignores it on CPU (see the module docstring).
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return None
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* settings
    if plugin.fsdp_version != 2:
        raise VlmtuneError("FSDP on CPU processes needs FSDP 2: pass --fsdp_version 2 to accelerate launch")
    return plugin


def shard_like_accelerate(model, plugin):
    """Shard ``model`` in place with ``fully_shard``: each ``_no_split_modules`` block, then the root."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(model._no_split_modules or ())
    reshard = plugin.reshard_after_forward is not False
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return model


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every weight of a sharded ``model`` gathered on the main process (CPU); empty elsewhere. All call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
