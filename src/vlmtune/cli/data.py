"""`vlmtune data ...`: read, check, convert and build preference data."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from vlmtune.data.formats import FORMATS  # light: the readers import datasets only when used

FORMAT_NAMES = tuple(FORMATS)


def add_commands(commands: argparse._SubParsersAction) -> None:
    from vlmtune.cli import data_build, tasks

    data = commands.add_parser("data", help="read, check, convert and build preference data")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    _add_check(sub)
    _add_convert(sub)
    data_build.add_commands(sub)
    tasks.add_data_commands(sub)


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="report every problem in a preference data file",
                       description="Read every record and report all problems with their line "
                       "(JSONL) or index (JSON) and what to do, images included: unreadable, or a "
                       "shape the Qwen-VL processors refuse (aspect ratio above 200). Images above "
                       "4096x4096 pixels are warnings. Exit status 1 when any problem is found "
                       "(warnings alone exit 0).")
    p.add_argument("file", help="data file (.json, .jsonl, .parquet) or datasets folder")
    p.add_argument("--format", choices=FORMAT_NAMES, default=None, help="skip auto-detection")
    p.add_argument("--max-chars", type=int, default=4000,
                   help="longest prompt, chosen or rejected text allowed (default 4000)")
    p.add_argument("--no-images", action="store_true",
                   help="check that image files exist but do not decode them")
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.add_argument("--for", dest="for_algo", choices=("kto",), default=None,
                   help="kto: check for `train --algo kto`, which also accepts records with one answer "
                   "(completion, label); without it such records are problems")
    p.set_defaults(func=_check)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert preference data between formats",
                       description="Convert between vlmtune (canonical JSONL), seed, trl, "
                       "llamafactory, swift and hf. The output suffix picks .json or .jsonl; "
                       "for hf, .parquet or a datasets folder.")
    p.add_argument("input", help="data file or datasets folder to read")
    p.add_argument("output", help="file or folder to write")
    p.add_argument("--to", required=True, choices=FORMAT_NAMES, help="output format")
    p.add_argument("--from", dest="from_format", choices=FORMAT_NAMES, default=None,
                   help="input format (default: detected)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip records that cannot be read (and say which) instead of stopping")
    p.add_argument("--unpair", action="store_true",
                   help="write each pair as two records with one answer each, chosen desirable and rejected "
                   "undesirable (ids ID-desirable, ID-undesirable), for `train --algo kto`; as TRL's "
                   "unpair_preference_dataset. Output format vlmtune or trl")
    p.set_defaults(func=_convert)


def _check(args: argparse.Namespace) -> int:
    from vlmtune.data.check import check_records

    report = check_records(args.file, args.format, max_chars=args.max_chars,
                           check_images=not args.no_images, kto=args.for_algo == "kto")
    if args.json:
        print(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
    else:
        _print_report(report)
    return 0 if report.ok else 1


def _print_report(report) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    for p in report.problems:
        console.print(escape(f"{p.location}: {p.kind}: {p.message}"))
    for p in report.warnings:
        console.print(escape(f"{p.location}: warning: {p.kind}: {p.message}"))
    table = Table(title=f"{report.path} (format: {report.format or 'unknown'})")
    table.add_column("problem")
    table.add_column("count", justify="right")
    for kind, n in report.counts().items():
        table.add_row(kind, str(n))
    for kind, n in report.warning_counts().items():
        table.add_row(f"{kind} (warning)", str(n))
    table.add_section()
    table.add_row("records read", str(report.records_read))
    table.add_row("records ok", str(report.ok_records))
    table.add_row("records bad", str(report.bad_records))
    console.print(table)
    console.print("no problems found" if report.ok else
                  f"{len(report.problems)} problem(s) found")
    if report.warnings:
        console.print(f"{len(report.warnings)} warning(s)")


def _convert(args: argparse.Namespace) -> int:
    from vlmtune.data.formats import detect_format, read_records
    from vlmtune.data.records import unpair
    from vlmtune.data.writers import write_records

    source = args.from_format or detect_format(args.input)
    # Read everything first, so a bad record stops the command before a half-written output.
    skipped: list = []
    records = read_records(args.input, source, skip_bad=args.skip_bad, skipped=skipped)
    if args.unpair:
        records = [one for record in records for one in unpair(record)]
    write_records(records, args.output, args.to)
    print(f"wrote {len(records)} records to {args.output} ({args.to}) from {args.input} ({source})")
    if skipped:
        print(f"skipped {len(skipped)} bad record(s) (listed above): "
              + ", ".join(f"{kind} {n}" for kind, n in Counter(p.kind for p in skipped).most_common()))
    return 0
