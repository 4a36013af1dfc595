"""`vlmrl compare`: evaluate a base model and tuned runs on the same data, write report.html.

    vlmrl compare --base runs/tiny --tuned runs/dpo --tuned runs/ipo --data pairs.jsonl --out cmp

Each model is evaluated into ``OUT/<name>/`` (metrics.json, samples.jsonl), one at a time, then
``OUT/report.html`` compares them with the first (the base).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmrl.cli.model import add_loader, add_trust_remote_code
from vlmrl.errors import VlmrlError


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
    p.add_argument("--data", required=True, help="preference records to evaluate on (any format `vlmrl data` reads)")
    p.add_argument("--out", required=True, help="output folder: one evaluation folder per model and report.html")
    p.add_argument("--names", help="comma-separated labels, base first (default: base, then each run's folder name)")
    p.add_argument("--max-gallery", type=int, default=200, metavar="N",
                   help="gallery cards at most; improved and regressed records are kept first (default 200)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (and say which) instead of stopping")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    add_loader(p)
    add_trust_remote_code(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default="vlmrl: before / after")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from vlmrl.data.load import load_records
    from vlmrl.report.html import write_report

    names = model_names(args.tuned, args.names)
    tuned = [resolve_run(Path(r)) for r in args.tuned]
    records = load_records(args.data, skip_bad=args.skip_bad)
    if not records:
        raise VlmrlError(f"{args.data}: no records to evaluate")
    out = Path(args.out)
    runs = [_evaluate_one(names[0], args.base, None, None, records, out, args)]
    for name, (model_path, adapter, log) in zip(names[1:], tuned):
        runs.append(_evaluate_one(name, model_path or args.base, adapter, log, records, out, args))
    max_gallery = args.max_gallery if args.max_gallery > 0 else None
    report = write_report(out, runs, title=args.title, max_gallery=max_gallery, seed=args.seed)
    summary = json.loads((out / "comparison.json").read_text())
    for model in summary["models"].values():
        print(model["summary"])
    print(f"report: {report.resolve().as_uri()}")
    return 0


def model_names(tuned: list[str], names: str | None) -> list[str]:
    """Labels, base first: ``--names`` split on commas, or ``base`` and each run's folder name."""
    if names:
        out = [n.strip() for n in names.split(",")]
        if len(out) != 1 + len(tuned) or not all(out):
            raise VlmrlError(
                f"--names needs {1 + len(tuned)} non-empty labels (base first), got {names!r}"
            )
    else:
        out = ["base"]
        for run in tuned:
            name, k = Path(run).resolve().name, 2
            while f"{name}" in out:
                name, k = f"{Path(run).resolve().name}-{k}", k + 1
            out.append(name)
    if len(set(out)) != len(out):
        raise VlmrlError(f"--names must differ from each other, got {out}")
    for n in out:
        if n in (".", "..") or "/" in n or "\\" in n:
            raise VlmrlError(f"--names: {n!r} is used as a folder name; pick one without slashes")
    return out


def resolve_run(run: Path) -> tuple[Path | None, Path | None, Path | None]:
    """``(model_path, adapter, train_log)`` for a ``--tuned`` folder.

    A training run (``final/`` inside) or an adapter folder (``adapter_config.json``) goes on top
    of ``--base`` (``model_path`` None); a merged export (``config.json``) is loaded as is.
    """
    if not run.is_dir():
        raise VlmrlError(f"--tuned {run}: no such folder")
    log = run / "metrics.jsonl"
    log = log if log.is_file() else None
    if (run / "final").is_dir() or (run / "adapter_config.json").is_file():
        return None, run, log
    if (run / "config.json").is_file():
        return run, None, log
    raise VlmrlError(
        f"--tuned {run}: not a training run (no final/), an adapter (no adapter_config.json) "
        "or a merged export (no config.json)"
    )


def _evaluate_one(name, model_path, adapter, log, records, out: Path, args):
    import gc

    from vlmrl.eval.run import evaluate, load_for_eval
    from vlmrl.report.inputs import RunResult

    what = f"{model_path}" + (f" + adapter {adapter}" if adapter else "")
    print(f"evaluating {name}: {what} on {len(records)} records", file=sys.stderr)
    model, processor = load_for_eval(str(model_path), adapter=str(adapter) if adapter else None, dtype=args.dtype,
                                     loader=args.loader, trust_remote_code=args.trust_remote_code)
    eval_dir = out / name
    evaluate(model, processor, records, eval_dir, batch_size=args.batch_size,
             max_new_tokens=args.max_new_tokens, seed=args.seed)
    del model, processor
    gc.collect()
    return RunResult(name=name, eval_dir=eval_dir, train_log=log)
