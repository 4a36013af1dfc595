"""Issue 13, point 5: the demo's preference methods and GRPO at the same number of scored samples.

Everything starts from the demo's 600-step warm-up (``vlmtune.demo``, default settings) and spends
a budget of scored samples (``vlmtune.demo.scored_samples``): sampled answers that the count reward
or the simulated rater scored. ``--phase val`` runs one method (``--method NAME``, see
``METHODS``) and appends one JSON line to ``--log``: its budget, its wall and CPU seconds, and its
curve of validation exact match (300 held-out scenes, never the test split) against scored
samples and against seconds:

- GRPO, online DPO / MPO and RFT evaluate greedily on the validation split ``EVALS`` times along
  the run, inside the training loop (``eval/exact_match``); a point's seconds are the summed step
  times up to it (``metrics.jsonl``'s ``pairs_per_s`` per step: sampling, scoring and update,
  not the evaluation);
- iterative DPO evaluates after each round (``rounds/rN/eval``); a round's seconds are its
  labelling (sampling the pool and scoring) and its steps;
- the offline methods spend their budget before training: the rater scores ``k`` answers per
  preference image (k = 2 as in the demo, or 32 = the common budget), and a point's seconds are
  the sampling plus the training steps.

Intervals of the curve points are Wilson 95% intervals on 300 scenes. ``--phase test`` evaluates
each finished method's final model once on the test and OOD splits (bootstrap 95% intervals, as the
demo; ``--val-only NAME ...`` leaves out the attempts not chosen on validation) and prints the
equal-budget table; ``--phase table`` prints the tables from the log alone.

    python experiments/equal_budget.py --phase val --method grpo
    python experiments/equal_budget.py --phase test
"""

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlmtune.demo import (CONTROL, METHODS as DEMO_METHODS, ONLINE, RFT, DemoSettings, Method, evaluate_run, make_data,
                        make_model, metric, scored_samples, train_config, train_run)
from vlmtune.demo_rater import rater_pairs
from vlmtune.eval.metrics import paired_bootstrap_diff
from vlmtune.jsonl import read_jsonl
from vlmtune.stages import Made, stage_key
from vlmtune.study.stats import wilson_interval

BUDGET = 25_600  # GRPO's 200 steps x 8 images x 16 answers
EVALS = 4  # evaluations along a sampling run: every steps / 4
BY_NAME = {m.name: m for m in DEMO_METHODS}
# name -> (method, answers per preference image for the offline pairs: None for the sampling methods).
# The sampling methods at BUDGET: GRPO 200 steps x 8 images x G 16; online DPO / MPO and RFT
# 200 steps x 16 images x k 8 (vlmtune.demo.ONLINE: T 1.2 as GRPO, the count rewards).
METHODS = {
    "grpo": (replace(BY_NAME["grpo"], steps=200), None),
    "online-dpop": (replace(BY_NAME["online-dpop"], steps=200), None),
    "online-mpo": (replace(BY_NAME["online-mpo"], steps=200), None),
    # RFT keeping each image's best complete answer whatever its reward (top-1); the log's first
    # rft / rft-exact lines are the collapsed runs before the RFT step's fix (docs/learning.md)
    "rft": (Method("rft", "rft", steps=200, online=ONLINE), None),
    # the online methods' control: only exactly right answers kept (reward >= 2.0), as vlmtune.demo.RFT
    "rft-exact": (replace(RFT, name="rft-exact", steps=200), None),
    # Attempts to make online DPO teach more at BUDGET, chosen on validation (docs/learning.md):
    # every two answers of a prompt whose rewards differ by more than 0.5 (up to 28 pairs from 8 answers)
    "online-dpop-all": (replace(BY_NAME["online-dpop"], name="online-dpop-all", steps=200,
                                online={**ONLINE, "pairs": "all", "margin": 0.5}), None),
    # a higher learning rate (the demo's 3e-3 x 10/3): the implicit-reward accuracy stayed near 0.4
    "online-dpop-lr1e-2": (replace(BY_NAME["online-dpop"], name="online-dpop-lr1e-2", steps=200, lr=1e-2), None),
    # RPO-style: sigmoid DPO plus the chosen answer's NLL (weight 1), sampled at T 1 so that the NLL
    # term is on the sampling distribution (the RFT collapse: SFT at T 1 on T 1.2 samples flattens)
    "online-rpo-t1": (Method("online-rpo-t1", "online_dpo", {"name": "dpo", "beta": 0.1, "sft_weight": 1.0},
                             steps=200, online={**ONLINE, "temperature": 1.0}), None),
    # 4 rounds x 800 prompts x k 8 = BUDGET; 50 steps x 16 pairs a round.
    "iterative-dpop": (replace(BY_NAME["iterative-dpop"], steps=50), None),
    # the budget of GRPO's 800 steps (the demo's GRPO): 102,400 scored samples
    "grpo-800": (replace(BY_NAME["grpo"], name="grpo-800"), None),
    "online-dpop-800": (replace(BY_NAME["online-dpop"], name="online-dpop-800", steps=800), None),
    "rft-exact-800": (replace(RFT, name="rft-exact-800", steps=800), None),
    # offline: the rater's pairs from k answers per image (k 32: 800 images x 32 = BUDGET)
    "dpop-k2": (replace(BY_NAME["dpop"], name="dpop-k2"), 2),
    "control-k2": (replace(CONTROL, name="control-k2"), 2),
    "dpop-k32": (replace(BY_NAME["dpop"], name="dpop-k32"), 32),
    "mpo-k32": (replace(BY_NAME["mpo"], name="mpo-k32"), 32),
    "control-k32": (replace(CONTROL, name="control-k32"), 32),
}


