"""`vlmtune demo`: the main job, offline on a CPU, end to end, with a before/after table and report."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmtune.errors import VlmtuneError


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "demo",
        help="train a tiny Qwen2-VL offline and show whether preference training or RL helped",
        description=(
            "--task counting (default): synthetic traffic scenes -> tiny Qwen2-VL -> SFT warm-up -> sampled "
            "answers judged by a simulated rater -> preference training (LoRA) -> before/after evaluation and "
            "report. --task reasoning: scenes with colours and sizes -> questions of six task families -> SFT "
            "warm-up on three of them -> GRPO on the task reward beside rejection-sampling fine-tuning and SFT "
            "on gold answers for the same steps, and GRPO with thinking on -> accuracy per family, hop count "
            "and OOD axis. A stage finished in --out with the same settings and inputs is reused; any "
            "difference (--quick, --seed, a changed default) reruns it and every stage after it."
        ),
    )
    p.add_argument("--task", choices=("counting", "reasoning"), default="counting",
                   help="counting (preference losses, the default) or reasoning (GRPO on task rewards)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: demo-out, or demo-reasoning for --task reasoning)")
    p.add_argument("--full", action="store_true",
                   help="counting: compare every method: offline on the rater's pairs (SFT-on-chosen control, DPO, DPOP, RPO, IPO, "
                        "MPO), on the model's own scored samples (RFT control, online DPOP and MPO, iterative DPOP) "
                        "and GRPO; the table's scored-samples column is each run's budget")
    p.add_argument("--quick", action="store_true", help="a cut-down run (small sizes) to check the pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.task == "reasoning":
        from vlmtune.demo_reasoning import main as reasoning

        if args.full:
            raise VlmtuneError("--full compares the preference losses of --task counting; "
                             "--task reasoning always runs all its methods")
        return reasoning(args.out or Path("demo-reasoning"), quick=args.quick, seed=args.seed)
    from vlmtune.demo import main

    return main(args.out or Path("demo-out"), full=args.full, quick=args.quick, seed=args.seed)
