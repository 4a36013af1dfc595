"""What the fast forwards read from a model: the mask in each attention's form, the model under its
wrappers, and the refusal of models they cannot run exactly."""

from __future__ import annotations

import pytest
import torch

from vlmtune.errors import VlmtuneError
from vlmtune.forward.inner import attention_mask, unsupported_reason, unwrap
from vlmtune.models.load import add_lora, load_model


def test_mask_is_boolean_for_sdpa_and_additive_for_eager():
    allowed = torch.tensor([[True, False], [True, True]])
    assert attention_mask(allowed, "sdpa", torch.float32) is allowed
    for dtype in (torch.float32, torch.bfloat16):
        lowest = torch.finfo(dtype).min
        expected = torch.tensor([[0.0, lowest], [0.0, 0.0]], dtype=dtype)
        got = attention_mask(allowed, "eager", dtype)
        assert got.dtype == dtype and torch.equal(got, expected)


def test_unwrap_removes_the_adapter_wrapper(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    assert unwrap(model) is model
    wrapped = add_lora(model, rank=2, alpha=4)
    assert unwrap(wrapped) is wrapped.get_base_model() and type(unwrap(wrapped)) is type(model)


def test_models_the_fast_forwards_cannot_run_are_named(tiny_model_dir, monkeypatch):
    model, _ = load_model(tiny_model_dir)
    assert unsupported_reason(model) is None
    monkeypatch.setattr(model.config, "model_type", "llava")
    assert "model type 'llava' is not one of qwen2_vl, qwen2_5_vl, qwen3_vl" in unsupported_reason(model)


def test_group_forward_refuses_attention_without_a_4d_mask(tiny_model_dir):
    from vlmtune.forward.group import build_group_batch, group_logps

    model, processor = load_model(tiny_model_dir)
    prompts = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    batch = build_group_batch(prompts, [[7], [8]], 2, [0], processor.tokenizer.pad_token_id, [])
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(VlmtuneError, match="needs sdpa or eager attention .* not flash_attention_2; set grpo.shared_prompt=false"):
        group_logps(model, batch, shared_prompt=True)
