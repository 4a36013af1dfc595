"""Sampling G completions per prompt: ``model.generate(num_return_sequences=G)`` against ``sample_groups``.

    python benchmarks/sampler_speed.py                       # small model, 8 prompts, G 8 and 16, 40 new tokens
    python benchmarks/sampler_speed.py --size tiny --groups 4,8 --device cuda

Rows per G, on the same model, prompts and settings (temperature 1, top-p 1):

- ``generate``: how ``vlmtune.generate`` (and GRPO today) samples: ``model.generate`` with
  ``num_return_sequences=G``, which copies each prompt G times before the prefill;
- ``sample_groups``: ``vlmtune.sampling``: one prefill per prompt, the KV cache copied G ways;
- ``decode floor``: the N*G rows decoded from a ready cache (prompts already prefilled and copied,
  outside the timing): ``max_new_tokens`` one-token forwards of the model and nothing else (no
  sampling, no stop checks, no prefill);
- ``prefill once``: what the floor leaves out and any sampler must do once: encoding the N
  prompts (processor), the vision tower and the prefill, and the G-way copy of the cache.
  ``sample_groups`` can at best take the floor plus this row.

Columns: seconds per call (median of ``--repeats`` rounds, each way once per round), completions per second, vision-tower image
encodings and prompt prefill rows per completion (counted by forward hooks), and the time relative
to the floor. The weights are redrawn larger (seeded), as in ``generate_speed.py``, so answers
depend on the input; a random model rarely emits its stop token, so nearly every completion runs
to ``max_new_tokens`` and both samplers decode the same number of tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from generate_speed import prepare  # the same model, weights and prompts as the generation benchmark

FLOOR_TARGET = 1.3  # sampling within 1.3x of the decode-only floor (issue 14)


class WorkCounter:
    """Images the vision tower encodes and prompt rows the language model prefills (multi-token calls)."""

    def __init__(self, model):
        base = model.model
        self.images = self.prefill_rows = 0
        self.handles = [
            base.visual.register_forward_hook(self._vision, with_kwargs=True),
            base.language_model.register_forward_hook(self._language, with_kwargs=True),
        ]

    def _vision(self, module, args, kwargs, output):
        self.images += len(kwargs["grid_thw"] if "grid_thw" in kwargs else args[1])

    def _language(self, module, args, kwargs, output):
        rows, length = kwargs["inputs_embeds"].shape[:2]
        if length > 1:
            self.prefill_rows += rows

    def close(self):
        for handle in self.handles:
            handle.remove()


def run_generate(model, processor, items, g: int, new_tokens: int) -> int:
    from vlmtune.generate import generate_ids

    ids = generate_ids(model, processor, items, new_tokens, batch_size=len(items), do_sample=True,
                       temperature=1.0, num_return_sequences=g)
    return sum(len(i) for i in ids)


def run_sampler(model, processor, items, g: int, new_tokens: int) -> int:
    from vlmtune.sampling import sample_groups

    samples = sample_groups(model, processor, items, g, new_tokens, temperature=1.0, seed=0)
    return int(samples.mask.sum())


def ready_cache(model, processor, items, g: int):
    """The prompts prefilled once and copied G ways, and what the decode loop feeds: (cache, mask, positions)."""
    import torch

    from vlmtune.generate import encode_prompts
    from vlmtune.sampling.sampler import prompt_positions

    prompts = encode_prompts(items, processor).to(next(model.parameters()).device)
    positions, deltas = prompt_positions(model, prompts)
    with torch.no_grad():
        out = model(**prompts, position_ids=positions, use_cache=True, logits_to_keep=1)
    out.past_key_values.batch_repeat_interleave(g)
    mask = prompts["attention_mask"].repeat_interleave(g, 0)
    return out.past_key_values, mask, mask.sum(1, keepdim=True), deltas.repeat_interleave(g, 0)


def run_prefill(model, processor, items, g: int) -> int:
    """Encode, prefill once and copy the cache G ways; no token is decoded."""
    ready_cache(model, processor, items, g)
    return 0


def run_floor(model, cache, mask, lengths, deltas, new_tokens: int, pad_id: int) -> int:
    """``new_tokens`` one-token forwards of every row from the ready cache (the cache grows; rebuild it per call)."""
    import torch

    rows = mask.shape[0]
    token = torch.full((rows, 1), pad_id, dtype=torch.long, device=mask.device)
    with torch.no_grad():
        for t in range(new_tokens):
            mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
            text = lengths + t
            positions = torch.cat([text[None], (text + deltas)[None].expand(3, -1, -1)])
            model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    return rows * new_tokens


def timed(run, device: str, setup=None) -> tuple[float, int]:
    """``(seconds, tokens)`` of one ``run(*setup())`` (the setup outside the timing)."""
    import torch

    args = setup() if setup else ()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = run(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def rounds(ways: dict, repeats: int, device: str) -> dict[str, tuple[float, int]]:
    """Each way once per round, ``repeats`` rounds (so a busy spell hits every way alike): median seconds, tokens."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for name, (run, setup) in ways.items():
            seconds, tokens[name] = timed(run, device, setup)
            times[name].append(seconds)
    return {name: (statistics.median(times[name]), tokens[name]) for name in ways}


