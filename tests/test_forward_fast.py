"""The fast pair forward (shared prompt, images once, caches) against the plain pair forward."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from vlmtune.batch import EncodedRecordCache, encode_pairs
from vlmtune.data.formats import read_records
from vlmtune.data.records import PreferenceRecord, user_prompt
from vlmtune.forward.inner import unsupported_reason
from vlmtune.forward.plain import ForwardStats, plain_pair_logps
from vlmtune.forward.ref_cache import precompute_reference
from vlmtune.forward.shared_prefix import (
    CHOSEN,
    PAD,
    PROMPT,
    REJECTED,
    attention_mask_4d,
    encode_images,
    pack_pairs,
    packed_pair_logps,
)
from vlmtune.forward.vision_cache import VisionFeatureCache
from vlmtune.models.load import add_lora, load_model, reference_mode


pytestmark = pytest.mark.usefixtures("one_thread")


def mixed_records(synth_pairs_file) -> list[PreferenceRecord]:
    """Different prompt and answer lengths, and a record with two images (so padding everywhere)."""
    base = read_records(synth_pairs_file)
    two = base[3]
    return [
        base[0],
        dataclasses.replace(
            base[1],
            prompt=user_prompt("How many cars, buses and bicycles are in this busy street?"),
            rejected="0 cars.",
        ),
        PreferenceRecord("two-images", [two.images[0], base[0].images[0]],
                         user_prompt("Count the vehicles in both pictures.", n_images=2), two.chosen, "None."),
        dataclasses.replace(base[2], chosen="There are 12 cars.", id="short-chosen"),
    ]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from vlmtune.models.tiny import build_tiny

    return build_tiny("qwen3-vl", tmp_path_factory.mktemp("tiny-qwen3-vl-fast"))


def test_mask_hand_worked():
    """Row P P C C R R pad: rejected sees the prompt and itself, never the chosen answer."""
    segments = torch.tensor([[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, REJECTED, PAD]], dtype=torch.int8)
    mask = attention_mask_4d(segments, "sdpa", torch.float32)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 1],
        ]
    )
    assert torch.equal(mask, expected)
    additive = attention_mask_4d(segments, "eager", torch.float32)[0, 0]
    assert torch.equal(additive == 0, expected.bool())


@pytest.mark.parametrize(
    "fixture, attention",
    [("tiny_model_dir", "sdpa"), ("tiny_model_dir", "eager"), ("tiny_qwen25_dir", "sdpa"), ("qwen3_dir", "sdpa")],
)
def test_packed_equals_plain(fixture, attention, synth_pairs_file, request):
    model, processor = load_model(request.getfixturevalue(fixture), attn_implementation=attention)
    model.eval()
    records = mixed_records(synth_pairs_file)
    pairs = encode_pairs(records, processor, max_length=512)
    packed = pack_pairs(pairs, processor.tokenizer.pad_token_id)
    before = copy.deepcopy(packed)
    plain_stats, fast_stats = ForwardStats(), ForwardStats()
    with torch.no_grad():
        plain = plain_pair_logps(model, pairs, plain_stats)
        fast = packed_pair_logps(model, packed, stats=fast_stats)
    assert packed.position_ids is None  # the input is read, not written
    for field in dataclasses.fields(packed):
        now, then = getattr(packed, field.name), getattr(before, field.name)
        if isinstance(then, torch.Tensor):
            assert torch.equal(now, then), field.name
        elif field.name != "pairs":
            assert now == then, field.name
    for side in ("chosen", "rejected"):
        for key, tensor in getattr(before.pairs, side).items():
            assert torch.equal(getattr(packed.pairs, side)[key], tensor), (side, key)
    for name in ("chosen", "rejected"):
        torch.testing.assert_close(getattr(fast, name), getattr(plain, name), atol=1e-5, rtol=1e-6)
        assert torch.equal(getattr(fast, f"{name}_tokens"), getattr(plain, f"{name}_tokens"))
    # Five images (one record has two): the plain forward encodes them twice, the fast one once.
    assert plain_stats.images_encoded == 10 and fast_stats.images_encoded == 5
    assert fast_stats.prompt_tokens * 2 == plain_stats.prompt_tokens
    assert fast_stats.answer_tokens == plain_stats.answer_tokens


def test_truncated_answers_match(tiny_model_dir, synth_pairs_file):
    model, processor = load_model(tiny_model_dir)
    records = mixed_records(synth_pairs_file)[:2]
    prompt_len = encode_pairs(records, processor, max_length=512).prompt_lengths
    pairs = encode_pairs(records, processor, max_length=max(prompt_len) + 3)  # answers cut short
    with torch.no_grad():
        plain = plain_pair_logps(model, pairs)
        fast = packed_pair_logps(model, pack_pairs(pairs, processor.tokenizer.pad_token_id))
    torch.testing.assert_close(fast.chosen, plain.chosen, atol=1e-5, rtol=1e-6)
    assert torch.equal(fast.rejected_tokens, plain.rejected_tokens)


def test_lora_gradients_match(tiny_model_dir, synth_pairs_file):
    torch.manual_seed(0)
    model, processor = load_model(tiny_model_dir)
    model = add_lora(model, rank=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # zero at init; random so the adapter changes the outputs
            p.data.normal_(0, 0.05)
    pairs = encode_pairs(mixed_records(synth_pairs_file), processor, max_length=512)
    packed = pack_pairs(pairs, processor.tokenizer.pad_token_id)

    def grads(logps):
        model.zero_grad()
        (logps.chosen - 0.7 * logps.rejected).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, fast = grads(plain_pair_logps(model, pairs)), grads(packed_pair_logps(model, packed))
    assert plain.keys() == fast.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], atol=1e-5, rtol=1e-4)
    with reference_mode(model):
        ref_plain, ref_fast = plain_pair_logps(model, pairs), packed_pair_logps(model, packed)
    torch.testing.assert_close(ref_fast.chosen, ref_plain.chosen, atol=1e-5, rtol=1e-6)


def test_encode_cache_gives_encode_pairs(tiny_model_dir, synth_pairs_file):
    _, processor = load_model(tiny_model_dir)
    records = mixed_records(synth_pairs_file)
    cache = EncodedRecordCache()
    expected = encode_pairs(records, processor, max_length=512)
    for _ in range(2):
        got = encode_pairs(records, processor, max_length=512, cache=cache)
        for side in ("chosen", "rejected"):
            assert getattr(got, side).keys() == getattr(expected, side).keys()
            for key, value in getattr(expected, side).items():
                assert torch.equal(getattr(got, side)[key], value), key
    assert (cache.misses, cache.hits) == (4, 4)


def test_vision_cache_reuses_and_invalidates(tiny_model_dir, synth_pairs_file, tmp_path):
    model, processor = load_model(tiny_model_dir)
    model = add_lora(model, rank=4, alpha=8)
    records = mixed_records(synth_pairs_file)
    images = [p for r in records for p in r.images]
    pairs = encode_pairs(records, processor, 512)
    packed = pack_pairs(pairs, processor.tokenizer.pad_token_id, image_paths=images)
    cache = VisionFeatureCache(tmp_path / "vision", model, processor)
    stats = ForwardStats()
    first = cache.features(model, packed, stats)
    second = cache.features(model, packed, stats)
    assert stats.images_encoded == 5 and (cache.misses, cache.hits) == (5, 5)
    with torch.no_grad():
        direct = encode_images(model, packed)
    for a, b in zip(second.pooler_output, direct.pooler_output):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert first is not None
    assert len(list((tmp_path / "vision").glob("*.safetensors"))) == 4  # base[0]'s image is used twice
    with torch.no_grad():  # other vision weights: new keys, nothing stale is read
        model.get_base_model().model.visual.merger.mlp[0].weight.mul_(1.01)
    changed = VisionFeatureCache(tmp_path / "vision", model, processor)
    changed.features(model, packed)
    assert changed.misses == 5


def test_vision_cache_refuses_trained_tower(tiny_model_dir, tmp_path):
    from vlmtune.errors import VlmtuneError

    model, processor = load_model(tiny_model_dir)
    model = add_lora(model, rank=4, alpha=8, train_vision="lora")
    with pytest.raises(VlmtuneError, match="frozen vision tower"):
        VisionFeatureCache(tmp_path, model, processor)


def test_precompute_reference_cached_on_disk(tiny_model_dir, synth_pairs_file, tmp_path):
    model, processor = load_model(tiny_model_dir)
    model = add_lora(model, rank=4, alpha=8)
    records = mixed_records(synth_pairs_file)
    stats = ForwardStats()
    ref = precompute_reference(model, processor, records, 512, cache_dir=tmp_path, batch_size=3, stats=stats)
    assert stats.passes == 2 and len(list(tmp_path.glob("*.safetensors"))) == 1
    again = precompute_reference(model, processor, records, 512, cache_dir=tmp_path, batch_size=3, stats=stats)
    assert stats.passes == 2  # read from disk, nothing run
    with reference_mode(model):
        plain = plain_pair_logps(model, encode_pairs(records[::-1], processor, 512))
    looked_up = again.lookup([r.id for r in records[::-1]])
    torch.testing.assert_close(looked_up.chosen, plain.chosen, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(looked_up.rejected, ref.lookup([r.id for r in records[::-1]]).rejected)
    edited = [dataclasses.replace(records[0], chosen="There are 9 cars.")] + records[1:]
    precompute_reference(model, processor, edited, 512, cache_dir=tmp_path, stats=stats)
    assert stats.passes == 3 and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_unsupported_attention_is_named(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    assert unsupported_reason(model) is None
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in unsupported_reason(model)


def test_answers_common_first_tokens_run_once(tiny_model_dir, synth_pairs_file):
    """Equal answers, one answer a prefix of the other, none in common: plain's log-probs, shorter rows."""
    model, processor = load_model(tiny_model_dir)
    model.eval()
    base = read_records(synth_pairs_file)[0]
    records = [
        dataclasses.replace(base, id="same", chosen="There are 2 cars.", rejected="There are 2 cars."),
        dataclasses.replace(base, id="prefix", chosen="There are 2 cars, 1 bus.", rejected="There are 2 cars"),
        dataclasses.replace(base, id="longer", chosen="There are 2", rejected="There are 2 cars, 1 bus."),
        dataclasses.replace(base, id="none", chosen="Two cars.", rejected="There are 2 cars."),
    ]
    pairs = encode_pairs(records, processor, max_length=512)
    packed = pack_pairs(pairs, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = plain_pair_logps(model, pairs)
        fast = packed_pair_logps(model, packed)
    torch.testing.assert_close(fast.chosen, plain.chosen, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(fast.rejected, plain.rejected, atol=1e-5, rtol=1e-6)
    assert torch.equal(fast.rejected_tokens, plain.rejected_tokens)
    # Each row holds the prompt, the common first tokens once, then what differs, less each answer's
    # last token (it predicts nothing and nothing kept attends to it).
    prompt = torch.tensor(pairs.prompt_lengths)
    chosen = pairs.chosen["attention_mask"].sum(1) - prompt
    rejected = pairs.rejected["attention_mask"].sum(1) - prompt
    common = torch.tensor(packed.shared_lengths) - prompt
    own = (chosen - common - 1).clamp(min=0) + (rejected - common - 1).clamp(min=0)
    assert torch.equal((packed.segments != PAD).sum(1), prompt + common + own)
    assert common.tolist()[0] == chosen[0] and common[1] > 0 and common[3] == 0
    assert (packed.segments[0] == REJECTED).sum() == 0
