"""The language model's last decoder layer, run only at the positions whose output is read.

In the packed pair forward (``vlmtune.forward.shared_prefix``) only the positions that predict an
answer token reach ``lm_head``. Every earlier layer must run at every position (the next layer's
keys and values come from all of them), but the last layer's outputs at the prompt positions are
never read: there its keys and values are needed at every position, its queries, attention output,
MLP and norms only at the read ones. On counting pairs the prompt is ~70% of a row, so this
saves ~70% of one layer, forward and backward.

``rows_only(model, index)`` (``model``: the ``...VLModel`` holding ``language_model``) makes the
last layer compute, for each batch row ``b``, only
the positions ``index[b]`` (a ``(B, Q)`` tensor), and return ``(B, Q, hidden)``; the model's
final norm then runs on those rows alone. It is exact: each query's attention is a softmax over
its own row of the mask, so dropping other queries changes nothing, and everything after attention
is per position.

The layer is rebuilt from its own modules (so LoRA adapters in them run, or not under
``disable_adapter``), in the order the three supported families run them:

    input norm -> q, k, v projections (Qwen3-VL: per-head RMSNorm on q and k) -> rope -> attention
    -> o projection -> residual -> post-attention norm -> MLP -> residual

Anything else -- another layer class, a layer whose ``forward`` was replaced by a hook (accelerate's
device placement), Qwen3-VL with deepstack features added after its last layer -- gets no change:
``rows_only`` yields False and the model returns full-length rows.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

from vlmtune.forward.inner import attention_mask

if TYPE_CHECKING:
    import torch

SUPPORTED_LAYERS = ("Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen3VLTextDecoderLayer")


@contextmanager
def rows_only(model, index: torch.Tensor):
    """Within the block, ``model``'s last decoder layer computes only positions ``index`` (``(B, Q)``).

    Yields whether it does; when False the model runs unchanged (full-length output).
    """
    layer = model.language_model.layers[-1]
    if not supported(model):
        yield False
        return
    layer.forward = partial(_checkpointed, layer, index)
    try:
        yield True
    finally:
        del layer.forward


def supported(model) -> bool:
    """Whether ``rows_only`` can restrict the last layer of ``model`` (a ``...VLModel``)."""
    layers = model.language_model.layers
    layer = layers[-1]
    if type(layer).__name__ not in SUPPORTED_LAYERS:
        return False
    if "forward" in vars(layer) or hasattr(layer, "_hf_hook"):  # a hook already owns its forward
        return False
    deepstack = getattr(getattr(model.config, "vision_config", None), "deepstack_visual_indexes", None)
    # Qwen3-VL adds deepstack features after layers 0 .. n - 1; only on the last one would they meet cut rows.
    return len(deepstack or ()) < len(layers)


def _checkpointed(layer, index, hidden_states, *args, **kwargs):
    if layer.gradient_checkpointing and layer.training:
        return layer._gradient_checkpointing_func(partial(_rows_forward, layer, index, **kwargs), hidden_states)
    return _rows_forward(layer, index, hidden_states, *args, **kwargs)


def _rows_forward(layer, index, hidden_states, attention_mask=None, position_embeddings=None, **_):
    """The decoder layer's output at positions ``index`` only, shape ``(B, Q, hidden)``."""
    attn = layer.self_attn
    batch, length, width = hidden_states.shape
    queries = index.shape[1]
    pick = index.unsqueeze(-1)

    normed = layer.input_layernorm(hidden_states)
    query = attn.q_proj(normed.gather(1, pick.expand(batch, queries, width))).view(batch, queries, -1, attn.head_dim)
    key = attn.k_proj(normed).view(batch, length, -1, attn.head_dim)
    value = attn.v_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        query, key = attn.q_norm(query), attn.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)

    cos, sin = position_embeddings
    rotate_half = sys.modules[type(attn).__module__].rotate_half
    cos_q = cos.gather(1, pick.expand(batch, queries, cos.shape[-1]))
    sin_q = sin.gather(1, pick.expand(batch, queries, sin.shape[-1]))
    query = query * cos_q.unsqueeze(1) + rotate_half(query) * sin_q.unsqueeze(1)
    key = key * cos.unsqueeze(1) + rotate_half(key) * sin.unsqueeze(1)

    if attention_mask is None:  # plain causal attention: the layer would have run with is_causal
        attention_mask = _causal(attn, index, length, query.dtype)
    else:
        heads = attention_mask.shape[1]
        attention_mask = attention_mask.gather(2, index[:, None, :, None].expand(batch, heads, queries, length))
    out, _ = _attention(attn)(
        attn,
        query,
        key,
        value,
        attention_mask,
        dropout=attn.attention_dropout if attn.training else 0.0,
        scaling=attn.scaling,
    )
    out = attn.o_proj(out.reshape(batch, queries, -1).contiguous())
    hidden = hidden_states.gather(1, pick.expand(batch, queries, width)) + out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _causal(attn, index, length: int, dtype):
    """The causal mask of queries at ``index`` over ``length`` keys, in the form the layer's attention takes."""
    import torch

    allowed = torch.arange(length, device=index.device) <= index.unsqueeze(-1)
    return attention_mask(allowed.unsqueeze(1), attn.config._attn_implementation, dtype)


def _attention(attn):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    family = sys.modules[type(attn).__module__]
    return ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, family.eager_attention_forward)
