"""`vlmrl demo`: the main job, offline on a CPU, end to end, with a before/after table and report."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "demo",
        help="train a tiny Qwen2-VL offline and show whether preference training helped",
        description=(
            "Synthetic traffic scenes -> tiny Qwen2-VL -> SFT warm-up -> sampled answers judged by a "
            "simulated rater -> preference training (LoRA) -> before/after evaluation and report. "
            "A stage finished in --out with the same settings and inputs is reused; any difference "
            "(--quick, --seed, a changed default) reruns it and every stage after it."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: demo-out)")
    p.add_argument("--full", action="store_true",
                   help="compare every method: offline on the rater's pairs (SFT-on-chosen control, DPO, DPOP, RPO, IPO, "
                        "MPO), on the model's own scored samples (RFT control, online DPOP and MPO, iterative DPOP) "
                        "and GRPO; the table's scored-samples column is each run's budget")
    p.add_argument("--quick", action="store_true", help="a cut-down run (small sizes) to check the pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlmrl.demo import main

    return main(args.out, full=args.full, quick=args.quick, seed=args.seed)
