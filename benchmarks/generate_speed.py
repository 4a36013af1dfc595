"""Batched generation against one record at a time, on the same tiny model and data.

    python benchmarks/generate_speed.py                    # 64 records, batch sizes 1, 4, 16, 32
    python benchmarks/generate_speed.py --n 128 --size small --device cuda

One record at a time is how the seed project answered (one ``generate`` call per image); batched
runs pad on the left and decode with the KV cache. Greedy answers must be identical token for
token at every batch size (asserted). Target: >= 5x the records/s at batch 16 on the tiny model.

A freshly initialised model gives near-uniform logits and repeats one token whatever it sees,
which would make "identical answers" trivially true; the weights are redrawn larger (seeded)
so that answers depend on the image and the prompt.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 5.0


def prepare(work: Path, family: str, size: str, n: int, device: str):
    import torch

    from vlmtune.data.formats import read_records
    from vlmtune.data.records import user_prompt
    from vlmtune.data.synth import synth_pairs_file
    from vlmtune.models.load import load_model
    from vlmtune.models.tiny import build_tiny, image_side

    model_dir = build_tiny(family, work / "model", size=size, seed=0)
    pairs = synth_pairs_file(work / "data", n_images=n, seed=0, image_size=image_side(family, size))
    records = read_records(pairs)[:n]
    model, processor = load_model(model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1 if "visual" in name else 0.3)
    model.to(device)
    # Two prompt wordings, so that batches mix prompt lengths and left padding is exercised.
    prompts = ["Count the vehicles.", "Please count the number of vehicles you see in the image."]
    items = [(r.images, user_prompt(prompts[i % 2])) for i, r in enumerate(records)]
    return model, processor, items


def timed(model, processor, items, max_new_tokens: int, batch_size: int):
    import torch

    from vlmtune.generate import generate_ids

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    ids = generate_ids(model, processor, items, max_new_tokens, batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return ids, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="records (default 64)")
    parser.add_argument("--family", default="qwen2-vl", choices=("qwen2-vl", "qwen2.5-vl", "qwen3-vl"))
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-sizes", default="1,4,16,32", help="comma-separated; 1 is the baseline")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    sizes = sorted({int(b) for b in args.batch_sizes.split(",")} | {1})

    from vlmtune.generate import generate_ids

    with tempfile.TemporaryDirectory() as tmp:
        model, processor, items = prepare(Path(tmp), args.family, args.size, args.n, args.device)
        generate_ids(model, processor, items[:2], 2, 2)  # warm-up: first-call costs out of the timing
        results = {b: timed(model, processor, items, args.max_new_tokens, b) for b in sizes}

    baseline_ids, baseline_s = results[1]
    distinct = len({tuple(a) for a in baseline_ids})
    print(f"{args.family} {args.size}, {len(items)} records, {args.max_new_tokens} new tokens max, "
          f"device {args.device}; {distinct} distinct greedy answers")
    print(f"{'batch':>5}  {'seconds':>8}  {'records/s':>9}  {'x one-at-a-time':>15}  {'answers identical':>17}")
    ok = True
    for b in sizes:
        ids, seconds = results[b]
        same = ids == baseline_ids
        ok &= same
        print(f"{b:>5}  {seconds:>8.2f}  {len(items) / seconds:>9.1f}  {baseline_s / seconds:>15.2f}  {str(same):>17}")
    assert ok, "batched greedy answers differ from one-at-a-time answers"
    if 16 in results:
        ratio = baseline_s / results[16][1]
        verdict = "meets" if ratio >= TARGET_RATIO else "misses"
        print(f"batch 16: {ratio:.1f}x one-at-a-time ({verdict} the {TARGET_RATIO:.0f}x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
