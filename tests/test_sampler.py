"""The group sampler (one image encoding and one prefill per prompt) on tiny models of all three families.

Exactness: greedy decoding equals ``model.generate`` as ``vlmtune.generate`` calls it; the log-probs
the sampler saw equal an independent teacher-forced forward and the GRPO update pass; a hook
counts one vision pass per image and one prefill per prompt; stop tokens end completions.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from vlmtune.data.records import user_prompt
from vlmtune.errors import VlmtuneError
from vlmtune.forward.inner import unwrap
from vlmtune.generate import encode_prompts, generate_ids, stop_token_ids, vision_token_ids
from vlmtune.sampling import sample_groups
from vlmtune.sampling.sampler import top_p_filter

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
# A logit bias on <|im_end|> with which some greedy answers stop early and others run to the limit
# (found by trying; the tests assert that both kinds occur).
STOP_BIAS = {"Qwen2-VL": 3.0, "Qwen2.5-VL": 2.5, "Qwen3-VL": 3.5}
NEW_TOKENS = 10


def _image(rng, width: int, height: int):
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _items():
    """Prompts of different lengths: different texts, image sizes (so image-token counts) and one text-only."""
    rng = np.random.default_rng(0)
    return [
        ([_image(rng, 112, 112)], user_prompt("Count the vehicles.")),
        ([_image(rng, 56, 84)], user_prompt("Please count the number of vehicles you see in the image now.")),
        ([], user_prompt("How many cars?", n_images=0)),
        ([_image(rng, 84, 112)], user_prompt("What?")),
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory, one_thread):
    """A tiny model of each family with weights large enough that its answers depend on the input.

    (Not larger: fp32 rounding grows with the activations; at std 0.3 two independent forwards,
    teacher-forced and the update pass, already differ by up to 8e-6 between themselves.)
    """
    from vlmtune.models.load import load_model
    from vlmtune.models.tiny import build_tiny

    folder = build_tiny(request.param, tmp_path_factory.mktemp(request.param), size="tiny", seed=0)
    model, processor = load_model(folder)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1 if "visual" in name else 0.2)
    return model, processor


@pytest.fixture
def stopping_model(family_model):
    """The family model with ``<|im_end|>`` favoured enough that some completions stop early, others not."""
    from vlmtune.models.load import family_of

    model, processor = family_model
    bias = torch.zeros(model.lm_head.out_features)
    bias[processor.tokenizer.convert_tokens_to_ids("<|im_end|>")] = STOP_BIAS[family_of(model)]
    model.lm_head.bias = torch.nn.Parameter(bias)
    yield model, processor
    model.lm_head.bias = None


# ------------------------------------------------------------------------- (a) greedy = generate


def test_greedy_equals_generate_token_for_token(family_model):
    model, processor = family_model
    items = _items()
    expected = generate_ids(model, processor, items, max_new_tokens=NEW_TOKENS, batch_size=len(items))
    samples = sample_groups(model, processor, items, group_size=2, max_new_tokens=NEW_TOKENS, greedy=True)
    assert samples.answers() == [answer for answer in expected for _ in range(2)]
    assert len({tuple(a) for a in expected}) == len(items)  # the answers differ: the comparison means something


def test_greedy_equals_generate_when_completions_stop(stopping_model):
    model, processor = stopping_model
    items = _items()
    expected = generate_ids(model, processor, items, max_new_tokens=NEW_TOKENS, batch_size=len(items))
    samples = sample_groups(model, processor, items, group_size=1, max_new_tokens=NEW_TOKENS, greedy=True)
    assert samples.answers() == expected
    assert 0 < int(samples.stopped.sum()) < len(items)  # some stopped early, some ran to the limit


def test_a_tiny_top_p_keeps_only_the_argmax(family_model):
    model, processor = family_model
    items = _items()
    greedy = sample_groups(model, processor, items, group_size=1, max_new_tokens=NEW_TOKENS, greedy=True)
    nucleus = sample_groups(model, processor, items, group_size=3, max_new_tokens=NEW_TOKENS, top_p=1e-9, seed=5)
    assert nucleus.completions() == [c for c in greedy.completions() for _ in range(3)]


# ------------------------------------------------------------------------- (b) log-probs


def _teacher_forced_logps(model, processor, item, completion: list[int], temperature: float) -> torch.Tensor:
    """log p(completion[t] | prompt, completion[<t]) from one plain forward over prompt + completion, no cache."""
    prompt = encode_prompts([item], processor)
    ids = torch.cat([prompt["input_ids"], torch.tensor([completion])], dim=1)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"], torch.zeros((1, len(completion)), dtype=torch.long)], 1),
    }
    if "pixel_values" in prompt:
        inputs.update(pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"])
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0].float()
    p = prompt["input_ids"].shape[1]
    logps = torch.log_softmax(logits[p - 1 : p - 1 + len(completion)] / temperature, dim=-1)
    return logps.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def test_sampled_logps_equal_a_teacher_forced_forward(stopping_model):
    model, processor = stopping_model
    items, g, temperature = _items(), 3, 0.7
    samples = sample_groups(model, processor, items, g, NEW_TOKENS, temperature=temperature, top_p=0.9, seed=3)
    assert samples.logps.dtype == torch.float32
    for row, completion in enumerate(samples.completions()):
        expected = _teacher_forced_logps(model, processor, items[row // g], completion, temperature)
        torch.testing.assert_close(samples.logps[row, : len(completion)], expected, atol=1e-5, rtol=0)
        assert (samples.logps[row, len(completion) :] == 0).all()
    assert len({tuple(c) for c in samples.completions()}) > len(items)  # a prompt's samples differ


def test_sampled_logps_equal_the_update_pass(stopping_model):
    from vlmtune.forward.group import build_group_batch, group_logps

    model, processor = stopping_model
    items, g, temperature = _items(), 4, 0.8
    samples = sample_groups(model, processor, items, g, NEW_TOKENS, temperature=temperature, seed=11)
    batch = build_group_batch(
        samples.prompts, samples.completions(), g, [len(images) for images, _ in items],
        processor.tokenizer.pad_token_id, vision_token_ids(model, processor),
    )
    with torch.no_grad():
        for shared in (True, False):
            logps, _ = group_logps(model, batch, temperature, shared_prompt=shared)
            torch.testing.assert_close(samples.logps, logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(samples.mask, batch.completion_mask)


def test_in_float64_the_logps_are_those_of_the_update_pass_to_the_last_bit(family_model):
    """The fp32 tolerance above is rounding: with float64 weights every path gives the same float32 log-probs."""
    import copy

    from vlmtune.forward.group import build_group_batch, group_logps

    model, processor = family_model
    model = copy.deepcopy(model).double()
    items, g, temperature = _items(), 3, 0.9
    samples = sample_groups(model, processor, items, g, NEW_TOKENS, temperature=temperature, seed=2)
    batch = build_group_batch(
        samples.prompts, samples.completions(), g, [len(images) for images, _ in items],
        processor.tokenizer.pad_token_id, vision_token_ids(model, processor),
    )
    with torch.no_grad():
        logps, _ = group_logps(model, batch, temperature, shared_prompt=True)
    torch.testing.assert_close(samples.logps, logps, atol=1e-7, rtol=0)


# ------------------------------------------------------------------------- (c) work counted


class _Counter:
    """Counts vision-tower calls and the images they encode, and language-model calls by kind."""

    def __init__(self, model):
        base = unwrap(model).model
        self.images = self.vision_calls = 0
        self.prefills: list[tuple[int, int]] = []  # (rows, tokens per row) of each multi-token call
        self.decode_rows: list[int] = []  # rows of each one-token call
        self.handles = [
            base.visual.register_forward_hook(self._vision, with_kwargs=True),
            base.language_model.register_forward_hook(self._language, with_kwargs=True),
        ]

    def _vision(self, module, args, kwargs, output):
        self.vision_calls += 1
        self.images += len(kwargs["grid_thw"] if "grid_thw" in kwargs else args[1])

    def _language(self, module, args, kwargs, output):
        rows, length = kwargs["inputs_embeds"].shape[:2]
        if length > 1:
            self.prefills.append((rows, length))
        else:
            self.decode_rows.append(rows)

    def close(self):
        for handle in self.handles:
            handle.remove()


def test_one_vision_pass_per_image_and_one_prefill_per_prompt(family_model):
    model, processor = family_model
    items, g = _items(), 4
    n_images = sum(len(images) for images, _ in items)
    counter = _Counter(model)
    try:
        sample_groups(model, processor, items, g, NEW_TOKENS, temperature=1.0, seed=0)
        ours = (counter.vision_calls, counter.images, list(counter.prefills), len(counter.decode_rows))
        # The same hooks count generate's way.
        counter.images = counter.vision_calls = 0
        counter.prefills.clear()
        generate_ids(model, processor, items, NEW_TOKENS, batch_size=len(items), do_sample=True, num_return_sequences=g)
        theirs = (counter.vision_calls, counter.images, list(counter.prefills))
    finally:
        counter.close()
    width = encode_prompts(items, processor)["input_ids"].shape[1]
    assert ours[:3] == (1, n_images, [(len(items), width)])  # each image once, each prompt once
    assert ours[3] <= NEW_TOKENS - 1  # the first token comes from the prefill's logits
    # transformers 5 encodes each image once inside generate too, but prefills every prompt G times.
    assert theirs == (1, n_images, [(len(items) * g, width)])


# ------------------------------------------------------------------------- (d) stop handling


def test_completions_end_at_their_stop_token_and_padding_follows(stopping_model):
    model, processor = stopping_model
    stop = stop_token_ids(model, processor)
    pad = processor.tokenizer.pad_token_id
    samples = sample_groups(model, processor, _items(), 4, NEW_TOKENS, temperature=1.0, seed=0)
    lengths = samples.mask.sum(1).tolist()
    for row, n in enumerate(lengths):
        ids = samples.ids[row].tolist()
        assert not any(t in stop for t in ids[: n - 1])  # nothing stops a completion before its end
        assert ids[n:] == [pad] * (len(ids) - n)  # padding after it
        assert samples.mask[row].tolist() == [1] * n + [0] * (len(ids) - n)
        if samples.stopped[row]:
            assert ids[n - 1] in stop
        else:
            assert n == NEW_TOKENS and ids[-1] not in stop
    assert 0 < int(samples.stopped.sum()) < len(samples)  # both kinds of row were checked
    assert samples.ids.shape[1] == max(lengths)
    answers = samples.answers()
    assert [len(a) for a in answers] == [n - int(s) for n, s in zip(lengths, samples.stopped.tolist())]
    assert samples.texts == [processor.tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]


def test_finished_rows_leave_the_batch(stopping_model):
    model, processor = stopping_model
    counter = _Counter(model)
    try:
        samples = sample_groups(model, processor, _items(), 4, NEW_TOKENS, temperature=1.0, seed=0)
    finally:
        counter.close()
    lengths = samples.mask.sum(1)
    # The forward after token t (0-based) runs exactly the rows that had not stopped by it: a
    # stopped row of length n stopped at token n - 1.
    running = [int(((lengths > t + 1) | ~samples.stopped).sum()) for t in range(samples.ids.shape[1] - 1)]
    assert counter.decode_rows == running
    assert running[0] > running[-1]  # rows really left


def test_decoding_ends_when_every_completion_has_stopped(stopping_model):
    model, processor = stopping_model
    model.lm_head.bias.data[processor.tokenizer.convert_tokens_to_ids("<|im_end|>")] = 100.0
    samples = sample_groups(model, processor, _items(), 2, NEW_TOKENS, temperature=1.0, seed=0)
    assert samples.ids.shape == (8, 1) and samples.stopped.all() and samples.answers() == [[]] * 8


# ------------------------------------------------------------------------- the rest


def test_vision_tokens_are_never_sampled(vision_biased_model, synth_pairs_file):
    from vlmtune.data.formats import read_records

    model, processor, banned, _ = vision_biased_model
    items = [(r.images, r.prompt) for r in read_records(synth_pairs_file)[:2]]
    for greedy in (True, False):
        samples = sample_groups(model, processor, items, 3, 6, greedy=greedy, seed=0)
        assert not torch.isin(samples.ids, torch.tensor(banned)).any()


def test_the_seed_decides_the_samples(family_model):
    model, processor = family_model
    items = _items()[:2]
    first = sample_groups(model, processor, items, 3, NEW_TOKENS, temperature=1.0, seed=7)
    torch.manual_seed(123)  # the global generator plays no part
    again = sample_groups(model, processor, items, 3, NEW_TOKENS, temperature=1.0, seed=7)
    other = sample_groups(model, processor, items, 3, NEW_TOKENS, temperature=1.0, seed=8)
    assert first.completions() == again.completions()
    torch.testing.assert_close(first.logps, again.logps, atol=0, rtol=0)
    assert first.completions() != other.completions()


def test_the_model_mode_is_given_back(family_model):
    model, processor = family_model
    model.train()
    sample_groups(model, processor, _items()[:1], 2, 2, seed=0)
    assert model.training
    model.eval()


def test_top_p_filter_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05 (as logits: their logs). top_p 0.8: ascending cumulative
    # 0.05, 0.20, 0.50, 1.00; tokens with cumulative <= 0.2 go: the 0.05 and the 0.15 ones.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = top_p_filter(logits, 0.8)
    assert torch.isinf(kept[0, 2:]).all() and torch.equal(kept[0, :2], logits[0, :2])
    # At least one token survives any top_p.
    assert torch.isfinite(top_p_filter(logits, 1e-12)).sum() == 1


def test_top_p_filter_equals_transformers():
    from transformers.generation.logits_process import TopPLogitsWarper

    scores = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    for top_p in (0.1, 0.5, 0.9, 0.99):
        assert torch.equal(top_p_filter(scores, top_p), TopPLogitsWarper(top_p)(None, scores))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(group_size=0), "group size (0)"),
        (dict(max_new_tokens=0), "max new tokens (0)"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
    ],
)
def test_bad_settings_are_refused(options, message):
    settings = dict(group_size=2, max_new_tokens=4) | options
    with pytest.raises(VlmtuneError, match=re.escape(message)):
        sample_groups(None, None, _items(), **settings)


def test_an_empty_batch_is_refused():
    with pytest.raises(VlmtuneError, match="batch is empty"):
        sample_groups(None, None, [], 2, 4)


def test_images_must_fill_the_prompt_slots(family_model):
    model, processor = family_model
    with pytest.raises(VlmtuneError, match="1 image slot"):
        sample_groups(model, processor, [([], user_prompt("Count."))], 2, 4)


def test_a_lora_model_samples_through_its_adapter(tiny_model_dir, one_thread):
    from vlmtune.models.load import add_lora, load_model

    model, processor = load_model(tiny_model_dir)
    model = add_lora(model, rank=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ("lora" not in name and p.dim() >= 2 and "visual" not in name):
                p.normal_(0, 0.2)
    items = _items()
    samples = sample_groups(model, processor, items, 2, NEW_TOKENS, greedy=True)
    assert samples.answers() == [a for a in generate_ids(model, processor, items, NEW_TOKENS, len(items)) for _ in range(2)]
    with model.disable_adapter():
        without = sample_groups(model, processor, items, 2, NEW_TOKENS, greedy=True)
    assert without.completions() != samples.completions()  # the adapter was in the forward
