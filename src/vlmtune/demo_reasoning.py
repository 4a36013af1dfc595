"""`vlmtune demo --task reasoning`: does RL with a verifiable task reward teach the tiny model to reason?

The pipeline, in the order ``run_reasoning_demo`` runs it:

1. ``make_scenes`` and ``make_tasks``: synthetic scenes (by default free layout, colours and sizes), then
   questions of the reasoning mix (count, compare, arithmetic, spatial, attribute, multihop) with
   gold answers from programs: train / val / test and the out-of-distribution files of
   ``vlmtune data tasks``, answer-only and (``think``) with a gold reasoning chain.
2. The warm-up: full fine-tuning on the gold answers of a SUBSET of the families
   (``warmup_families``) for a few steps, so the model knows the answer forms but has room to
   learn; the other families are new to it.
3. From the warm-up, three LoRA stages of ``rl_steps`` steps on the same prompt pool (every family,
   the records as ``vlmtune data tasks`` wrote them):
   - ``grpo``: GRPO scored by ``task_accuracy_reward`` + ``task_format_reward`` (0.1);
   - ``rft``: ``--algo rft``, rejection-sampling fine-tuning, the control that sees exactly what
     GRPO's reward sees: every step it samples ``group_size`` answers for each of ``rl_prompts``
     prompts from the current policy with GRPO's sampler and temperature (the same number of
     scored samples), and trains (SFT) on each prompt's best answer if ``task_accuracy_reward``
     pays it in full (``online.rft_threshold`` 1.0);
   - ``sft-gold``: SFT on the gold answers of the same prompts (the ceiling when gold is in hand).
   With ``think`` the warm-up and GRPO run again on the ``--think`` files (thinking on vs off).
4. Every model answers the evaluation split and each OOD file greedily (``vlmtune.eval.run.evaluate``,
   whose ``task/accuracy``, ``family/<f>/accuracy``, ``hops/<n>/accuracy`` and
   ``task/format_rate`` with 95% bootstrap CIs the tables show). Beside them, the blind baseline:
   each question answered with its question type's most common train answer
   (:mod:`vlmtune.eval.baselines`), scored the same way (``majority_baseline``).

Stages are reused as in the counting demo (``vlmtune.stages.run_stage``).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vlmtune.demo import evaluate_run, make_model, require, timed, train_config, train_run
from vlmtune.stages import Made, run_stage, stage_key

FAMILIES = ("count", "compare", "arithmetic", "spatial", "attribute", "multihop")
OOD_AXES = ("objects", "hops", "combos", "phrasing")
ACCURACY = "vlmtune.tasks.rewards:task_accuracy_reward"
FORMAT = "vlmtune.tasks.rewards:task_format_reward"


@dataclass(frozen=True)
class ReasoningSettings:
    """Everything that decides the demo's outputs; the defaults are the set-up chosen on
    validation (``docs/learning.md``). ``lora_*``, ``warmup_vision`` and ``seed`` are read by
    :func:`vlmtune.demo.train_config` as for the counting demo."""

    out: Path = Path("demo-reasoning")
    seed: int = 0
    family: str = "qwen2-vl"
    image_size: int = 112
    n_scenes: int = 800
    count_range: tuple[int, int] = (0, 3)
    layout: str = "free"
    attributes: bool = True  # False: each class its own colour, no sizes (no attribute questions)
    object_scale: float = 1.0
    families: tuple[str, ...] = FAMILIES
    warmup_families: tuple[str, ...] = ("count", "attribute", "compare")
    per_scene: int = 2
    warmup_steps: int = 300
    warmup_lr: float = 3e-3
    batch_size: int = 32
    rl_steps: int = 60
    rl_prompts: int = 8  # GRPO and RFT: prompts per step; the pool (SFT-gold's data) is rl_steps x rl_prompts
    group_size: int = 8
    temperature: float = 1.0
    rl_lr: float = 3e-3
    kl_beta: float = 0.04
    sft_batch_size: int = 16
    lora_rank: int = 16
    lora_vision: str = "lora"
    lora_merger: bool = False
    warmup_vision: bool = False
    max_new_tokens: int = 32
    think_max_new_tokens: int = 96
    think: bool = True  # also warm up and run GRPO on the --think files
    eval_split: str = "test"  # "val" while choosing settings


# ----------------------------------------------------------------------------- data
def make_scenes(s: ReasoningSettings) -> Made:
    """``out/data/scenes``: scenes of ``layout``; with ``attributes`` (the default) colours independent of
    class and two sizes, without it each class painted its own colour; boxes times ``object_scale``."""
    from vlmtune.data.synth import generate_scenes

    path = s.out / "data" / "scenes"
    settings = {"n": s.n_scenes, "seed": s.seed, "image_size": s.image_size, "count_range": s.count_range,
                "layout": s.layout, "object_scale": s.object_scale, "attributes": s.attributes}
    run_stage(s.out / "data" / "scenes.stage.json", settings, [path],
              lambda: generate_scenes(path, s.n_scenes, seed=s.seed, image_size=s.image_size, layout=s.layout,
                                      count_range=tuple(s.count_range), workers=1, attributes=s.attributes,
                                      object_scale=s.object_scale))
    return Made(path, stage_key(settings))


def make_tasks(s: ReasoningSettings, scenes: Made, think: bool) -> tuple[Path, str]:
    """``out/data/tasks[-think]/``: the files of ``vlmtune data tasks`` on the scenes; (folder, key)."""
    from vlmtune.data.questions import BuildOptions, build_task_files, read_scenes, resolve_families

    out = s.out / "data" / ("tasks-think" if think else "tasks")
    settings = {"scenes": scenes.key, "families": s.families, "think": think, "per_scene": s.per_scene,
                "seed": s.seed}
    opts = BuildOptions(resolve_families(list(s.families)), think=think, per_scene=s.per_scene, seed=s.seed)
    run_stage(out.with_suffix(".stage.json"), settings, [out],
              lambda: build_task_files(read_scenes(scenes.path), out, opts))
    return out, stage_key(settings)


def derived_file(path: Path, inputs: dict[str, Any], build) -> Made:
    """A records file made by ``build(path)`` from other stages (``inputs``), reused like a stage."""
    run_stage(path.with_suffix(".stage.json"), inputs, [path], lambda: build(path))
    return Made(path, stage_key(inputs))


def family_of(record) -> str:
    return record.metadata["task"]["family"]


def warmup_file(s: ReasoningSettings, tasks: tuple[Path, str]) -> Made:
    """The gold records of the warm-up families only (train split)."""
    from vlmtune.data.formats import read_records
    from vlmtune.data.writers import write_records

    def build(path: Path) -> None:
        records = [r for r in read_records(tasks[0] / "train.jsonl") if family_of(r) in s.warmup_families]
        require(bool(records), f"{tasks[0]}/train.jsonl has no record of the warm-up families {s.warmup_families}")
        write_records(records, path, "vlmtune")

    return derived_file(tasks[0] / "warmup.jsonl", {"tasks": tasks[1], "families": s.warmup_families}, build)


def rl_pool(s: ReasoningSettings, tasks: tuple[Path, str]) -> Made:
    """The prompts every RL-phase method trains on: ``rl_steps × rl_prompts`` train records of
    every family, drawn at random, as ``vlmtune data tasks`` wrote them."""
    from vlmtune.data.formats import read_records
    from vlmtune.data.writers import write_records

    def build(path: Path) -> None:
        records = read_records(tasks[0] / "train.jsonl")
        n = s.rl_steps * s.rl_prompts
        write_records(random.Random(s.seed).sample(records, min(n, len(records))), path, "vlmtune")

    inputs = {"tasks": tasks[1], "n": s.rl_steps * s.rl_prompts, "seed": s.seed}
    return derived_file(tasks[0] / "rl_pool.jsonl", inputs, build)


def _max_new(s: ReasoningSettings, think: bool) -> int:
    return s.think_max_new_tokens if think else s.max_new_tokens


# ----------------------------------------------------------------------------- scoring
TASK_PREFIXES = ("task/", "family/", "hops/", "axis/")


def task_metrics(metrics: dict[str, dict]) -> dict[str, dict]:
    """The task metrics of an evaluation (``vlmtune.eval.tasks``: overall, per family, hop count and
    axis, format rate), without its text and preference metrics."""
    return {k: v for k, v in metrics.items() if k.startswith(TASK_PREFIXES)}


def correct_by_id(eval_dir: Path) -> dict[str, float]:
    """Each record's task accuracy, by id, from ``samples.jsonl``: the paired values for
    before/after differences."""
    from vlmtune.jsonl import read_jsonl

    return {row["id"]: row["task_accuracy"] for _, row in read_jsonl(eval_dir / "samples.jsonl")}


def majority_baseline(s: ReasoningSettings, tasks: tuple[Path, str], splits: list[str]) -> dict[str, dict]:
    """The blind baseline: every question answered with its question type's majority train answer
    (:func:`vlmtune.eval.baselines.majority_answers`), scored like a model's answers; each split's
    answers go to ``eval/majority/SPLIT/samples.jsonl``."""
    from vlmtune.data.formats import read_records
    from vlmtune.eval.baselines import majority_answers, majority_completion
    from vlmtune.eval.metrics import summarise
    from vlmtune.eval.run import task_rows

    majority = majority_answers(read_records(tasks[0] / "train.jsonl"))
    out = {}
    for split in splits:
        records = read_records(tasks[0] / f"{split}.jsonl")
        answers = [majority_completion(r, majority) for r in records]
        rows = task_rows(records, answers)
        eval_dir = s.out / "eval" / "majority" / split
        eval_dir.mkdir(parents=True, exist_ok=True)
        lines = [{"id": r.id, "answer": a, "task_accuracy": row[1]["task_accuracy"]}
                 for r, a, row in zip(records, answers, rows)]
        (eval_dir / "samples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        out[split] = summarise([row[0] for row in rows], seed=s.seed)
    return out


# ----------------------------------------------------------------------------- the whole job
def eval_model(s: ReasoningSettings, name: str, model: Made, adapter: Made | None, tasks: tuple[Path, str],
               think: bool) -> dict[str, dict]:
    """Evaluate on the evaluation split and each OOD file; {split: its task metrics}."""
    from vlmtune.demo import EVAL_SETTINGS

    settings = {**EVAL_SETTINGS, "max_new_tokens": _max_new(s, think)}
    out = {}
    for split in eval_splits(s, tasks):
        path = tasks[0] / f"{split}.jsonl"
        records = Made(path, f"{tasks[1]}:{split}")
        eval_dir = s.out / "eval" / name / split
        out[split] = task_metrics(evaluate_run(model, adapter, records, eval_dir, settings))
    return out


def eval_splits(s: ReasoningSettings, tasks: tuple[Path, str]) -> list[str]:
    """The evaluation split and the OOD files the build wrote (a small build may have no question
    along an axis; its stats.json says so)."""
    splits = [s.eval_split, *(f"ood_{a}" for a in OOD_AXES)]
    return [split for split in splits if (tasks[0] / f"{split}.jsonl").exists()]


def rl_config(s: ReasoningSettings, warm: Made, data: Made, name: str, algo: str, think: bool):
    """The config of one RL-phase stage: ``grpo``, ``rft`` (both ``rl_prompts`` prompts × ``group_size``
    samples per step, same temperature and answer length) or ``sft`` (gold answers)."""
    from vlmtune.config import validate_config

    sampling = {"group_size": s.group_size, "temperature": s.temperature, "max_new_tokens": _max_new(s, think)}
    grpo = {**sampling, "beta": s.kl_beta, "rewards": [{"name": ACCURACY}, {"name": FORMAT}]}
    batch = s.sft_batch_size if algo == "sft" else s.rl_prompts
    config = train_config(s, warm.path, data.path, s.out / "runs" / name, algo, steps=s.rl_steps, lr=s.rl_lr,
                          batch_size=batch, lora=True, grpo=grpo if algo == "grpo" else None)
    if algo != "rft":
        return config
    # The judge is GRPO's accuracy reward alone: a threshold of 1.0 on accuracy + format (0.1)
    # would also keep a partly right answer that is well formed.
    online = {**sampling, "rewards": [{"name": ACCURACY}], "rft_threshold": 1.0}
    return validate_config({**config.model_dump(mode="json"), "online": online}, source="demo")


def run_variant(s: ReasoningSettings, base: Made, scenes: Made, think: bool, methods: tuple[str, ...],
                say=print) -> list[dict[str, Any]]:
    """Warm-up, then each method from it, each evaluated; one row per model."""
    tag = "-think" if think else ""
    tasks = make_tasks(s, scenes, think)
    warm_data = warmup_file(s, tasks)
    say(f"  warm-up{tag}: SFT on gold answers of {', '.join(s.warmup_families)} ({s.warmup_steps} steps)")
    cfg = train_config(s, base.path, warm_data.path, s.out / "runs" / f"warmup{tag}", "sft", steps=s.warmup_steps,
                       lr=s.warmup_lr, batch_size=s.batch_size, lora=False)
    warm, wall = train_run(cfg, {"model": base.key, "data": warm_data.key})
    rows = [{"method": f"warm-up{tag}", "think": think, "wall_s": wall,
             "results": eval_model(s, f"warmup{tag}", warm, None, tasks, think)}]
    if not think:
        rows.append({"method": "majority answer", "think": think, "wall_s": 0.0,
                     "results": majority_baseline(s, tasks, eval_splits(s, tasks))})
    pool = rl_pool(s, tasks)
    for method in methods:
        name = f"{method}{tag}"
        say(f"  {name}: {s.rl_steps} steps from the warm-up")
        algo = "sft" if method == "sft-gold" else method  # sft-gold: the pool's gold answers
        final, wall = train_run(rl_config(s, warm, pool, name, algo, think), {"model": warm.key, "data": pool.key})
        rows.append({"method": name, "think": think, "wall_s": wall,
                     "results": eval_model(s, name, warm, final, tasks, think)})
    for row in rows:
        row["paired"] = _paired_vs_first(s, rows[0]["method"], row["method"])
    return rows


def _paired_vs_first(s: ReasoningSettings, first: str, name: str) -> dict[str, float]:
    """Overall accuracy change against the warm-up on the evaluation split, paired bootstrap CI."""
    from vlmtune.eval.metrics import paired_bootstrap_diff

    before = correct_by_id(s.out / "eval" / _slug(first) / s.eval_split)
    after = correct_by_id(s.out / "eval" / _slug(name) / s.eval_split)
    ids = sorted(before)
    delta, low, high = paired_bootstrap_diff([before[i] for i in ids], [after[i] for i in ids], seed=s.seed)
    return {"value": delta, "ci_low": low, "ci_high": high}


def _slug(method: str) -> str:
    """A row's folder name under ``eval/`` and ``runs/``."""
    return "majority" if method == "majority answer" else method.replace("warm-up", "warmup")


