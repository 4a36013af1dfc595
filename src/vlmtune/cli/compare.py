"""`vlmtune compare`: evaluate a base model and tuned runs on the same data, write report.html.

    vlmtune compare --base runs/tiny --tuned runs/dpo --tuned runs/ipo --data pairs.jsonl --out cmp

Each model is evaluated into ``OUT/<name>/`` (metrics.json, samples.jsonl), one at a time, then
``OUT/report.html`` compares them with the first (the base).
"""

from __future__ import annotations

import argparse

from vlmtune.cli.model import add_loader, add_trust_remote_code


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "compare",
        help="evaluate base and tuned models on the same data and write a before/after report.html",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", required=True, help="base model: a checkpoint folder or hub name")
    p.add_argument("--tuned", action="append", required=True, metavar="RUN",
                   help="a training run folder (its final/ adapter is put on --base), an adapter "
                        "folder, or a merged export folder; repeat for several")
    p.add_argument("--data", required=True, help="preference records to evaluate on (any format `vlmtune data` reads)")
    p.add_argument("--out", required=True, help="output folder: one evaluation folder per model and report.html")
    p.add_argument("--names", help="comma-separated labels, base first (default: base, then each run's folder name)")
    p.add_argument("--max-gallery", type=int, default=200, metavar="N",
                   help="gallery cards at most; improved and regressed records are kept first (default 200)")
    p.add_argument("--train-data", metavar="FILE",
                   help="training file for the majority-answer baseline (default: --data itself, optimistic)")
    p.add_argument("--blank-baseline", action="store_true",
                   help="also answer every prompt with grey images of the same size (is the task visual?)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (and say which) instead of stopping")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    add_loader(p)
    add_trust_remote_code(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default="vlmtune: before / after")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from vlmtune.eval.compare import compare_models

    result = compare_models(args.base, args.tuned, args.data, args.out, names=args.names,
                            skip_bad=args.skip_bad, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, dtype=args.dtype, seed=args.seed,
                            max_gallery=args.max_gallery, title=args.title,
                            loader=args.loader, trust_remote_code=args.trust_remote_code,
                            train_data=args.train_data, blank_baseline=args.blank_baseline)
    for line in result.summaries:
        print(line)
    if result.tables:
        print(result.tables)
    print(f"report: {result.report.resolve().as_uri()}")
    return 0
