"""Records become tensors: labels on the answer only, right padding, safe truncation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmtune.batch import IGNORE_INDEX, encode_pairs, encode_sft
from vlmtune.data.records import PreferenceRecord, user_prompt
from vlmtune.errors import VlmtuneError
from vlmtune.models.tiny import build_tiny


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, size, mode in (("square", (112, 112), "RGB"), ("wide", (200, 100), "RGB"), ("gray", (90, 120), "L")):
        paths[name] = str(folder / f"{name}.png")
        Image.new(mode, size, 128).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def processors(tiny_model_dir, tiny_qwen25_dir, tmp_path_factory):
    from transformers import AutoProcessor

    qwen3 = build_tiny("qwen3-vl", tmp_path_factory.mktemp("tiny-qwen3-vl-batch"))
    return {
        name: AutoProcessor.from_pretrained(folder)
        for name, folder in (("qwen2-vl", tiny_model_dir), ("qwen2.5-vl", tiny_qwen25_dir), ("qwen3-vl", qwen3))
    }


def make_records(images):
    return [
        PreferenceRecord("r1", [images["square"]], user_prompt("Count the cars."), "There are 2 cars.", "There are 3 cars."),
        PreferenceRecord(
            "r2",
            [images["wide"]],
            user_prompt("Count the vehicles: cars, buses."),
            "There are 12 cars, 0 buses in the image.",
            "No.",
        ),
        PreferenceRecord("r3", [images["gray"]], user_prompt("How many?"), "1 bicycle.", "7 buses."),
    ]


def labelled_text(processor, inputs, row):
    labels = inputs["labels"][row]
    return processor.tokenizer.decode(labels[labels != IGNORE_INDEX])


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_labels_cover_only_the_answer_and_end_of_turn(family, processors, images):
    processor = processors[family]
    records = make_records(images)
    batch = encode_pairs(records, processor, max_length=512)
    assert batch.ids == ["r1", "r2", "r3"]
    for row, record in enumerate(records):
        assert labelled_text(processor, batch.chosen, row) == record.chosen + "<|im_end|>"
        assert labelled_text(processor, batch.rejected, row) == record.rejected + "<|im_end|>"
        # Everything before the answer is the prompt exactly as the processor encodes it alone.
        text = processor.apply_chat_template(record.prompt, add_generation_prompt=True)
        with Image.open(record.images[0]) as image:
            alone = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")["input_ids"][0]
        n = batch.prompt_lengths[row]
        assert n == len(alone)
        assert batch.chosen["input_ids"][row, :n].tolist() == alone.tolist()
        assert batch.rejected["input_ids"][row, :n].tolist() == alone.tolist()
        assert (batch.chosen["labels"][row, :n] == IGNORE_INDEX).all()


def test_right_padding_and_shared_images(processors, images):
    processor = processors["qwen2-vl"]
    batch = encode_pairs(make_records(images), processor, max_length=512)
    inputs = batch.rejected
    lengths = inputs["attention_mask"].sum(dim=1)
    pad_id = processor.tokenizer.pad_token_id
    for row, n in enumerate(lengths.tolist()):
        assert inputs["attention_mask"][row, :n].all() and not inputs["attention_mask"][row, n:].any()
        assert (inputs["input_ids"][row, n:] == pad_id).all()
        assert (inputs["labels"][row, n:] == IGNORE_INDEX).all()
    assert batch.chosen["pixel_values"] is batch.rejected["pixel_values"]
    moved = batch.to("cpu")
    assert moved.chosen["pixel_values"] is moved.rejected["pixel_values"]
    assert torch.equal(moved.rejected["input_ids"], inputs["input_ids"]) and len(moved) == 3
    assert len(batch.chosen["image_grid_thw"]) == 3
    n_image_tokens = (inputs["input_ids"] == processor.image_token_id).sum()
    assert n_image_tokens == sum(int(g.prod()) // 4 for g in inputs["image_grid_thw"])
    assert (inputs["mm_token_type_ids"] == 1).sum() == n_image_tokens


def test_sft_is_the_chosen_side(processors, images):
    processor = processors["qwen2.5-vl"]
    records = make_records(images)
    sft = encode_sft(records, processor, max_length=512)
    pairs = encode_pairs(records, processor, max_length=512)
    for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
        assert torch.equal(sft[key], pairs.chosen[key])


def test_truncation_cuts_the_answer_end_never_the_prompt(processors, images):
    processor = processors["qwen2-vl"]
    record = make_records(images)[1]
    full = encode_pairs([record], processor, max_length=512)
    n = full.prompt_lengths[0]
    cut = encode_pairs([record], processor, max_length=n + 3)
    assert cut.chosen["input_ids"].shape[1] == n + 3
    assert cut.chosen["input_ids"][0].tolist() == full.chosen["input_ids"][0, : n + 3].tolist()
    assert int((cut.chosen["labels"] != IGNORE_INDEX).sum()) == 3


def test_refuses_a_cut_inside_the_image_tokens(processors, images):
    processor = processors["qwen2-vl"]
    record = make_records(images)[0]
    ids = encode_pairs([record], processor, max_length=512).chosen["input_ids"][0]
    first_image_token = int((ids == processor.image_token_id).nonzero()[0])
    with pytest.raises(VlmtuneError, match=r"record r1: .*inside an image's tokens"):
        encode_pairs([record], processor, max_length=first_image_token + 5)


def test_refuses_a_prompt_that_leaves_no_room_for_the_answer(processors, images):
    processor = processors["qwen2-vl"]
    record = make_records(images)[0]
    n = encode_pairs([record], processor, max_length=512).prompt_lengths[0]
    with pytest.raises(VlmtuneError, match=r"record r1: the prompt alone is"):
        encode_pairs([record], processor, max_length=n - 1)


def test_bad_images_name_the_record(processors, images, tmp_path):
    processor = processors["qwen2-vl"]
    missing = PreferenceRecord("gone", [str(tmp_path / "nope.png")], user_prompt("Count."), "a", "b")
    with pytest.raises(VlmtuneError, match=r"record gone: image .*nope.png does not exist"):
        encode_pairs([missing], processor, max_length=256)
    (tmp_path / "junk.png").write_text("not an image")
    junk = PreferenceRecord("junk", [str(tmp_path / "junk.png")], user_prompt("Count."), "a", "b")
    with pytest.raises(VlmtuneError, match=r"record junk: cannot read image"):
        encode_pairs([junk], processor, max_length=256)
    extra = PreferenceRecord("two", [images["square"]] * 2, user_prompt("Count."), "a", "b")
    with pytest.raises(VlmtuneError, match=r"record two: 2 image\(s\) but the prompt has 1"):
        encode_pairs([extra], processor, max_length=256)
    with pytest.raises(VlmtuneError, match="no records"):
        encode_sft([], processor, max_length=256)


def test_text_only_records(processors):
    processor = processors["qwen2-vl"]
    record = PreferenceRecord("t", [], [{"role": "user", "content": "How many cars?"}], "2 cars.", "3 cars.")
    batch = encode_pairs([record], processor, max_length=64)
    assert "pixel_values" not in batch.chosen
    assert labelled_text(processor, batch.chosen, 0) == "2 cars.<|im_end|>"
