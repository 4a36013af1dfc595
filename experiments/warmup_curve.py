"""How fast does the tiny Qwen2-VL learn to count synthetic scenes? EM on held-out scenes vs SFT steps.

Used to pick the demo's warm-up length and learning rate (docs/learning.md has the numbers).
A plain loop over the library's own pieces (encode_sft, sequence_logps, generate, the counting
task), with each batch encoded once, so that many settings fit in a few CPU minutes.

    python experiments/warmup_curve.py --steps 600 --lr 3e-3 --layout grid
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from vlmtune.batch import encode_sft
from vlmtune.data.synth import generate_scenes, scene_items
from vlmtune.demo import PROMPT, gold_record
from vlmtune.forward.plain import sequence_logps
from vlmtune.generate import generate
from vlmtune.models.load import load_model
from vlmtune.models.tiny import build_tiny
from vlmtune.tasks.counting import DEFAULT_CLASSES, CountingTask


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("/tmp/warmup-curve"))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=150)
    p.add_argument("--layout", default="grid")
    p.add_argument("--max-count", type=int, default=3)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    task = CountingTask(DEFAULT_CLASSES)
    cr = (0, a.max_count)
    train_dir = generate_scenes(a.out / f"train-{a.layout}-{a.max_count}", a.n_train, seed=1, image_size=a.image_size,
                                layout=a.layout, count_range=cr)
    test_dir = generate_scenes(a.out / f"test-{a.layout}-{a.max_count}", a.n_test, seed=3, image_size=a.image_size,
                               layout=a.layout, count_range=cr)
    train = [gold_record(str(i), it, task) for i, it in enumerate(scene_items(train_dir))]
    test = [gold_record(str(i), it, task) for i, it in enumerate(scene_items(test_dir))]
    model_dir = build_tiny("qwen2-vl", a.out / "model", seed=a.seed)
    model, proc = load_model(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    cache = {}
    n_batches = len(train) // a.batch
    g = torch.Generator().manual_seed(a.seed)
    order = torch.randperm(len(train), generator=g).tolist()
    start = time.time()
    for step in range(1, a.steps + 1):
        k = (step - 1) % n_batches
        if k not in cache:
            cache[k] = encode_sft([train[i] for i in order[k * a.batch:(k + 1) * a.batch]], proc, 256)
        logps, n = sequence_logps(model, cache[k])
        loss = -(logps / n).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % a.eval_every == 0:
            answers = generate(model, proc, [(r.images, r.prompt) for r in test], 32, 64)
            scores = [task.score(task.parse(t), r.metadata["counts"]) for t, r in zip(answers, test)]
            em = sum(s.exact for s in scores) / len(scores)
            per = {c: sum(s.hits[c] for s in scores) / len(scores) for c in task.classes}
            print(f"step {step:4d} loss {loss.item():.3f} EM {100 * em:5.1f} "
                  + " ".join(f"{c[:4]} {100 * v:3.0f}" for c, v in per.items())
                  + f"  {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