def run_reasoning_demo(s: ReasoningSettings, methods: tuple[str, ...] = ("grpo", "rft", "sft-gold"),
                       say=print) -> dict[str, Any]:
    """Every stage in order; returns the rows (one per model) and the timings."""
    s.out.mkdir(parents=True, exist_ok=True)
    settings = {**asdict(s), "out": str(s.out)}
    (s.out / "settings.json").write_text(json.dumps(settings, indent=2))
    drawn = "colours and sizes" if s.attributes else "each class its own colour"
    say(f"1/4 {s.n_scenes} synthetic scenes ({s.layout} layout, {drawn})")
    scenes, data_s = timed(make_scenes, s)
    say("2/4 tiny model and processor")
    base = make_model(s.out, s.family, s.seed)
    say("3/4 answer-only: warm-up, then " + ", ".join(methods))
    rows = run_variant(s, base, scenes, False, methods, say)
    if s.think:
        say("4/4 thinking on (<think>...</think><answer>...</answer>): warm-up, then grpo")
        rows += run_variant(s, base, scenes, True, ("grpo",), say)
    (s.out / "results.json").write_text(json.dumps(rows, indent=2))
    return {"rows": rows, "timings": {"scenes": data_s}}


# ----------------------------------------------------------------------------- tables
def pct(m: dict[str, float] | None) -> str:
    if not m or m["value"] != m["value"]:
        return "–"
    return f"{100 * m['value']:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"


