"""Two processes (accelerate launch, gloo on CPU) x batch b train exactly like one process x batch 2b.

Both on the fast pair forward: under DistributedDataParallel it runs through the wrapper.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from vlmtune.cli import main
from vlmtune.config import validate_config
from vlmtune.train.loop import Trainer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(model_dir, data, out, batch_size) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"train": str(data), "max_length": 128},
        "loss": {"name": "dpop", "dpop_lambda": 5.0},
        "train": {"output_dir": str(out), "lr": 1e-2, "max_steps": 3, "batch_size": batch_size, "grad_accum": 2,
                  "warmup_ratio": 0.0, "schedule": "linear", "seed": 3, "progress": False},
    }


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_process_with_the_global_batch(tiny_model_dir, synth_pairs_file, tmp_path, capsys):
    two = tmp_path / "two"
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config(tiny_model_dir, synth_pairs_file, two, batch_size=2)))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "vlmtune", "train", "--algo", "dpo", "--config", str(path)]
    # On a machine without GPUs accelerate needs ACCELERATE_USE_CPU to start CPU (gloo) processes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fast pair forward off" not in done.stderr  # the fast forward runs through the DDP wrapper

    one = tmp_path / "one"
    Trainer(validate_config(config(tiny_model_dir, synth_pairs_file, one, batch_size=4))).train()

    a, b = rows(two), rows(one)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for name in ra.keys() - {"pairs_per_s"}:
            assert math.isclose(ra[name], rb[name], rel_tol=1e-5, abs_tol=1e-6), (ra["step"], name, ra[name], rb[name])
    assert a[-1]["rewards/margins"] != a[0]["rewards/margins"]  # it did learn something
    adapter_two = load_file(two / "final" / "adapter_model.safetensors")
    adapter_one = load_file(one / "final" / "adapter_model.safetensors")
    assert adapter_two.keys() == adapter_one.keys()
    for name in adapter_one:
        # Loose enough for Adam's sign-like first steps on near-zero gradients (see test_train's
        # accumulation test); the loss, margins and grad_norm above are compared at 1e-5.
        torch.testing.assert_close(adapter_two[name], adapter_one[name], rtol=1e-3, atol=1e-4)

    # The two-process checkpoint cannot be resumed by one process: its data position means other records.
    assert main(["train", "--config", str(path), "--resume", "train.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert f"{two / 'checkpoints' / 'step-000003'} was written with num_processes=2; this run has num_processes=1" in err
