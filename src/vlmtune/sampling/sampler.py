"""Sample G completions per prompt with one image encoding and one prompt prefill per prompt.

``model.generate(num_return_sequences=G)`` copies every prompt G times before its first forward,
so each prompt runs through the language model G times (transformers 5 already encodes each
image once there and copies its features). ``sample_groups`` runs both once per prompt and
shares the result:

1. **Prefill**: the N prompts are encoded as ``vlmtune.generate`` encodes them (chat template,
   left padding) and run through the model in one forward with the KV cache on: the vision tower
   sees each image once, the language model each prompt token once.
2. **Copy**: the cache (``DynamicCache.batch_repeat_interleave``), the attention mask, the
   prompt's length and its M-RoPE offset (``rope_deltas``: how far the 3D positions after the
   image run ahead of the token count) are repeated G times along the batch, a prompt's copies
   together; the prefill's last logits too, so the G first tokens are drawn from them.
3. **Decode**: every running row advances one token per forward. Positions are those ``model.generate``
   gives: the text row counts real tokens, the three M-RoPE rows add ``rope_deltas`` to it.
   Each step's logits are processed as ``model.generate`` processes them (float32; vision special
   tokens set to -inf, as ``suppress_tokens`` does; then temperature and top-p, or argmax when
   greedy). A row that emits a stop token (``vlmtune.generate``'s set: the model's EOS ids,
   ``<|im_end|>``, the pad id) is finished and leaves the batch (its cache rows are dropped:
   ``model.generate`` would keep decoding it on padding). The loop ends when every row is
   finished or after ``max_new_tokens``.

Log-probs: for every sampled token, ``log_softmax(logits / temperature)`` in float32 at that
token, from the same forward that sampled it: the distribution the GRPO update pass
(``vlmtune.forward.group``) scores completions with (temperature-scaled, neither top-p's truncation
nor the suppression applied), so they serve as the "old" log-probs of a clipped ratio.

Randomness comes only from a ``torch.Generator`` seeded with ``seed`` on the model's device: the
same call gives the same samples, whatever else used torch's global generator before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from vlmtune.errors import VlmtuneError
from vlmtune.forward.inner import unwrap
from vlmtune.generate import Item, encode_prompts, stop_token_ids, vision_token_ids
from vlmtune.models.load import eval_mode

if TYPE_CHECKING:
    import torch
    from transformers import BatchFeature


@dataclass
class GroupSamples:
    """G completions for each of N prompts, a prompt's G rows together (row ``i * G + j``).

    ``prompts``: the processor's left-padded batch of the N prompts, on the CPU, as encoded for
    the prefill (what ``vlmtune.forward.group.build_group_batch`` takes). ``ids``: ``(N*G, T)`` new
    tokens, right-padded with ``pad_id``; a completion runs up to and including its stop token.
    ``mask``: 1 on a completion's tokens (its stop token included). ``logps``: ``(N*G, T)``
    float32 log-probs of those tokens (see the module docstring), 0 on padding. ``stopped``:
    ``(N*G,)`` True where the completion ended with a stop token, False where it ran into
    ``max_new_tokens``. ``texts``: each completion decoded without special tokens, stripped.
    """

    prompts: BatchFeature
    ids: torch.Tensor
    mask: torch.Tensor
    logps: torch.Tensor
    stopped: torch.Tensor
    texts: list[str]
    group_size: int
    pad_id: int

    def completions(self) -> list[list[int]]:
        """Each completion's token ids up to and including its stop token (GRPO's convention)."""
        lengths = self.mask.sum(1).tolist()
        return [row[:n] for row, n in zip(self.ids.tolist(), lengths)]

    def answers(self) -> list[list[int]]:
        """Each completion's token ids without its stop token (``vlmtune.generate.generate_ids``'s convention)."""
        return [c[:-1] if stopped else c for c, stopped in zip(self.completions(), self.stopped.tolist())]

    def __len__(self) -> int:
        return self.ids.shape[0]


@dataclass(frozen=True)
class _Decoding:
    """How each next token is chosen, and what ends a completion."""

    greedy: bool
    temperature: float
    top_p: float
    suppress: torch.Tensor  # (V,) bool: vision special tokens
    stop: torch.Tensor  # (k,) stop token ids
    pad_id: int


def sample_groups(
    model,
    processor,
    items: Sequence[Item],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    greedy: bool = False,
) -> GroupSamples:
    """``group_size`` completions for each item, one image encoding and one prefill per item.

    ``items`` are ``(images, prompt_messages)`` as in ``vlmtune.generate``; all of them form one
    batch. Sampling uses ``temperature`` and ``top_p`` (no top-k); ``greedy`` takes the argmax
    instead (then the G rows of an item are equal, and ``temperature`` only scales the log-probs).
    """
    import torch

    _check(items, group_size, max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    prompts = encode_prompts(items, processor)
    decoding = _Decoding(
        greedy=greedy,
        temperature=float(temperature),
        top_p=float(top_p),
        suppress=_suppress_mask(model, processor, device),
        stop=torch.tensor(sorted(stop_token_ids(model, processor)), device=device),
        pad_id=tokenizer.pad_token_id,
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    on_device = {name: value.to(device) for name, value in prompts.items()}  # BatchFeature.to moves in place
    with eval_mode(model), torch.no_grad():
        ids, logps, lengths, stopped = _sample(model, on_device, group_size, max_new_tokens, decoding, generator)
    ids, logps, lengths, stopped = ids.cpu(), logps.cpu(), lengths.cpu(), stopped.cpu()
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(ids.tolist(), lengths.tolist())]
    return GroupSamples(prompts, ids, mask, logps, stopped, texts, group_size, decoding.pad_id)



def sample_answers(model, processor, items: Sequence[Item], num_samples: int, max_new_tokens: int,
                   temperature: float, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                   progress: str | None = None) -> list[str]:
    """``num_samples`` sampled answer texts per item (an item's together), ``batch_size`` items per
    ``sample_groups`` call, each call seeded ``seed`` + the position of its first item."""
    from vlmtune.progress import progress_bar

    answers: list[str] = []
    with progress_bar(total=len(items), desc=progress or "", enabled=None if progress else False) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            samples = sample_groups(model, processor, batch, num_samples, max_new_tokens, temperature, top_p,
                                    seed=seed + start)
            answers += [processor.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in samples.answers()]
            bar.update(len(batch))
    return answers

def _check(items, group_size: int, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not items:
        raise VlmtuneError("no prompts to sample from: the batch is empty")
    if group_size < 1 or max_new_tokens < 1:
        raise VlmtuneError(
            f"group size ({group_size}) and max new tokens ({max_new_tokens}) must both be at least 1"
        )
    if not temperature > 0:
        raise VlmtuneError(f"temperature must be > 0 (got {temperature}); for greedy decoding pass greedy=True")
    if not 0 < top_p <= 1:
        raise VlmtuneError(f"top_p must be in (0, 1] (got {top_p})")


def _sample(model, prompts, group_size: int, max_new_tokens: int, decoding: _Decoding, generator):
    """Prefill, copy G ways, decode: ``(ids, logps, lengths, stopped)`` of the N*G rows."""
    import torch

    positions, rope_deltas = prompt_positions(model, prompts)
    out = model(
        input_ids=prompts["input_ids"],
        attention_mask=prompts["attention_mask"],
        position_ids=positions,
        mm_token_type_ids=prompts.get("mm_token_type_ids"),
        pixel_values=prompts.get("pixel_values"),
        image_grid_thw=prompts.get("image_grid_thw"),
        use_cache=True,
        logits_to_keep=1,
    )
    out.past_key_values.batch_repeat_interleave(group_size)
    state = _Rows(
        index=torch.arange(len(prompts["input_ids"]) * group_size, device=out.logits.device),
        attention=prompts["attention_mask"].repeat_interleave(group_size, dim=0),
        rope_deltas=rope_deltas.to(out.logits.device).repeat_interleave(group_size, dim=0),
        cache=out.past_key_values,
    )
    logits = out.logits[:, -1].float().repeat_interleave(group_size, dim=0)
    return _decode(model, state, logits, max_new_tokens, decoding, generator)


@dataclass
class _Rows:
    """The rows still decoding: their numbers among the N*G, attention mask, M-RoPE offsets, KV cache."""

    index: torch.Tensor  # (A,)
    attention: torch.Tensor  # (A, P + t)
    rope_deltas: torch.Tensor  # (A, 1)
    cache: object

    def keep(self, keep: torch.Tensor) -> None:
        """Drop every row not in ``keep`` (positions among the current rows)."""
        self.index, self.attention, self.rope_deltas = self.index[keep], self.attention[keep], self.rope_deltas[keep]
        self.cache.batch_select_indices(keep)


def _decode(model, rows: _Rows, logits, max_new_tokens: int, decoding: _Decoding, generator):
    """Draw one token per running row from ``logits``, drop the rows that stopped, run the rest one step."""
    import torch

    n, device = len(rows.index), logits.device
    ids = torch.full((n, max_new_tokens), decoding.pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        token, token_logp = next_token(logits, decoding, generator)
        ids[rows.index, t], logps[rows.index, t], lengths[rows.index] = token, token_logp, t + 1
        done = torch.isin(token, decoding.stop)
        stopped[rows.index[done]] = True
        if t + 1 == max_new_tokens or bool(done.all()):
            break
        if bool(done.any()):
            # A finished row is dropped from the batch (model.generate would keep feeding it padding).
            keep = (~done).nonzero().squeeze(1)
            rows.keep(keep)
            token = token[keep]
        rows.attention = torch.cat([rows.attention, rows.attention.new_ones((len(token), 1))], dim=1)
        text = rows.attention.sum(1, keepdim=True) - 1  # the new token's text position
        out = model(
            input_ids=token[:, None],
            attention_mask=rows.attention,
            position_ids=torch.cat([text[None], (text + rows.rope_deltas)[None].expand(3, -1, -1)]),
            past_key_values=rows.cache,
            use_cache=True,
        )
        rows.cache = out.past_key_values
        logits = out.logits[:, -1].float()
    width = int(lengths.max())
    return ids[:, :width], logps[:, :width], lengths, stopped


def prompt_positions(model, prompts):
    """Position ids ``(4, N, P)`` of the left-padded prompts, as ``model.generate`` gives them, and ``rope_deltas``.

    Row 0 counts real tokens (0 on padding); rows 1-3 are the M-RoPE positions of
    ``get_rope_index`` (text-only prompts: the text row three times). ``rope_deltas`` ``(N, 1)``:
    the position after the prompt minus its token count, the offset every later token keeps.
    """
    import torch

    mask = prompts["attention_mask"]
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if prompts.get("image_grid_thw") is None:
        return torch.cat([text[None], text[None].expand(3, -1, -1)]), torch.zeros_like(text[:, :1])
    rope, deltas = unwrap(model).model.get_rope_index(
        prompts["input_ids"],
        mm_token_type_ids=prompts["mm_token_type_ids"],
        image_grid_thw=prompts["image_grid_thw"],
        attention_mask=mask,
    )
    return torch.cat([text[None], rope.to(text.dtype)]), deltas.to(text.device, text.dtype)


def next_token(logits, decoding: _Decoding, generator):
    """``(tokens, logps)``: the next token of each row and its log-prob under ``logits / temperature``.

    ``logits``: ``(R, V)`` float32, raw. The token is chosen from the processed logits (vision
    tokens suppressed, then temperature and top-p as ``model.generate`` applies them); its log-prob
    is read from the raw ones, as the update pass computes it.
    """
    import torch

    scores = logits.masked_fill(decoding.suppress, float("-inf"))
    if decoding.greedy:
        token = scores.argmax(-1)
    else:
        if decoding.temperature != 1.0:
            scores = scores / decoding.temperature
        if decoding.top_p < 1.0:
            scores = top_p_filter(scores, decoding.top_p)
        token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
    logp = torch.log_softmax(logits / decoding.temperature, dim=-1).gather(1, token[:, None]).squeeze(1)
    return token, logp


def top_p_filter(scores, top_p: float):
    """Nucleus filtering exactly as transformers' ``TopPLogitsWarper`` (keeps at least one token).

    The smallest-probability tokens whose cumulative probability stays at or below ``1 - top_p``
    are set to -inf; the rest (the nucleus) keep their scores.
    """
    sorted_scores, order = scores.sort(dim=-1, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def _suppress_mask(model, processor, device):
    import torch

    vocab = unwrap(model).get_output_embeddings().out_features
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[vision_token_ids(model, processor)] = True
    return mask