def counted(model, run) -> tuple[int, int]:
    counter = WorkCounter(model)
    try:
        run()
    finally:
        counter.close()
    return counter.images, counter.prefill_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2-vl", choices=("qwen2-vl", "qwen2.5-vl", "qwen3-vl"))
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--groups", default="8,16", help="comma-separated group sizes G")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per row; the median is shown")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads wait on each other)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    groups = [int(g) for g in args.groups.split(",")]
    new = args.max_new_tokens

    with tempfile.TemporaryDirectory() as tmp:
        model, processor, items = prepare(Path(tmp), args.family, args.size, args.prompts, args.device)
        model.eval()
        pad = processor.tokenizer.pad_token_id
        run_sampler(model, processor, items[:2], 2, 2)  # warm-up: first-call costs out of the timing
        run_generate(model, processor, items[:2], 2, 2)
        print(f"{args.family} {args.size}, {len(items)} prompts, {new} new tokens max, temperature 1, "
              f"device {args.device}, {args.threads} thread(s), median of {args.repeats}")
        print(f"{'G':>3}  {'way':<14}  {'s/call':>7}  {'compl/s':>8}  {'tokens':>6}  {'vision/compl':>12}  "
              f"{'prefill/compl':>13}  {'x floor':>7}")
        for g in groups:
            ways = {
                "generate": (lambda: run_generate(model, processor, items, g, new), None),
                "sample_groups": (lambda: run_sampler(model, processor, items, g, new), None),
                "decode floor": (lambda *ready: run_floor(model, *ready, new, pad),
                                 lambda: ready_cache(model, processor, items, g)),
                "prefill once": (lambda: run_prefill(model, processor, items, g), None),
            }
            measured = rounds(ways, args.repeats, args.device)
            work = {name: counted(model, lambda r=run: r(model, processor, items, g, 1))
                    for name, run in (("generate", run_generate), ("sample_groups", run_sampler))}
            rows = [(name, *measured[name], *work.get(name, (0, 0))) for name in ways]
            floor_s, prefill_s = measured["decode floor"][0], measured["prefill once"][0]
            completions = len(items) * g
            for name, seconds, tokens, images, prefills in rows:
                rate = f"{completions / seconds:.1f}" if tokens else "-"
                print(f"{g:>3}  {name:<14}  {seconds:>7.2f}  {rate:>8}  {tokens:>6}  "
                      f"{images / completions:>12.3f}  {prefills / completions:>13.3f}  {seconds / floor_s:>7.2f}")
            gen_s, ours_s = rows[0][1], rows[1][1]
            verdict = "within" if ours_s / floor_s <= FLOOR_TARGET else "outside"
            print(f"G {g}: sample_groups {gen_s / ours_s:.2f}x faster than generate; "
                  f"{ours_s / floor_s:.2f}x the decode floor ({verdict} the {FLOOR_TARGET}x target), "
                  f"{ours_s / (floor_s + prefill_s):.2f}x the floor plus one prefill")
    return 0


if __name__ == "__main__":
    sys.exit(main())
