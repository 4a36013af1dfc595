"""What the speed benchmarks share: a worker process per path, the clock, the precision and the device.

``dpo_speed.py`` and ``grpo_speed.py`` run every path (TRL, ours, a floor) in its own process
(``run_worker``: the script again with ``--worker PATH``), so each path's peak memory is its own and
no path inherits another's caches. Inside a worker:

- the clock (``Clock``): on CPU the figure compared is the process's CPU seconds (other load on a
  shared machine only ever adds wall time); on a GPU it is wall seconds, read after
  ``torch.cuda.synchronize()``, since the process's CPU time there measures only the kernel launches.
  Both figures are kept: ``seconds`` (the compared one) and ``wall_seconds``.
- peak memory (``peak_mib``): the process's peak RSS on CPU, the peak of allocated GPU memory on a GPU;
- the precision (``--precision``): fp32, or bf16 autocast on every path (TRL's own configs default
  to bf16, so TRL is told the same precision explicitly);
- the device (``--device``): cpu, or cuda (the model and every batch on the GPU, TRL without ``use_cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def build_parser(description: str, configs: list[str], paths: tuple[str, ...], quick_help: str,
                 worker_numbers: tuple[str, ...]) -> argparse.ArgumentParser:
    """A benchmark's command line: ``--configs``, the run options, ``--quick``, and the hidden options its
    worker processes are started with (``--worker PATH --model --data --work`` and ``worker_numbers``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--configs", nargs="+", default=configs, choices=configs)
    add_run_args(parser)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--worker", choices=paths, help=argparse.SUPPRESS)
    for name in ("--model", "--data", "--work"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name in worker_numbers:
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    return parser


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: threads, repeats, device, precision."""
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=3, help="runs per path, in turn; the fastest is shown")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (times in process CPU seconds) or cuda (synchronized wall seconds)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="every path's precision: fp32, or bf16 autocast (TRL's default)")


def describe(args) -> str:
    """The table headers' words for the device, precision and what the times are."""
    if args.device == "cuda":
        return f"{args.precision} on the GPU, times in wall seconds after synchronizing"
    return f"{args.precision} CPU, times in process CPU seconds (wall s beside them)"


class Clock:
    """``now()`` and ``since(start)``: the compared seconds (CPU time on CPU, wall time on a GPU) and wall seconds."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def now(self) -> tuple[float, float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def since(self, start: tuple[float, float]) -> dict:
        wall, cpu = self.now()
        wall, cpu = wall - start[0], cpu - start[1]
        return {"seconds": wall if self.cuda else cpu, "wall_seconds": wall}


def autocast(args):
    """A fresh autocast context for the worker's device and precision (a no-op for fp32)."""
    from vlmtune.train.precision import Precision

    return Precision("bf16" if args.precision == "bf16" else "no", args.device).autocast()


def peak_mib(device: str) -> float:
    """Peak memory of this process: allocated GPU memory on a GPU, resident memory on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: str, path: str, options: list[str], args) -> dict:
    """Run ``script --worker path`` in a fresh process; its last stdout line is its JSON result."""
    command = [sys.executable, script, "--worker", path, *options, "--threads", str(args.threads),
               "--device", args.device, "--precision", args.precision]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        return {"error": f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])
