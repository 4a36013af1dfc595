"""Diagnose the reasoning demo's ceiling: does SFT on gold answers learn the visual families?

    python experiments/reasoning_ceiling.py OUT key=value ...
    e.g. warmup_vision=true warmup_steps=600 warmup_lr=3e-3 image_size=224 size='"tiny"'

One SFT run from the random tiny model on the gold answers of ``warmup_families`` (train split),
evaluated greedily on the VALIDATION split only, beside the majority answer per question type
(from the train file) and the same model shown a blank image (``vlmtune.eval.run.evaluate``'s
baselines). Prints per-family accuracy for the three and appends one JSON line to
``experiments/reasoning_ceiling.jsonl``. The test split is not read.

Keys: every :class:`vlmtune.demo_reasoning.ReasoningSettings` field (``image_size``,
``count_range``, ``n_scenes``, ``warmup_*``, ``batch_size``, ``lora_*``, ...), plus ``size`` (the
tiny model size, default "tiny") and ``eval_families`` (default: ``warmup_families``). The model's
patch grid follows ``image_size`` (``image_size // 14`` patches a side: the image is seen whole).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from vlmtune.demo import train_config, train_run
from vlmtune.demo_reasoning import ReasoningSettings, make_scenes, make_tasks, warmup_file
from vlmtune.stages import Made, run_stage, stage_key

EXTRA = {"size": "tiny", "eval_families": None}


def parse(pairs: list[str]) -> tuple[dict, dict]:
    names = {f.name for f in fields(ReasoningSettings)}
    settings, extra = {}, dict(EXTRA)
    for pair in pairs:
        key, value = pair.split("=", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        parsed = tuple(parsed) if isinstance(parsed, list) else parsed
        if key in names:
            settings[key] = parsed
        elif key in extra:
            extra[key] = parsed
        else:
            raise SystemExit(f"unknown key {key!r}")
    return settings, extra


def model_for(s: ReasoningSettings, size: str) -> Made:
    from vlmtune.models.tiny import build_tiny

    base = s.out / "model"
    settings = {"family": s.family, "size": size, "seed": s.seed, "image_size": s.image_size}
    run_stage(base / "stage.json", settings, [base],
              lambda: build_tiny(s.family, base, size=size, seed=s.seed, image_patches=s.image_size // 14))
    return Made(base, stage_key(settings))


def main() -> None:
    from vlmtune.data.formats import read_records
    from vlmtune.eval.run import evaluate, load_for_eval

    out, (overrides, extra) = Path(sys.argv[1]), parse(sys.argv[2:])
    s = replace(ReasoningSettings(out=out, eval_split="val", think=False), **overrides)
    start = time.perf_counter()
    scenes = make_scenes(s)
    tasks = make_tasks(s, scenes, think=False)
    base = model_for(s, extra["size"])
    warm_data = warmup_file(s, tasks)
    cfg = train_config(s, base.path, warm_data.path, s.out / "runs" / "ceiling", "sft", steps=s.warmup_steps,
                       lr=s.warmup_lr, batch_size=s.batch_size, lora=False)
    model, wall = train_run(cfg, {"model": base.key, "data": warm_data.key})
    families = extra["eval_families"] or s.warmup_families
    val = [r for r in read_records(tasks[0] / "val.jsonl") if r.metadata["task"]["family"] in families]
    train = read_records(tasks[0] / "train.jsonl")
    loaded, processor = load_for_eval(model.path)
    metrics = evaluate(loaded, processor, val, s.out / "eval" / "val", batch_size=64, max_new_tokens=32,
                       max_length=256, train_records=train, blank_baseline=True)
    rows = []
    for fam in ["all", *sorted(families)]:
        key = "task/accuracy" if fam == "all" else f"family/{fam}/accuracy"
        got = [metrics.get(p + key, {}).get("value", float("nan")) for p in ("", "baseline/majority/", "baseline/blank/")]
        n = metrics.get(key, {}).get("n", 0)
        rows.append({"family": fam, "n": n, "model": got[0], "majority": got[1], "blank": got[2]})
    total = time.perf_counter() - start
    print(f"{'family':12s} {'n':>5s} {'model':>7s} {'majority':>9s} {'blank':>7s}")
    for r in rows:
        print(f"{r['family']:12s} {r['n']:5d} {100 * r['model']:7.1f} {100 * r['majority']:9.1f} {100 * r['blank']:7.1f}")
    print(f"train wall {wall:.0f} s, total {total:.0f} s")
    with open(Path(__file__).with_name("reasoning_ceiling.jsonl"), "a") as f:
        f.write(json.dumps({"out": str(out), "overrides": overrides, **extra, "train_wall_s": wall,
                            "total_s": total, "val": rows}) + "\n")


if __name__ == "__main__":
    main()
