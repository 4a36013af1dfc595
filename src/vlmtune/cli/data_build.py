"""`vlmtune data from-detections` and `vlmtune data synth`: build counting preference data."""

from __future__ import annotations

import argparse

STRATEGY_HELP = (
    "off_by_one (one class moved by 1), off_by_k (by 2-3), swap (two classes' counts exchanged), "
    "total_only ('There are 5 vehicles in the image.'), random (every class at random)"
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "from-detections",
        help="counting preference pairs from YOLO / COCO / VOC detection labels",
        description=(
            "Build counting preference pairs from detection labels: the chosen answer is the exact "
            "per-class count sentence, each rejected one a wrong answer made by a strategy. Writes "
            "OUT/{train,val,test}.<ext> (one file per split; for --format hf one folder per split) "
            "and OUT/stats.json, and prints the stats. OUT is a folder, created if missing. "
            "Example: vlmtune data from-detections highway-od-40 --out pairs "
            "--drop person --map motorbike=motorcycle"
        ),
    )
    p.add_argument("dir", help="data set root: data.yaml + {train,valid,test}/{images,labels}, "
                   "images/ + labels/, COCO *.json, or VOC *.xml")
    p.add_argument("--out", required=True, help="output folder (one file per split + stats.json)")
    _output_options(p)
    p.add_argument("--source-format", default="auto", choices=("auto", "yolo", "coco", "voc"),
                   help="label format of DIR (default: detected)")
    p.add_argument("--classes", help="YOLO class names in index order, comma-separated "
                   "(needed when DIR has no data.yaml)")
    p.add_argument("--map", action="append", default=[], metavar="OLD=NEW",
                   help="rename a class, e.g. --map motorbike=motorcycle (repeatable, or comma-separated)")
    p.add_argument("--drop", default="", help="classes to leave out, comma-separated, e.g. person")
    p.add_argument("--count", help="classes to count, in answer order, comma-separated "
                   "(default: every class left after --map and --drop, in the data set's order)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed label files and report them instead of stopping")
    p.set_defaults(func=_from_detections)

    s = sub.add_parser(
        "synth",
        help="procedural traffic scenes (images + YOLO labels), optionally straight to pairs",
        description=(
            "Draw synthetic traffic scenes: cars (red boxes with wheels), motorcycles (blue "
            "triangles), buses (yellow boxes with windows), bicycles (two green rings). Writes "
            "OUT/images, OUT/labels and OUT/data.yaml, which from-detections reads; with --pairs "
            "also OUT/pairs/{train,val,test}.<ext> and OUT/pairs/stats.json. "
            "Example: vlmtune data synth --out scenes --n 2000 --layout free --image-size 224 --count-range 0,6 --pairs"
        ),
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    s.add_argument("--image-size", type=int, default=112, help="image side in pixels (default 112)")
    s.add_argument("--layout", default="grid", choices=("grid", "free"),
                   help="grid: one object per cell of a 4x4 grid; free: random positions and sizes")
    s.add_argument("--count-range", default="0,4", help="LOW,HIGH objects per class (default 0,4)")
    s.add_argument("--max-overlap", type=float, default=0.1,
                   help="free layout: largest fraction of a box others may cover (default 0.1)")
    s.add_argument("--attributes", action="store_true",
                   help="colours independent of class and small/large sizes (for `vlmtune data tasks`)")
    s.add_argument("--workers", type=int, default=2, help="drawing processes (default 2)")
    s.add_argument("--pairs", action="store_true", help="also build preference pairs in OUT/pairs")
    _output_options(s)
    s.set_defaults(func=_synth)


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="vlmtune",
                   help="vlmtune (canonical JSONL), seed, trl, llamafactory, swift or hf (default vlmtune)")
    p.add_argument("--strategies", default="off_by_one,off_by_k,swap,total_only,random",
                   help=f"rejected-answer strategies, comma-separated: {STRATEGY_HELP}")
    p.add_argument("--rejects-per-image", type=int, default=1, help="pairs per image (default 1)")
    p.add_argument("--split", default="train=0.8,val=0.1,test=0.1",
                   help="fractions per split, assigned by a hash of the source photo's name so "
                   "augmentation copies stay together; 'keep' keeps the source's split folders")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and rejected answers")


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _build_options(args: argparse.Namespace) -> dict:
    from vlmtune.data.pairs import parse_split, parse_strategies
    from vlmtune.errors import VlmtuneError

    if args.rejects_per_image < 1:
        raise VlmtuneError("--rejects-per-image must be at least 1")
    return {
        "fmt": args.format,
        "strategies": parse_strategies(args.strategies),
        "rejects_per_image": args.rejects_per_image,
        "split": parse_split(args.split),
        "seed": args.seed,
    }


