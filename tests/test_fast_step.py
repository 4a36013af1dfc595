"""FastPreferenceStep against PreferenceStep: losses, metrics, gradients and a short training run."""

from __future__ import annotations

import logging

import pytest
import torch

from vlmtune.config import LossConfig
from vlmtune.forward.ref_cache import precompute_reference
from vlmtune.models.load import add_lora, load_model
from vlmtune.train.fast_step import FastPreferenceStep
from vlmtune.train.steps import PreferenceStep

from test_forward_fast import mixed_records

pytestmark = pytest.mark.usefixtures("one_thread")


LOSSES = [
    LossConfig(name="dpo"),
    LossConfig(name="dpo", label_smoothing=0.1),
    LossConfig(name="dpop", dpop_lambda=5.0),
    LossConfig(name="ipo"),
    LossConfig(name="hinge", beta=0.5),
    LossConfig(name="robust", label_smoothing=0.2),
    LossConfig(name="simpo"),
    LossConfig(name="dpo", sft_weight=1.0),  # RPO
    LossConfig(name="bco", beta=0.5),
    LossConfig(name="mpo"),
]


def lora_model(model_dir, dtype="float32"):
    torch.manual_seed(0)
    model, processor = load_model(model_dir, dtype=dtype)
    model = add_lora(model, rank=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # zero at init; random so policy and reference differ
            p.data.normal_(0, 0.05)
    return model, processor


def loss_and_grads(step, records):
    step.model.zero_grad()
    loss, metrics = step.loss_and_metrics(step.encode(records))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in step.model.named_parameters() if p.requires_grad}
    return loss.detach(), metrics, grads


@pytest.fixture(scope="module")
def setup(tiny_model_dir, synth_pairs_file):
    model, processor = lora_model(tiny_model_dir)
    return model, processor, mixed_records(synth_pairs_file)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda c: f"{c.name}-ls{c.label_smoothing}-sft{c.sft_weight}")
def test_fast_step_equals_plain_step(loss, setup):
    model, processor, records = setup
    plain = PreferenceStep(model, processor, 512, loss)
    fast = FastPreferenceStep(model, processor, 512, loss)
    assert fast.fast and fast.share_vision
    plain_loss, plain_metrics, plain_grads = loss_and_grads(plain, records)
    fast_loss, fast_metrics, fast_grads = loss_and_grads(fast, records)
    torch.testing.assert_close(fast_loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert fast_metrics.keys() == plain_metrics.keys()
    for key in plain_metrics:
        assert fast_metrics[key] == pytest.approx(plain_metrics[key], abs=1e-5, rel=1e-5), key
    assert any(g.abs().sum() > 0 for g in plain_grads.values())
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)


def test_precomputed_reference_and_vision_cache(setup, tmp_path):
    model, processor, records = setup
    loss = LossConfig(name="dpo")
    ref = precompute_reference(model, processor, records, 512, cache_dir=tmp_path / "ref", batch_size=2)
    fast = FastPreferenceStep(
        model, processor, 512, loss, vision_cache_dir=tmp_path / "vision", reference_logps=ref
    )
    plain_loss, _, plain_grads = loss_and_grads(PreferenceStep(model, processor, 512, loss), records)
    for _ in range(2):  # the second time, images come from the disk cache
        fast_loss, _, fast_grads = loss_and_grads(fast, records)
        torch.testing.assert_close(fast_loss, plain_loss, atol=1e-5, rtol=1e-5)
        for name in plain_grads:
            torch.testing.assert_close(fast_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)
    # 5 images: encoded on the first step only; one packed pass per step (the reference is cached).
    assert fast.stats.images_encoded == 5 and fast.stats.passes == 2
    assert fast.vision_cache.hits == 5 and fast.encode_cache.hits == 4


def test_unsupported_model_falls_back_with_warning(setup, caplog):
    """Each step object logs the reason once, whatever other steps (or tests) did before it."""
    model, processor, records = setup
    inner_config = model.get_base_model().model.language_model.config
    inner_config._attn_implementation = "flex_attention"
    try:
        with caplog.at_level(logging.WARNING, logger="vlmtune"):
            for _ in range(2):
                fast = FastPreferenceStep(model, processor, 512, LossConfig(name="dpo"))
                assert not fast._fast_supported(model)  # asked again (as for an eval model): not logged again
        assert not fast.fast
        warned = [r.getMessage() for r in caplog.records if r.name == "vlmtune.train.fast_step"]
        assert len(warned) == 2 and all("flex_attention" in m for m in warned)
    finally:
        inner_config._attn_implementation = "sdpa"
    plain_loss, _, _ = loss_and_grads(PreferenceStep(model, processor, 512, LossConfig(name="dpo")), records)
    fast_loss, _, _ = loss_and_grads(fast, records)
    torch.testing.assert_close(fast_loss, plain_loss, atol=1e-6, rtol=1e-6)


