"""How the data path scales: generate N synthetic scenes, turn them into pairs, check the pairs.

    python benchmarks/data_scale.py            # 10,000 images
    python benchmarks/data_scale.py --n 1000   # smaller

Each stage runs in its own process so its peak resident memory (the process and, for the pools,
its largest worker) is its own. Targets on 2 cores: generation <= 60 s, pairs <= 30 s,
check <= 30 s. Images are streamed to disk and never held, so memory should grow only with the
records.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"generate": 60.0, "pairs": 30.0, "check": 30.0}


def run_stage(stage: str, work: Path, n: int, size: int, layout: str) -> dict:
    """Run one stage here and return its time and peak RSS (MiB)."""
    start = time.perf_counter()
    if stage == "generate":
        from vlmtune.data.synth import generate_scenes

        count_range = (0, 4) if layout == "grid" else (0, 6)
        generate_scenes(work / "scenes", n, seed=0, image_size=size, layout=layout, count_range=count_range, workers=2)
        detail = f"{n} images"
    elif stage == "pairs":
        from vlmtune.data.pairs import pairs_from_detections

        paths, stats = pairs_from_detections(work / "scenes", work / "pairs", split={"train": 1.0}, seed=0)
        detail = f"{sum(stats.pairs.values())} pairs"
    else:
        from vlmtune.data.check import check_records

        report = check_records(work / "pairs" / "train.jsonl", workers=2)
        detail = f"{report.records_read} records, {len(report.problems)} problems"
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"stage": stage, "seconds": seconds, "rss_mib": own, "worker_rss_mib": children, "detail": detail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of images (default 10000)")
    parser.add_argument("--image-size", type=int, default=112, help="image side (default 112)")
    parser.add_argument("--layout", default="grid", choices=("grid", "free"), help="grid (counts 0-4) or free (0-6)")
    parser.add_argument("--workdir", help="where to write (default: a temporary folder, removed after)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vlmtune-data-scale-"))
    if args.stage:
        print(json.dumps(run_stage(args.stage, work, args.n, args.image_size, args.layout)))
        return
    rows = []
    try:
        for stage in TARGETS:
            out = subprocess.run([sys.executable, __file__, "--stage", stage, "--n", str(args.n), "--workdir", str(work),
                                  "--image-size", str(args.image_size), "--layout", args.layout],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"data scale, {args.n} synthetic images ({args.image_size} px {args.layout}), 2 workers")
    print(f"{'stage':<10} {'seconds':>8} {'target':>7} {'peak RSS MiB':>13} {'worker RSS MiB':>15}  detail")
    for r in rows:
        ok = "ok" if r["seconds"] <= TARGETS[r["stage"]] else "SLOW"
        print(f"{r['stage']:<10} {r['seconds']:>8.1f} {TARGETS[r['stage']]:>6.0f}s {r['rss_mib']:>13.0f} "
              f"{r['worker_rss_mib']:>15.0f}  {r['detail']} [{ok}]")


if __name__ == "__main__":
    main()