def signed(m: dict[str, float]) -> str:
    return f"{100 * m['value']:+.1f} [{100 * m['ci_low']:+.1f}, {100 * m['ci_high']:+.1f}]"


def tables(rows: list[dict[str, Any]], split: str = "test") -> str:
    """Three Markdown tables (per family, per hop count, per OOD axis), 95% CIs in brackets."""
    families = sorted(_groups(rows, split, "family"))
    hops = sorted(_groups(rows, split, "hops"), key=int)
    oods = [a for a in OOD_AXES if any(f"ood_{a}" in r["results"] for r in rows)]
    head = ["method", f"all ({split})", "Δ vs warm-up (paired)", *families, "format", "wall s"]
    out = [_table(head, [[r["method"], pct(r["results"][split]["task/accuracy"]), signed(r["paired"]),
                          *[pct(r["results"][split].get(f"family/{f}/accuracy")) for f in families],
                          pct(r["results"][split]["task/format_rate"]), f"{r['wall_s']:.0f}"] for r in rows])]
    out.append(_table(["method", *[f"{h} hops" for h in hops]],
                      [[r["method"], *[pct(r["results"][split].get(f"hops/{h}/accuracy")) for h in hops]]
                       for r in rows]))
    out.append(_table(["method", *[f"OOD {a} (n={_n(rows, a)})" for a in oods]],
                      [[r["method"], *[pct(r["results"].get(f"ood_{a}", {}).get("task/accuracy")) for a in oods]]
                       for r in rows]))
    return "\n\n".join(out)


