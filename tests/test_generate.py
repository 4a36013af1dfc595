"""Batched generation on a tiny real-architecture model: batching, padding, suppressed tokens."""

from __future__ import annotations

import pytest
import torch

from vlmtune.data.formats import read_records
from vlmtune.data.records import user_prompt
from vlmtune.errors import VlmtuneError
from vlmtune.generate import generate, generate_ids

PROMPTS = [
    "Count the vehicles.",
    "Please count the number of vehicles you see in the image.",
    "How many cars?",
    "Count each class: car, motorcycle, bus and bicycle. Answer with a number for each class.",
    "What do you see?",
]


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir):
    from vlmtune.models.load import load_model

    model, processor = load_model(tiny_model_dir)
    # A freshly initialised model (std 0.02) says the same token whatever it sees; larger
    # weights make its greedy answers depend on the image and prompt, so comparisons mean something.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1 if "visual" in name else 0.3)
    return model, processor


@pytest.fixture(scope="module")
def items(synth_pairs_file):
    records = read_records(synth_pairs_file)[:5]
    # Prompts of different lengths, so that left padding really happens inside a batch.
    return [(r.images, user_prompt(text)) for r, text in zip(records, PROMPTS)]


def test_batched_greedy_equals_one_at_a_time(model_and_processor, items):
    model, processor = model_and_processor
    batched = generate_ids(model, processor, items, max_new_tokens=8, batch_size=5)
    single = [generate_ids(model, processor, [item], max_new_tokens=8, batch_size=1)[0] for item in items]
    assert batched == single
    # The answers are not all the same (otherwise the comparison above would prove little).
    assert len({tuple(a) for a in batched}) > 1
    assert all(len(a) > 0 for a in batched)
    texts = generate(model, processor, items, max_new_tokens=8, batch_size=2)
    assert texts == [processor.tokenizer.decode(a, skip_special_tokens=True).strip() for a in batched]
    assert processor.tokenizer.padding_side == "right"  # given back as it was


def test_vision_tokens_are_never_generated(vision_biased_model, items):
    model, processor, banned, image_pad = vision_biased_model

    from vlmtune.generate import encode_prompts

    inputs = encode_prompts(items[:1], processor)
    raw = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert (raw[:, inputs["input_ids"].shape[1] :] == image_pad).all()  # the bias works unsuppressed

    greedy = generate_ids(model, processor, items[:2], max_new_tokens=6, batch_size=2)
    sampled = generate_ids(model, processor, items[:2], max_new_tokens=6, batch_size=2,
                           do_sample=True, temperature=5.0, num_return_sequences=3)
    for row in greedy + sampled:
        assert not set(row) & set(banned)
    assert all(len(row) == 6 for row in greedy)  # stop tokens are not biased, so it runs on


def test_sampling_is_seeded_and_groups_answers(model_and_processor, items):
    model, processor = model_and_processor
    kwargs = dict(max_new_tokens=6, batch_size=3, do_sample=True, temperature=1.5, num_return_sequences=2)
    a = generate_ids(model, processor, items[:3], seed=1, **kwargs)
    b = generate_ids(model, processor, items[:3], seed=1, **kwargs)
    c = generate_ids(model, processor, items[:3], seed=2, **kwargs)
    assert len(a) == 6
    assert a == b
    assert a != c


def test_bad_items_are_clear_errors(model_and_processor, items):
    model, processor = model_and_processor
    images, _ = items[0]
    with pytest.raises(VlmtuneError, match="image slot"):
        generate(model, processor, [(images + images, user_prompt("Count."))], 4, 1)
    with pytest.raises(VlmtuneError, match=r"item 2: image /nonexistent/x.png does not exist"):
        # the third item, in the second batch: named by its place in the whole list
        generate(model, processor, items[:2] + [(["/nonexistent/x.png"], user_prompt("Count."))], 4, 2)
    with pytest.raises(VlmtuneError, match=r"item 1: 2 image\(s\) but the prompt has 1 image slot"):
        generate(model, processor, [items[0], (images + images, user_prompt("Count."))], 4, 1)
    with pytest.raises(VlmtuneError, match="sampling"):
        generate(model, processor, items[:1], 4, 1, num_return_sequences=2)


def test_prompts_padded_left_without_touching_the_tokenizer(model_and_processor, items):
    from vlmtune.generate import encode_prompts

    _, processor = model_and_processor
    assert processor.tokenizer.padding_side == "right"
    inputs = encode_prompts(items[:3], processor)
    mask = inputs["attention_mask"]
    assert mask[:, 0].min() == 0 and mask[:, -1].min() == 1  # padding on the left, every row ends on its prompt
    assert processor.tokenizer.padding_side == "right"  # the shared tokenizer is as it was


def test_answers_cut_before_or_through_the_stop_token():
    from vlmtune.generate import before_stop, through_stop

    stop = {7, 9}
    assert before_stop([1, 2, 9, 3, 7], stop) == [1, 2]
    assert through_stop([1, 2, 9, 3, 7], stop) == [1, 2, 9]
    assert before_stop([7, 1], stop) == [] and through_stop([7, 1], stop) == [7]
    assert before_stop([1, 2], stop) == [1, 2] == through_stop([1, 2], stop)  # never stopped: all kept