def _from_detections(args: argparse.Namespace) -> int:
    from vlmtune.data.pairs import pairs_from_detections, parse_mapping

    paths, stats = pairs_from_detections(
        args.dir, args.out, source_format=args.source_format, classes=_csv(args.classes),
        mapping=parse_mapping(args.map), drop=_csv(args.drop) or [], count=_csv(args.count),
        skip_bad=args.skip_bad, **_build_options(args),
    )
    _report(paths, stats, args.out)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlmtune.data.pairs import pairs_from_detections
    from vlmtune.data.synth import generate_scenes
    from vlmtune.errors import VlmtuneError

    low_high = _csv(args.count_range) or []
    if len(low_high) != 2 or not all(v.isdigit() for v in low_high):
        raise VlmtuneError(f"--count-range {args.count_range!r}: write it as LOW,HIGH, e.g. 0,4")
    options = _build_options(args) if args.pairs else None
    out = generate_scenes(args.out, args.n, args.seed, args.image_size, args.layout,
                          (int(low_high[0]), int(low_high[1])), workers=args.workers,
                          max_overlap=args.max_overlap, attributes=args.attributes)
    print(f"wrote {args.n} scenes to {out}/images, labels in {out}/labels, classes in {out}/data.yaml")
    if options:
        paths, stats = pairs_from_detections(out, Path(out) / "pairs", **options)
        _report(paths, stats, Path(out) / "pairs")
    return 0


def _report(paths: dict, stats, out) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True)
    for table in stats_tables(stats):
        console.print(table)
    for split, path in paths.items():
        console.print(f"{split}: {path}")
    console.print(f"stats: {out}/stats.json")
    if stats.skipped:
        console.print(f"[yellow]skipped {len(stats.skipped)} bad label(s) (label files, images or "
                      "annotations):[/yellow]")
        for line in stats.skipped:
            console.print(f"  {line}", markup=False)


def stats_tables(stats) -> list:
    """Rich tables of a build: images and pairs per split, objects and count distribution per
    class, pairs per strategy."""
    from rich.table import Table

    splits = Table(title="images and pairs per split")
    for col in ("split", "images", "pairs"):
        splits.add_column(col, justify="right" if col != "split" else "left")
    for name in sorted(stats.images):
        splits.add_row(name, str(stats.images[name]), str(stats.pairs_per_split[name]))
    splits.add_row("all", str(sum(stats.images.values())), str(sum(stats.pairs_per_split.values())))
    if stats.skipped:
        splits.add_row("skipped (bad labels)", str(len(stats.skipped)), "0")

    high = max((k for d in stats.distribution.values() for k in d), default=0)
    shown = list(range(min(high, 6) + 1))
    classes = Table(title="objects per class; images holding k of the class")
    classes.add_column("class")
    classes.add_column("objects", justify="right")
    for k in shown:
        classes.add_column(f"{k}" + ("+" if k == 6 and high > 6 else ""), justify="right")
    for c in stats.classes:
        d = stats.distribution.get(c, {})
        cells = [str(d.get(k, 0)) for k in shown[:-1]]
        cells.append(str(sum(v for k, v in d.items() if k >= shown[-1])))
        classes.add_row(c, str(stats.objects[c]), *cells)
    for label, counter in (("dropped", stats.dropped), ("not counted", stats.ignored)):
        for c, n in sorted(counter.items()):
            classes.add_row(f"{c} ({label})", str(n), *[""] * len(shown))

    strategies = Table(title="pairs per strategy")
    strategies.add_column("strategy")
    strategies.add_column("pairs", justify="right")
    for name, n in sorted(stats.pairs.items()):
        strategies.add_row(name, str(n))
    return [splits, classes, strategies]