def _groups(rows: list[dict[str, Any]], split: str, kind: str) -> set[str]:
    """The families (``kind`` "family") or hop counts ("hops") with an accuracy in any row."""
    return {k.split("/")[1] for r in rows for k in r["results"][split]
            if k.startswith(f"{kind}/") and k.endswith("/accuracy")}


def _n(rows: list[dict[str, Any]], axis: str) -> int:
    return next(r["results"][f"ood_{axis}"]["task/accuracy"]["n"] for r in rows if f"ood_{axis}" in r["results"])


def _table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def verdict(rows: list[dict[str, Any]], split: str = "test") -> str:
    """One clause per trained model: its accuracy change against its warm-up (paired 95% CI),
    whether that interval excludes zero, and its accuracy beside the blind majority answer's."""
    floor = next((r["results"][split]["task/accuracy"]["value"] for r in rows if r["method"] == "majority answer"), None)
    parts = []
    for r in rows:
        if r["method"].startswith("warm-up") or r["method"] == "majority answer":
            continue
        d = r["paired"]
        moved = ("better than" if d["ci_low"] > 0 else "worse than" if d["ci_high"] < 0 else "not told apart from")
        text = f"{r['method']}: {signed(d)} points on {split}, {moved} its warm-up"
        if floor is not None:
            acc = r["results"][split]["task/accuracy"]["value"]
            text += f" ({100 * acc:.1f}% against the majority answer's {100 * floor:.1f}%)"
        parts.append(text)
    return "; ".join(parts)


