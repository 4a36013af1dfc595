"""The plain pair forward against a hand loop: one sample at a time, unpadded, per-token sums."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmtune.batch import IGNORE_INDEX, encode_pairs
from vlmtune.data.records import PreferenceRecord, user_prompt
from vlmtune.forward.plain import ForwardStats, plain_pair_logps, sequence_logps


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("forward-images")
    torch.manual_seed(0)
    specs = [
        ("p1", (112, 112), "Count the cars.", "There are 2 cars.", "There are 3 cars, 1 bus."),
        ("p2", (168, 84), "Count the vehicles: cars, buses, bicycles.", "0 cars.", "There are 12 cars."),
        ("p3", (84, 140), "How many?", "There are 4 motorcycles and 1 bicycle.", "None."),
    ]
    out = []
    for rid, size, prompt, chosen, rejected in specs:
        path = folder / f"{rid}.png"
        pixels = (torch.rand(size[1], size[0], 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(path)
        out.append(PreferenceRecord(rid, [str(path)], user_prompt(prompt), chosen, rejected))
    return out


def hand_logps(model, inputs):
    """Per sample, unpadded: sum over answer tokens t of log_softmax(logits[t - 1])[token t], in float64."""
    patch_counts = [int(g.prod()) for g in inputs["image_grid_thw"]]
    pixel_chunks = torch.split(inputs["pixel_values"], patch_counts)
    totals, counts = [], []
    for row in range(inputs["input_ids"].shape[0]):
        n = int(inputs["attention_mask"][row].sum())
        ids = inputs["input_ids"][row, :n].unsqueeze(0)
        logits = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixel_chunks[row],
            image_grid_thw=inputs["image_grid_thw"][row : row + 1],
            mm_token_type_ids=inputs["mm_token_type_ids"][row, :n].unsqueeze(0),
        ).logits[0]
        labels = inputs["labels"][row, :n]
        total, count = 0.0, 0
        for t in range(1, n):
            if labels[t] != IGNORE_INDEX:
                total += torch.log_softmax(logits[t - 1].double(), dim=-1)[labels[t]].item()
                count += 1
        totals.append(total)
        counts.append(count)
    return torch.tensor(totals, dtype=torch.float64), torch.tensor(counts)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from vlmtune.models.tiny import build_tiny

    return build_tiny("qwen3-vl", tmp_path_factory.mktemp("tiny-qwen3-vl-forward"))


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen25_dir", "qwen3_dir"])
def test_sequence_logps_equals_hand_loop(fixture, records, request):
    from vlmtune.models.load import load_model

    model, processor = load_model(request.getfixturevalue(fixture))
    model.eval()
    batch = encode_pairs(records, processor, max_length=256)
    with torch.no_grad():
        for inputs in (batch.chosen, batch.rejected):
            logps, n_tokens = sequence_logps(model, inputs)
            expected, expected_counts = hand_logps(model, inputs)
            assert torch.equal(n_tokens, expected_counts)
            torch.testing.assert_close(logps.double(), expected, atol=1e-5, rtol=1e-6)


def test_plain_pair_logps_against_hand_loop_and_stats(tiny_model_dir, records):
    from vlmtune.models.load import load_model

    model, processor = load_model(tiny_model_dir)
    batch = encode_pairs(records, processor, max_length=256)
    stats = ForwardStats()
    result = plain_pair_logps(model, batch, stats)
    with torch.no_grad():  # independently: each row alone, unpadded, its full logits gathered by hand
        for side in ("chosen", "rejected"):
            expected, expected_counts = hand_logps(model, getattr(batch, side))
            torch.testing.assert_close(getattr(result, side).detach().double(), expected, atol=1e-5, rtol=1e-6)
            assert torch.equal(getattr(result, f"{side}_tokens"), expected_counts)
    assert not torch.allclose(result.chosen, result.rejected)  # two different answers, two different values

    n_answer = int(result.chosen_tokens.sum() + result.rejected_tokens.sum())
    assert stats.passes == 2
    assert stats.images_encoded == 6  # each pair's image encoded twice by the plain path
    assert stats.answer_tokens == n_answer
    assert stats.prompt_tokens == 2 * sum(batch.prompt_lengths)

    # Gradients reach the language model through the summed log-probabilities.
    (result.chosen - result.rejected).sum().backward()
    grad = model.model.language_model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_real_photos_fit_the_tiny_budget(tiny_model_dir, shared_data):
    """640 px traffic photos go through the tiny processor's max_pixels: 16 image tokens each."""
    from vlmtune.models.load import load_model

    photos = sorted((shared_data / "highway-od-40" / "test" / "images").glob("*.jpg"))[:2]
    records = [
        PreferenceRecord(f"real{i}", [str(p)], user_prompt("Count the vehicles."), "There are 3 cars.", "0 cars.")
        for i, p in enumerate(photos)
    ]
    model, processor = load_model(tiny_model_dir)
    batch = encode_pairs(records, processor, max_length=128)
    assert batch.chosen["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    with torch.no_grad():
        result = plain_pair_logps(model, batch)
    assert torch.isfinite(result.chosen).all() and torch.isfinite(result.rejected).all()