def train_curve(model_dir, records, step_cls, n_steps=4, **kwargs):
    model, processor = lora_model(model_dir)
    step = step_cls(model, processor, 512, LossConfig(name="dpo", beta=0.5), **kwargs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for i in range(n_steps):
        batch = records[(i % 2) * 2 : (i % 2) * 2 + 2]
        loss, _ = step.loss_and_metrics(step.encode(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_curves_agree(tiny_qwen25_dir, synth_pairs_file):
    records = mixed_records(synth_pairs_file)
    plain = train_curve(tiny_qwen25_dir, records, PreferenceStep)
    fast = train_curve(tiny_qwen25_dir, records, FastPreferenceStep)
    assert plain[-1] != plain[0]  # it trains
    assert fast == pytest.approx(plain, abs=1e-5, rel=1e-5)


def test_bf16_within_documented_tolerance(tiny_model_dir, synth_pairs_file):
    """bf16 (8 mantissa bits): the two paths round differently (other shapes, other sums), so the
    documented tolerance is 2e-2 on a summed answer log-prob (~-135 here; measured ~1e-3) and 1e-3
    on the loss (measured ~4e-5); the softmax is fp32 on both paths, which keeps it that small."""
    from vlmtune.batch import encode_pairs
    from vlmtune.forward.plain import plain_pair_logps
    from vlmtune.forward.shared_prefix import pack_pairs, packed_pair_logps

    model, processor = lora_model(tiny_model_dir, dtype="bfloat16")
    records = mixed_records(synth_pairs_file)
    pairs = encode_pairs(records, processor, 512)
    with torch.no_grad():
        plain = plain_pair_logps(model, pairs)
        fast = packed_pair_logps(model, pack_pairs(pairs, processor.tokenizer.pad_token_id))
    torch.testing.assert_close(fast.chosen, plain.chosen, atol=2e-2, rtol=0)
    torch.testing.assert_close(fast.rejected, plain.rejected, atol=2e-2, rtol=0)
    loss = LossConfig(name="dpo")
    plain_loss, _, _ = loss_and_grads(PreferenceStep(model, processor, 512, loss), records)
    fast_loss, _, _ = loss_and_grads(FastPreferenceStep(model, processor, 512, loss), records)
    torch.testing.assert_close(fast_loss.float(), plain_loss.float(), atol=1e-3, rtol=0)


def test_plain_forward_still_uses_precomputed_reference(setup):
    model, processor, records = setup
    loss = LossConfig(name="ipo")
    ref = precompute_reference(model, processor, records, 512, batch_size=4)
    step = FastPreferenceStep(model, processor, 512, loss, fast_path=False, reference_logps=ref)
    plain_loss, _, plain_grads = loss_and_grads(PreferenceStep(model, processor, 512, loss), records)
    step_loss, _, step_grads = loss_and_grads(step, records)
    assert not step.fast and step.stats.passes == 2  # chosen and rejected policy passes, no reference pass
    torch.testing.assert_close(step_loss, plain_loss, atol=1e-5, rtol=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(step_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)


def test_vision_cache_refused_for_a_trained_tower(tiny_model_dir, tmp_path):
    from vlmtune.errors import VlmtuneError

    model, processor = load_model(tiny_model_dir)
    model = add_lora(model, rank=4, alpha=8, train_merger=True)
    with pytest.raises(VlmtuneError, match="frozen vision tower"):
        FastPreferenceStep(model, processor, 512, LossConfig(name="dpo"), vision_cache_dir=tmp_path)


def test_trained_vision_tower_gets_the_plain_gradients(tiny_model_dir, synth_pairs_file):
    """LoRA in the vision tower and a trained merger: the pixels go through the packed forward once
    per image, and the tower's gradients equal the plain step's (which encodes each image twice)."""
    torch.manual_seed(0)
    model, processor = load_model(tiny_model_dir)
    model = add_lora(model, rank=4, alpha=8, train_vision="lora", train_merger=True)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    records = mixed_records(synth_pairs_file)
    loss = LossConfig(name="dpo")
    fast = FastPreferenceStep(model, processor, 512, loss)
    assert fast.fast and not fast.share_vision
    plain_loss, _, plain_grads = loss_and_grads(PreferenceStep(model, processor, 512, loss), records)
    fast_loss, _, fast_grads = loss_and_grads(fast, records)
    torch.testing.assert_close(fast_loss, plain_loss, atol=1e-5, rtol=1e-5)
    visual = [name for name in plain_grads if ".visual." in name]
    assert visual and any(plain_grads[name].abs().sum() > 0 for name in visual)
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)
    # 5 images, each encoded once by the policy and once by the reference (adapter off).
    assert fast.stats.images_encoded == 10