# ----------------------------------------------------------------------------- entry point
QUICK = dict(n_scenes=60, warmup_steps=4, batch_size=8, rl_steps=2, rl_prompts=2, group_size=2,
             sft_batch_size=4, think_max_new_tokens=48)


def main(out: Path, quick: bool = False, seed: int = 0) -> int:
    from vlmtune.report.html import write_report
    from vlmtune.report.inputs import RunResult

    s = ReasoningSettings(out=Path(out), seed=seed, **(QUICK if quick else {}))
    start = time.perf_counter()
    result = run_reasoning_demo(s)
    rows = result["rows"]
    models = [r for r in rows if r["method"] != "majority answer"]  # the report shows models' answers
    logs = [s.out / "runs" / _slug(r["method"]) / "metrics.jsonl" for r in models]
    runs = [RunResult(r["method"], s.out / "eval" / _slug(r["method"]) / s.eval_split, log if log.exists() else None)
            for r, log in zip(models, logs)]
    report = write_report(s.out / "report", runs, title="vlmtune demo: visual reasoning, before / after",
                          max_gallery=60, seed=seed)
    text = tables(rows, s.eval_split)
    (s.out / "results.md").write_text(text + "\n")
    print()
    print(text)
    print()
    print(verdict(rows, s.eval_split))
    print(f"report: {report}")
    print(f"total wall time: {time.perf_counter() - start:.0f} s")
    return 0
