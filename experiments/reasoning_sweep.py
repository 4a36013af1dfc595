"""Run the reasoning demo's protocol on the VALIDATION split with some settings changed.

    python experiments/reasoning_sweep.py OUT key=value ...   e.g. rl_steps=120 rl_lr=1e-3

Prints the three tables and the verdict; appends one JSON line per model to
experiments/reasoning_sweep.jsonl. The test split is not read unless ``eval_split=test`` is given
(once, for a set-up chosen on validation: the trained stages in OUT are reused, only the
evaluations run). (The lines already there were
written by the demo's earlier code: per-family keys ``all``/``family/X``/``format``, the offline RFT
with its ``rft`` counts; lines written now carry ``vlmtune eval``'s metric names.)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from vlmtune.demo_reasoning import ReasoningSettings, run_reasoning_demo, tables, verdict


def parse(pairs: list[str]) -> dict:
    types = {f.name: f.type for f in fields(ReasoningSettings)}
    out = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        out[key] = json.loads(value) if types[key] not in ("str", "Path") else value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def main() -> None:
    out, overrides = Path(sys.argv[1]), parse(sys.argv[2:])
    s = replace(ReasoningSettings(out=out, eval_split="val"), **overrides)
    start = time.perf_counter()
    rows = run_reasoning_demo(s)["rows"]
    wall = time.perf_counter() - start
    print(tables(rows, s.eval_split))
    print(verdict(rows, s.eval_split))
    print(f"total wall time: {wall:.0f} s")
    with open(Path(__file__).with_name("reasoning_sweep.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps({"out": str(out), "overrides": overrides, "method": r["method"],
                                "wall_s": r["wall_s"], "total_s": wall, "paired": r["paired"],
                                s.eval_split: r["results"][s.eval_split], **{k: v["task/accuracy"] for k, v in r["results"].items()
                                                               if k.startswith("ood_")}}) + "\n")


if __name__ == "__main__":
    main()
