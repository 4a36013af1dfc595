"""Preference-stage set-ups of the demo, scored on a validation split (never the test split).

Each call runs one set-up through the demo's own stage functions (``vlmtune.demo``): the data,
the tiny model and the warm-up are shared by every set-up with the same data/warm-up settings
(a folder per warm-up), the rater's pairs by every set-up with the same sampling settings (a file
per sampling set-up), and the preference run is its own. One JSON line per set-up is appended to
``--log``: the settings that differ from the demo's defaults, the method, the pair statistics and
the validation / OOD exact match before and after.

    python experiments/pref_sweep.py --name dpop-lr3e-3 --set pref_lr=3e-3 \\
        --method '{"name": "dpop", "algo": "dpo", "loss": {"name": "dpop", "beta": 0.1, "dpop_lambda": 50}}'
"""

import argparse
import hashlib
import json
import os
from dataclasses import asdict, fields, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlmtune.demo import (DemoSettings, Method, evaluate_run, make_data, make_model, metric,
                        train_config, train_run)
from vlmtune.demo_rater import rater_pairs
from vlmtune.stages import Made, stage_key

WARMUP_KEYS = ("seed", "family", "image_size", "layout", "count_range", "ood_count_range", "n_sft", "n_pref",
               "n_test", "n_ood", "warmup_steps", "warmup_lr", "batch_size", "warmup_vision")
PAIR_KEYS = ("samples_per_image", "temperature", "rater_noise", "max_new_tokens")


def key(s: DemoSettings, names: tuple[str, ...]) -> str:
    text = json.dumps({n: getattr(s, n) for n in names}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, default=Path("/tmp/exp/sweep"))
    p.add_argument("--log", type=Path, default=Path(__file__).with_name("pref_sweep.jsonl"))
    p.add_argument("--name", required=True)
    p.add_argument("--set", action="append", default=[], help="DemoSettings field=value (JSON value)")
    p.add_argument("--method", required=True, help="Method fields as JSON")
    a = p.parse_args()

    overrides = {}
    for item in a.set:
        name, _, value = item.partition("=")
        overrides[name] = parse_value(value)
    for name in ("count_range", "ood_count_range"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    valid = {f.name for f in fields(DemoSettings)}
    unknown = set(overrides) - valid
    if unknown:
        raise SystemExit(f"unknown settings: {unknown}")
    s = replace(DemoSettings(), eval_split="val", **overrides)
    method = Method(**json.loads(a.method))

    root = a.root / key(s, WARMUP_KEYS)
    s = replace(s, out=root)
    paths = make_data(s)
    base = make_model(s.out, s.family, s.seed)
    warm_cfg = train_config(s, base.path, paths["sft"].path, root / "runs" / "warmup", "sft", steps=s.warmup_steps,
                            lr=s.warmup_lr, batch_size=s.batch_size, lora=False)
    warm, warm_wall = train_run(warm_cfg, {"model": base.key, "data": paths["sft"].key})
    before = {sp: evaluate_run(warm, None, paths[sp], root / "eval" / "warmup" / sp) for sp in ("val", "ood")}

    pairs_path = root / "pairs" / f"{key(s, PAIR_KEYS)}.jsonl"
    stats_path = pairs_path.with_suffix(".stats.json")
    if not stats_path.exists():
        pairs_path.parent.mkdir(parents=True, exist_ok=True)
        stats_path.write_text(json.dumps(rater_pairs(warm.path, paths["pref_prompts"].path, pairs_path, s)))
    stats = json.loads(stats_path.read_text())
    pairs = Made(pairs_path, stage_key({"pairs": pairs_path.name, "model": warm.key}))

    run_dir = root / "runs" / a.name
    steps = method.steps or s.pref_steps
    data = paths["pref_prompts"] if method.algo == "grpo" else pairs
    cfg = train_config(s, warm.path, data.path, run_dir, method.algo, steps=steps, lr=method.lr or s.pref_lr,
                       batch_size=method.batch_size or s.pref_batch_size, lora=True, loss=method.loss,
                       grpo=method.grpo)
    final, wall = train_run(cfg, {"model": warm.key, "data": data.key})
    after = {sp: evaluate_run(warm, final, paths[sp], root / "eval" / a.name / sp) for sp in ("val", "ood")}

    def em(res, sp):
        return round(100 * metric(res[sp], "exact_match")["value"], 1)

    def per_class(res):
        return {c: round(100 * metric(res["val"], f"accuracy/{c}")["value"]) for c in
                ("car", "motorcycle", "bus", "bicycle")}

    line = {
        "name": a.name, "settings": overrides, "method": asdict(method), "warmup_dir": root.name,
        "pairs": stats, "warmup_wall_s": round(warm_wall, 1), "wall_s": round(wall, 1),
        "em_val_before": em(before, "val"), "em_val_after": em(after, "val"),
        "em_ood_before": em(before, "ood"), "em_ood_after": em(after, "ood"),
        "parse_fail_after": round(100 * metric(after["val"], "parse_failure")["value"], 1),
        "class_before": per_class(before), "class_after": per_class(after),
    }
    with a.log.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