def prepare(root: Path, split: str):
    s = replace(DemoSettings(), out=root, eval_split="val")
    paths = make_data(s)
    base = make_model(s.out, s.family, s.seed)
    warm_cfg = train_config(s, base.path, paths["sft"].path, root / "runs" / "warmup", "sft", steps=s.warmup_steps,
                            lr=s.warmup_lr, batch_size=s.batch_size, lora=False)
    warm, warm_wall = train_run(warm_cfg, {"model": base.key, "data": paths["sft"].key})
    before = {sp: evaluate_run(warm, None, paths[sp], root / "eval" / "warmup" / sp) for sp in (split, "ood")}
    return s, paths, warm, before


def offline_pairs(s: DemoSettings, root: Path, warm: Made, prompts: Made, k: int) -> tuple[Made, dict, float]:
    """The rater's pairs from k answers per image, made once per k; the sampling seconds are kept."""
    path = root / "pairs" / f"k{k}.jsonl"
    stats_path = path.with_suffix(".stats.json")
    if not stats_path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        stats = rater_pairs(warm.path, prompts.path, path, replace(s, samples_per_image=k))
        stats["wall_s"] = time.perf_counter() - start
        stats_path.write_text(json.dumps(stats))
    stats = json.loads(stats_path.read_text())
    return Made(path, stage_key({"pairs": path.name, "model": warm.key})), stats, stats["wall_s"]


def step_seconds(metrics_file: Path, batch: int) -> dict[int, float]:
    """Cumulative seconds of the optimizer steps (from each step's ``pairs_per_s``), by step."""
    total, out = 0.0, {}
    for _, row in read_jsonl(metrics_file):
        if "pairs_per_s" in row:
            total += batch / row["pairs_per_s"]
            out[row["step"]] = total
    return out


def point(scored: int, seconds: float, em: float, n: int) -> dict:
    low, high = wilson_interval(em * n, n)
    return {"scored": scored, "seconds": round(seconds, 1), "em": round(100 * em, 1),
            "ci": [round(100 * low, 1), round(100 * high, 1)]}


