"""Batched generation with the KV cache and left padding; vision special tokens never generated.

An item is ``(images, prompt_messages)``: image paths (or PIL images) filling the prompt's
``{"type": "image"}`` slots in order, and the chat messages of the prompt. The model's own chat
template renders each prompt with the assistant's turn opened, the processor pads the batch on
the LEFT (so every row's last token is its last prompt token and new tokens line up; asked for in
the call, the shared tokenizer's own ``padding_side`` is left as it is), and ``model.generate``
decodes with the cache.

An answer ends at its first stop token (``stop_token_ids``: the generation config's EOS ids and
``<|im_end|>``). ``before_stop`` keeps the tokens before it (the answer's text, as ``generate``
returns it); ``through_stop`` keeps the stop token too (what GRPO scores: the decision to stop).

The vision special tokens (``<|image_pad|>``, ``<|vision_start|>``, ...) are suppressed at every
step (``suppress_tokens``: their logits are set to -inf). A sampled ``<|image_pad|>`` would
otherwise break any later pass over the answer: the processor's count of image tokens would no
longer match the images.
"""

from __future__ import annotations

from typing import Any, Sequence

from vlmtune.batch import open_image
from vlmtune.errors import VlmtuneError
from vlmtune.models.load import eval_mode

# Token strings that only the processor may place in a sequence.
VISION_TOKENS = (
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
VISION_CONFIG_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")

Item = tuple[Sequence[Any], list[dict[str, Any]]]


def vision_token_ids(model, processor) -> list[int]:
    """Ids of every vision special token the tokenizer or the model config knows."""
    tokenizer = processor.tokenizer
    ids = set()
    for token in VISION_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.add(int(token_id))
    for name in VISION_CONFIG_IDS:
        token_id = getattr(model.config, name, None)
        if isinstance(token_id, int):
            ids.add(token_id)
    return sorted(ids)


def generate(
    model,
    processor,
    items: Sequence[Item],
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    num_return_sequences: int = 1,
    progress: str | None = None,
) -> list[str]:
    """Answer every item; returns ``len(items) * num_return_sequences`` texts, an item's together.

    Greedy by default (then batched and one-at-a-time outputs are the same). With
    ``do_sample``, ``seed`` seeds torch's global generator once, before the first batch.
    ``progress`` labels a progress bar over the items (None: no bar).
    """
    ids = generate_ids(model, processor, items, max_new_tokens, batch_size, do_sample, temperature,
                       top_p, seed, num_return_sequences, progress)
    return answer_texts(processor, ids)


def answer_texts(processor, ids: Sequence[Sequence[int]]) -> list[str]:
    """The text of each answer's new token ids, as :func:`generate` returns it."""
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def generate_ids(
    model,
    processor,
    items: Sequence[Item],
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    num_return_sequences: int = 1,
    progress: str | None = None,
) -> list[list[int]]:
    """Like :func:`generate` but the new token ids of each answer (stop and pad tokens removed).

    ``progress``: the label of a progress bar over the prompts (:mod:`vlmtune.progress`); None: no bar.
    """
    import torch

    from vlmtune.progress import progress_bar

    if batch_size < 1 or max_new_tokens < 1 or num_return_sequences < 1:
        raise VlmtuneError("batch size, max new tokens and number of samples must all be at least 1")
    if not do_sample and num_return_sequences > 1:
        raise VlmtuneError("several answers per prompt need sampling: set a temperature > 0 (do_sample)")
    if do_sample:
        torch.manual_seed(seed)
    # Rows that stopped early are filled with padding; a padding token also ends an answer.
    stop = stop_token_ids(model, processor) | {processor.tokenizer.pad_token_id}
    options = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_return_sequences,
        suppress_tokens=vision_token_ids(model, processor),
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # a checkpoint's sampling defaults would only produce warnings under greedy decoding
        options.update(temperature=None, top_p=None, top_k=None)
    out: list[list[int]] = []
    device = next(model.parameters()).device
    bar = progress_bar(total=len(items), desc=progress or "", enabled=None if progress else False)
    with bar, eval_mode(model), torch.inference_mode():
        for start in range(0, len(items), batch_size):
            inputs = encode_prompts(items[start : start + batch_size], processor, first=start).to(device)
            generated = model.generate(**inputs, **options)
            new = generated[:, inputs["input_ids"].shape[1] :].tolist()
            out.extend(before_stop(row, stop) for row in new)
            bar.update(len(new) // num_return_sequences)
    return out


def encode_prompts(items: Sequence[Item], processor, first: int = 0):
    """The processor's batch for ``items``, padded on the left: chat template with the generation
    prompt, images opened. ``first`` is the position of ``items[0]`` in the caller's list (messages
    name an item by it)."""
    texts, images = [], []
    for position, (item_images, messages) in enumerate(items, start=first):
        slots = sum(1 for m in messages for p in _parts(m) if p.get("type") == "image")
        if slots != len(item_images):
            raise VlmtuneError(
                f"item {position}: {len(item_images)} image(s) but the prompt has {slots} image slot(s); make them match"
            )
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        images.extend(open_image(i, f"item {position}") for i in item_images)
    return processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")


def stop_token_ids(model, processor) -> set[int]:
    """The ids that end an answer: the generation config's EOS ids and ``<|im_end|>``."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos])
    ids.add(processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    ids.discard(None)
    return ids


def before_stop(row: list[int], stop: set[int]) -> list[int]:
    """The tokens before the first stop token, the stop token left out (all of them when none is there)."""
    for i, token in enumerate(row):
        if token in stop:
            return row[:i]
    return row


def through_stop(row: list[int], stop: set[int]) -> list[int]:
    """The tokens up to and including the first stop token (all of them when none is there)."""
    for i, token in enumerate(row):
        if token in stop:
            return row[: i + 1]
    return row


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content or [])
