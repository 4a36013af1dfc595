"""`vlmtune data tasks` (scenes or detection labels → reasoning task records) and `vlmtune rewards check`."""

from __future__ import annotations

import argparse

FAMILY_HELP = "count,compare,arithmetic,spatial,attribute,grounding,list,multihop (or package.module:Class)"


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tasks",
        help="reasoning questions with verifiable answers from scenes or detection labels",
        description=(
            "Pose questions of every task family on synthetic scenes (--scenes, drawn by `vlmtune data synth`) "
            "or detection labels (--detections), with gold answers computed by programs. Writes "
            "OUT/{train,val,test}.<ext>, one OUT/ood_<axis>.<ext> per out-of-distribution axis (objects, "
            "combos, hops, phrasing), and OUT/stats.json (families x answers x hops). Each record's rejected "
            "answer is a hard negative: the answer of a reasoning slip. "
            "Example: vlmtune data synth --out scenes --n 500 --layout free --image-size 224 --attributes && "
            "vlmtune data tasks --scenes scenes --out tasks --think"
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--scenes", help="folder of `vlmtune data synth` (objects/*.json + data.yaml)")
    source.add_argument("--detections", help="detection data set root (YOLO, COCO or VOC), as from-detections reads")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--families", help=f"comma-separated, default all that the source supports: {FAMILY_HELP}")
    p.add_argument("--think", action="store_true",
                   help="answers as <think>gold reasoning</think><answer>...</answer> (default: the answer alone)")
    p.add_argument("--per-scene", type=int, default=2, help="questions per family per scene (default 2)")
    p.add_argument("--rejects", type=int, default=1, help="pairs (hard negatives) per question (default 1)")
    p.add_argument("--max-hops", type=int, default=3, help="more hops than this go to ood_hops (default 3)")
    p.add_argument("--ood-objects", type=int, default=None,
                   help="scenes with more objects go to ood_objects (default: the build's 90th percentile)")
    p.add_argument("--holdout-combos", default="red:bus,blue:car",
                   help="colour:class pairs whose attribute questions go to ood_combos (default red:bus,blue:car)")
    p.add_argument("--box-convention", default="qwen2_5_vl", choices=("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
                   help="how grounding and list answers write boxes: qwen2_vl 0-1000 relative; qwen2_5_vl, "
                   "qwen3_vl absolute pixels of the processed image (default qwen2_5_vl)")
    p.add_argument("--min-pixels", type=int, default=None, help="the processor's min_pixels (box convention)")
    p.add_argument("--max-pixels", type=int, default=None, help="the processor's max_pixels (box convention)")
    p.add_argument("--source-format", default="auto", choices=("auto", "yolo", "coco", "voc"),
                   help="--detections: label format (default: detected)")
    p.add_argument("--classes", help="--detections: YOLO class names in index order, when there is no data.yaml")
    p.add_argument("--keep", help="--detections: classes to ask about, comma-separated (default: all)")
    p.add_argument("--min-area", type=float, default=0.0005,
                   help="--detections: skip images with a box under this fraction of the image (default 0.0005)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed label files and report them")
    p.add_argument("--split", default="train=0.8,val=0.1,test=0.1",
                   help="fractions per split, by a hash of the source photo's name "
                   "(default train=0.8,val=0.1,test=0.1)")
    p.add_argument("--format", default="vlmtune", help="output format, as `data from-detections` (default vlmtune)")
    p.add_argument("--seed", type=int, default=0, help="seed for question choice, balancing and negatives")
    p.set_defaults(func=_tasks)


def add_commands(commands: argparse._SubParsersAction) -> None:
    r = commands.add_parser("rewards", help="check reward functions against adversarial completions")
    sub = r.add_subparsers(dest="rewards_command", metavar="REWARDS_COMMAND", required=True)
    c = sub.add_parser(
        "check", help="score adversarial completions with every reward; fail when one pays",
        description=(
            "Score a fixed set of adversarial completions (empty answer, tags only, two answers, the answer "
            "only inside <think>, every option listed, 'A or B', boxes spammed, an over-long answer) on one "
            "question of every task family, with every built-in task reward and any --reward. Prints the most "
            "each reward paid per case; exit status 1 when any reward pays on any case (or never pays gold)."
        ),
    )
    c.add_argument("--reward", action="append", default=[], metavar="NAME",
                   help="a reward to check: task_accuracy, task_accuracy_iou2, task_format, count_exact, "
                   "count_partial, count_format, or package.module:function (repeatable; default: the task rewards)")
    c.set_defaults(func=_rewards_check)


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _combos(text: str) -> tuple[tuple[str, str], ...]:
    from vlmtune.errors import VlmtuneError

    combos = []
    for item in _csv(text) or []:
        colour, sep, cls = item.partition(":")
        if not sep or not colour or not cls:
            raise VlmtuneError(f"--holdout-combos {item!r}: write colour:class pairs, e.g. red:bus,blue:car")
        combos.append((colour.lower(), cls.lower()))
    return tuple(combos)


def _tasks(args: argparse.Namespace) -> int:
    from vlmtune.data.detection_scenes import read_detection_scenes
    from vlmtune.data.pairs import parse_split
    from vlmtune.data.questions import BuildOptions, TaskStats, build_task_files, read_scenes, resolve_families
    from vlmtune.errors import VlmtuneError
    from vlmtune.tasks.families import DETECTION_FAMILIES
    from vlmtune.tasks.grounding import GroundingFamily
    from vlmtune.tasks.listing import ListFamily

    for name, value in (("--per-scene", args.per_scene), ("--rejects", args.rejects)):
        if value < 1:
            raise VlmtuneError(f"{name} must be at least 1")
    families = resolve_families(_csv(args.families), DETECTION_FAMILIES if args.detections else None)
    boxes = {"convention": args.box_convention, "min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
    for name, cls in (("grounding", GroundingFamily), ("list", ListFamily)):
        if name in families:
            families[name] = cls(**boxes)
    stats = TaskStats()
    if args.detections:
        scenes = read_detection_scenes(args.detections, args.source_format, _csv(args.classes), _csv(args.keep),
                                       args.min_area, args.skip_bad, stats.skipped)
    else:
        scenes = read_scenes(args.scenes)
    split = parse_split(args.split)
    if split is None:
        raise VlmtuneError("--split keep: data tasks splits by source photo only; give fractions, "
                         "e.g. --split train=0.8,val=0.1,test=0.1")
    opts = BuildOptions(families, args.think, args.per_scene, args.rejects, args.max_hops, args.ood_objects,
                        _combos(args.holdout_combos), split, args.seed)
    paths, stats = build_task_files(scenes, args.out, opts, args.format, stats)
    _print_stats(stats, paths, args.out)
    return 0


def _print_stats(stats, paths: dict, out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{stats.scenes} scenes: questions per family (answers: in-distribution)")
    for col in ("family", "questions", "hops", "top answers"):
        table.add_column(col)
    for name, entry in stats.to_dict()["families"].items():
        hops = ", ".join(f"{h}:{n}" for h, n in entry["hops"].items())
        top = ", ".join(f"{a}:{n}" for a, n in list(entry["answers_in_distribution"].items())[:5])
        table.add_row(name, str(entry["questions"]), hops, top)
    console.print(table)
    for split, path in paths.items():
        console.print(f"{split}: {stats.records[split]} records in {path}", markup=False)
    if stats.no_question:
        console.print(f"[yellow]{len(stats.no_question)} scene(s) had no valid question for these families[/yellow] "
                      f"(e.g. {', '.join(stats.no_question[:5])}); see stats.json")
    for line in stats.skipped:
        console.print(f"skipped: {line}", markup=False)
    console.print(f"stats: {out}/stats.json", markup=False)


def _rewards_check(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from vlmtune.tasks.rewards import TASK_REWARDS
    from vlmtune.tasks.rewards_check import CASES, check_reward

    rows = []
    for name in args.reward or list(TASK_REWARDS):
        if name in TASK_REWARDS:
            label, function = name, TASK_REWARDS[name]
        else:
            from vlmtune.train.grpo import resolve_reward

            label, function = resolve_reward(name)
        rows.append(check_reward(label, function))
    table = Table(title="most paid on an adversarial completion (0 = pass)")
    table.add_column("case")
    for row in rows:
        table.add_column(row.reward, justify="right")
    for case in CASES:
        table.add_row(case, *[f"{row.paid[case]:.3g}" for row in rows])
    table.add_section()
    table.add_row("gold (mean, must be > 0)", *[f"{row.gold:.3g}" for row in rows])
    table.add_row("verdict", *["pass" if row.ok else "FAIL" for row in rows])
    Console().print(table)
    return 0 if all(row.ok for row in rows) else 1