def run_val(root: Path, name: str, log: Path) -> None:
    s, paths, warm, before = prepare(root, "val")
    method, k = METHODS[name]
    n_val = s.n_test
    steps = method.steps or s.pref_steps
    batch = method.batch_size or s.pref_batch_size
    run_dir = root / "runs" / name
    pair_wall = 0.0
    if k is None:
        data, rated = paths["pref_prompts"], 0
    else:
        data, stats, pair_wall = offline_pairs(s, root, warm, paths["pref_prompts"], k)
        rated = stats["images"] * k
    sampling = k is None and method.algo != "iterative_dpo"
    cfg = train_config(s, warm.path, data.path, run_dir, method.algo, steps=steps, lr=method.lr or s.pref_lr,
                       batch_size=batch, lora=True, loss=method.loss, grpo=method.grpo, online=method.online,
                       eval_data=paths["val"].path if k is None else None)
    train_updates = {"log_every": 1}
    if sampling:
        train_updates["eval_every"] = steps // EVALS
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=train_updates)})
    budget = scored_samples(cfg, pool=s.n_pref, rated=rated)
    cpu0 = time.process_time()
    final, wall = train_run(cfg, {"model": warm.key, "data": data.key})
    cpu = time.process_time() - cpu0
    start = metric(before["val"], "exact_match")["value"]
    curve = [point(0, 0.0, start, n_val)]
    if sampling:
        seconds = step_seconds(run_dir / "metrics.jsonl", batch)
        per_step = budget // steps
        for _, row in read_jsonl(run_dir / "metrics.jsonl"):
            if "eval/exact_match" in row:
                curve.append(point(row["step"] * per_step, seconds[row["step"]], row["eval/exact_match"], n_val))
    elif method.algo == "iterative_dpo":
        curve += iterative_curve(cfg, run_dir, s.n_pref, n_val)
    else:
        after = evaluate_run(warm, final, paths["val"], root / "eval" / name / "val")
        seconds = step_seconds(run_dir / "metrics.jsonl", batch)
        curve.append(point(budget, pair_wall + seconds[steps], metric(after, "exact_match")["value"], n_val))
    line = {"name": name, "algo": method.algo, "method": repr(method), "k": k, "scored": budget,
            "final": str(final.path), "final_key": final.key,
            "train_wall_s": round(pair_wall + wall, 1), "process_cpu_s": round(cpu, 1), "curve": curve}
    with log.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line))


def iterative_curve(cfg, run_dir: Path, pool: int, n_val: int) -> list[dict]:
    """One point per round: scored samples so far, labelling plus step seconds so far, the round's val EM."""
    from vlmtune.train.iterative import round_dir

    points, total, previous_end = [], 0.0, (run_dir / "config.yaml").stat().st_mtime
    per_round = pool * cfg.online.group_size
    for r in range(cfg.online.rounds):
        folder = round_dir(run_dir, r)
        total += (folder / "pairs.jsonl").stat().st_mtime - previous_end  # sampling and scoring the pool
        steps = step_seconds(folder / "train" / "metrics.jsonl", cfg.train.batch_size)
        total += max(steps.values())
        previous_end = (folder / "round.json").stat().st_mtime
        em = json.loads((folder / "eval" / "metrics.json").read_text())["exact_match"]["value"]
        points.append(point((r + 1) * per_round, total, em, n_val))
    return points


