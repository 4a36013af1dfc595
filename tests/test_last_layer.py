"""The last decoder layer run only at the read positions, against the full layer's rows."""

from __future__ import annotations

import pytest
import torch

from vlmtune.forward import last_layer
from vlmtune.forward.shared_prefix import CHOSEN, PAD, PROMPT, REJECTED, attention_mask_4d, read_positions
from vlmtune.models.load import add_lora, load_model


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from vlmtune.models.tiny import build_tiny

    return build_tiny("qwen3-vl", tmp_path_factory.mktemp("tiny-qwen3-vl-last-layer"))


def lora_language_model(model_dir, attention="sdpa"):
    model, _ = load_model(model_dir, attn_implementation=attention)
    torch.manual_seed(0)
    model = add_lora(model, rank=4, alpha=8)
    with torch.no_grad():  # non-zero B, so the adapters change the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model, model.get_base_model().model.language_model


def packed_inputs(language_model, seed=0):
    """Two packed rows of different lengths with padding, M-RoPE positions and their 4D mask."""
    g = torch.Generator().manual_seed(seed)
    segments = torch.tensor(
        [[PROMPT] * 9 + [CHOSEN] * 3 + [REJECTED] * 4,
         [PROMPT] * 6 + [CHOSEN] * 2 + [REJECTED] * 2 + [PAD] * 6],
        dtype=torch.int8,
    )
    batch, width = segments.shape
    hidden = language_model.config.hidden_size
    embeds = torch.randn(batch, width, hidden, generator=g, requires_grad=True)
    positions = torch.arange(width).expand(3, batch, width).clone()
    positions[1:, :, 2:6] += torch.randint(0, 3, (2, batch, 4), generator=g)  # image-like rows differ
    return embeds, positions, segments


def read_index(segments):
    """Each row's answer-predicting positions: the prompt's last and every answer position."""
    rows, sources = [], []
    width = segments.shape[1]
    for b, row in enumerate(segments.tolist()):
        prompt = row.count(PROMPT)
        for pos in range(prompt - 1, len(row) - row.count(PAD)):
            rows.append(b)
            sources.append(b * width + pos)
    return read_positions(torch.tensor(sources), torch.tensor(rows), segments.shape), torch.tensor(sources)


def case(model_dir, attention="sdpa"):
    """A LoRA language model, two packed rows, their mask and the positions read from them."""
    model, language_model = lora_language_model(model_dir, attention)
    embeds, positions, segments = packed_inputs(language_model)
    mask = attention_mask_4d(segments, attention, torch.float32)
    (index, read_source), source = read_index(segments)
    return model, language_model, embeds, positions, mask, index, read_source, source


def run(model, language_model, embeds, positions, mask, index=None):
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    if index is None:
        return language_model(**kwargs).last_hidden_state, False
    with last_layer.rows_only(model.get_base_model().model, index) as cut:
        return language_model(**kwargs).last_hidden_state, cut


@pytest.mark.parametrize(
    "fixture, attention",
    [("tiny_model_dir", "sdpa"), ("tiny_model_dir", "eager"), ("tiny_qwen25_dir", "sdpa"), ("qwen3_dir", "sdpa")],
)
def test_rows_equal_full_layer_and_gradients(fixture, attention, request):
    model, language_model, embeds, positions, mask, index, read_source, source = case(
        request.getfixturevalue(fixture), attention
    )
    weight = torch.randn(len(source), language_model.config.hidden_size, generator=torch.Generator().manual_seed(1))

    full, _ = run(model, language_model, embeds, positions, mask)
    full_rows = full.reshape(-1, full.shape[-1])[source]
    grads_full = torch.autograd.grad((full_rows * weight).sum(), [embeds, *trainable(model)])

    cut_out, cut = run(model, language_model, embeds, positions, mask, index)
    assert cut, "the last layer should run on the read rows only for this family"
    assert cut_out.shape[:2] == index.shape
    cut_rows = cut_out.reshape(-1, cut_out.shape[-1])[read_source]
    grads_cut = torch.autograd.grad((cut_rows * weight).sum(), [embeds, *trainable(model)])

    torch.testing.assert_close(cut_rows, full_rows, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_cut, grads_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(language_model.layers[-1]), "the layer is restored after the block"


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_no_mask_is_plain_causal(tiny_model_dir):
    """With no mask the layer is causal; the restricted queries must be too (not causal from the top left)."""
    model, language_model = lora_language_model(tiny_model_dir)
    embeds, positions, _ = packed_inputs(language_model)
    index = torch.tensor([[3, 4, 5, 6], [10, 11, 12, 13]])
    full, _ = run(model, language_model, embeds, positions, None)
    cut_out, cut = run(model, language_model, embeds, positions, None, index)
    assert cut
    expected = full.gather(1, index.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(cut_out, expected, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_keeps_gradients(tiny_model_dir):
    model, language_model, embeds, positions, mask, index, read_source, source = case(tiny_model_dir)
    full, _ = run(model, language_model, embeds, positions, mask)
    grads_full = torch.autograd.grad(full.reshape(-1, full.shape[-1])[source].sum(), trainable(model))

    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cut_out, cut = run(model, language_model, embeds, positions, mask, index)
    assert cut
    grads_cut = torch.autograd.grad(cut_out.reshape(-1, cut_out.shape[-1])[read_source].sum(), trainable(model))
    for a, b in zip(grads_cut, grads_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_hooked_layer_runs_unchanged(tiny_model_dir):
    """A layer whose forward was replaced (accelerate's placement hooks do this) is left alone."""
    model, language_model, embeds, positions, mask, index, _, _ = case(tiny_model_dir)
    layer = language_model.layers[-1]
    layer.forward = layer.forward  # an instance attribute, as a hook leaves it
    out, cut = run(model, language_model, embeds, positions, mask, index)
    assert not cut
    assert out.shape[:2] == embeds.shape[:2]
    assert "forward" in vars(layer)


def test_read_positions_hand_worked():
    """Row 0 reads positions 2..4 of 6, row 1 reads 1 and 3: one window of 3 from each row's first."""
    source = torch.tensor([2, 3, 4, 6 + 1, 6 + 3])
    rows = torch.tensor([0, 0, 0, 1, 1])
    index, read = read_positions(source, rows, (2, 6))
    assert index.tolist() == [[2, 3, 4], [1, 2, 3]]
    assert read.tolist() == [0, 1, 2, 3, 5]


def test_deepstack_after_the_last_layer_is_not_cut(qwen3_dir):
    """Qwen3-VL adds deepstack features after its first layers; if that reaches the last one, no cut."""
    model, _ = lora_language_model(qwen3_dir)
    inner = model.get_base_model().model
    assert last_layer.supported(inner)  # 1 deepstack layer, 2 decoder layers
    inner.config.vision_config.deepstack_visual_indexes = [0, 1]
    assert not last_layer.supported(inner)