def run_test(root: Path, log: Path, val_only: set[str]) -> None:
    """Each logged method's final model on the test and OOD splits, once; paired differences on test.
    The runs named in ``val_only`` (the attempts not chosen on validation) are left out."""
    s, paths, warm, before = prepare(root, "test")
    rows = [("warm-up", 0, 0.0, before)]
    for line in read_log(log):
        if line["name"] in val_only:
            continue
        final = Made(Path(line["final"]), line["final_key"])
        after = {sp: evaluate_run(warm, final, paths[sp], root / "eval" / line["name"] / sp) for sp in ("test", "ood")}
        rows.append((line["name"], line["scored"], line["train_wall_s"], after))
    correct = {name: hits(root / "eval" / ("warmup" if name == "warm-up" else name) / "test") for name, *_ in rows}
    print("| method | scored samples | train wall s | EM test [95% CI] | EM OOD [95% CI] | vs warm-up | "
          "vs control | vs offline RFT (control-k32) | vs GRPO, same budget |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, scored, wall, res in rows:
        control, grpo = control_of(name), None if name == "warm-up" else "grpo-800" if name.endswith("-800") else "grpo"
        offline_rft = "control-k32" if scored == BUDGET else None
        cells = [diff(correct, "warm-up", name), diff(correct, control, name), diff(correct, offline_rft, name),
                 diff(correct, grpo, name)]
        print(f"| {name} | {scored:,} | {wall:.0f} | {pct(metric(res['test'], 'exact_match'))} | "
              f"{pct(metric(res['ood'], 'exact_match'))} | " + " | ".join(cells) + " |")


def control_of(name: str) -> str | None:
    """The run that sees the same information at the same budget: SFT on the chosen answers of the
    same pairs for the offline methods; for the sampling methods at 25,600 the online RFT on the
    same sampler (rft-exact, the demo's RFT: each image's best of 8 when exactly right); none for
    the warm-up, the RFT runs themselves and at 102,400 (no control was run at that budget)."""
    if name.endswith("-k2") or name.endswith("-k32"):
        return "control-" + name.rsplit("-", 1)[1]
    return None if name in ("warm-up", "rft", "rft-exact") or name.endswith("-800") else "rft-exact"


def hits(eval_dir: Path) -> list[float]:
    return [float(row["correct"]) for _, row in read_jsonl(eval_dir / "samples.jsonl")]


def diff(correct: dict[str, list[float]], base: str | None, name: str) -> str:
    """``name`` minus ``base`` in EM points with its paired-bootstrap 95% interval; "–" if either is missing."""
    if base is None or base == name or base not in correct or name not in correct:
        return "–"
    delta, low, high = paired_bootstrap_diff(correct[base], correct[name])
    return f"{100 * delta:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def pct(m: dict) -> str:
    return f"{100 * m['value']:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"


def read_log(log: Path) -> list[dict]:
    latest = {}
    for _, line in read_jsonl(log):
        latest[line["name"]] = line  # a method run again: its last line
    return list(latest.values())


def print_curves(log: Path) -> None:
    """The curves' data, and each method's val EM within GRPO's wall time at the common budget."""
    lines = read_log(log)
    print("| method | scored samples | seconds | val EM [95% CI] |")
    print("|---|---|---|---|")
    for line in lines:
        for p in line["curve"]:
            print(f"| {line['name']} | {p['scored']:,} | {p['seconds']:.0f} | {p['em']:.1f} "
                  f"[{p['ci'][0]:.1f}, {p['ci'][1]:.1f}] |")
    grpo = [line for line in lines if line["name"] == "grpo"]
    if not grpo:
        return
    common = grpo[0]["curve"][-1]["seconds"]
    print(f"\nat the same wall time ({common:.0f} s, GRPO's at {BUDGET:,} scored samples): the last point within it")
    for line in lines:
        last = [p for p in line["curve"] if p["seconds"] <= common + 1e-9][-1]
        print(f"  {line['name']}: {last['em']:.1f} [{last['ci'][0]:.1f}, {last['ci'][1]:.1f}] at "
              f"{last['seconds']:.0f} s, {last['scored']:,} scored")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, default=Path("/tmp/exp/budget"))
    p.add_argument("--log", type=Path, default=Path(__file__).with_name("equal_budget.jsonl"))
    p.add_argument("--phase", choices=("val", "test", "table"), required=True)
    p.add_argument("--method", choices=sorted(METHODS))
    p.add_argument("--val-only", nargs="*", default=[], choices=sorted(METHODS),
                   help="--phase test: runs that stay off the test split (attempts not chosen on validation)")
    a = p.parse_args()
    if a.phase == "val":
        if not a.method:
            raise SystemExit("--phase val needs --method")
        run_val(a.root, a.method, a.log)
    elif a.phase == "test":
        run_test(a.root, a.log, set(a.val_only))
    else:
        print_curves(a.log)


if __name__ == "__main__":
    main()
