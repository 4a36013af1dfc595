"""Full fine-tuning under FSDP 2 on two CPU processes (gloo) trains exactly like one process with the global batch.

accelerate runs CPU processes as DDP even when FSDP is asked for; ``vlmtune.train.sharding`` shards
the model itself there, so this test runs the sharded checkpoint, resume and gathering code that
GPU runs use. The run stops at step 2 (a checkpoint written while sharded), resumes to step 4,
and its curve and gathered final model must match one unsharded process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from vlmtune.config import validate_config
from vlmtune.train import checkpoint
from vlmtune.train.loop import Trainer

from test_multiprocess import free_port


def config(model_dir, data, out, batch_size, max_steps) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"enabled": False},
        "data": {"train": str(data), "max_length": 128},
        "loss": {"name": "dpo"},
        "train": {"output_dir": str(out), "lr": 1e-3, "max_steps": max_steps, "batch_size": batch_size,
                  "grad_accum": 1, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 2, "seed": 3,
                  "progress": False},
    }


def launch_fsdp(config_path: Path, *extra: str) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "vlmtune", "train", "--config", str(config_path), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final model:") == 1  # the main process reports, not each one


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_two_processes_checkpoint_resume_and_gathered_model(tiny_model_dir, synth_pairs_file, tmp_path):
    sharded = tmp_path / "fsdp"
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(config(tiny_model_dir, synth_pairs_file, sharded, batch_size=2, max_steps=2)))
    launch_fsdp(path)
    written = sharded / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (written / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (written / "trainable.safetensors").exists()  # no process held the whole model to write it
    launch_fsdp(path, "--resume", "train.max_steps=4")
    assert_damaged_shard_is_named(sharded / "checkpoints" / "step-000004", tmp_path / "damaged")

    whole = tmp_path / "one"
    Trainer(validate_config(config(tiny_model_dir, synth_pairs_file, whole, batch_size=4, max_steps=4))).train()

    a, b = rows(sharded), rows(whole)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for name in ra.keys() - {"pairs_per_s"}:
            assert math.isclose(ra[name], rb[name], rel_tol=1e-5, abs_tol=1e-6), (ra["step"], name, ra[name], rb[name])

    from transformers import AutoModelForImageTextToText

    gathered = AutoModelForImageTextToText.from_pretrained(sharded / "final")  # a plain transformers folder
    reference = load_file(whole / "final" / "model.safetensors")
    weights = load_file(sharded / "final" / "model.safetensors")
    # The gathered state names the tied output embedding too (a copy of embed_tokens); the rest is the same.
    assert weights.keys() - reference.keys() <= {"lm_head.weight"} and reference.keys() <= weights.keys()
    for name in reference:
        # Adam's sign-like steps on near-zero gradients: see test_train's accumulation test.
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-3, atol=1e-4)
    initial = load_file(tiny_model_dir / "model.safetensors")
    changed = [n for n in reference if not torch.equal(weights[n], initial[n])]
    assert any("layers.0.mlp" in n for n in changed)  # the language model was fine-tuned
    assert not any("visual.blocks" in n for n in changed)  # the frozen vision tower was not
    loaded = dict(gathered.named_parameters())
    torch.testing.assert_close(loaded["model.language_model.layers.0.mlp.up_proj.weight"],
                               weights["model.layers.0.mlp.up_proj.weight"], rtol=0, atol=0)


def assert_damaged_shard_is_named(written: Path, copy: Path) -> None:
    """A truncated shard of a sharded checkpoint is found before resuming, by its index."""
    import shutil

    assert checkpoint.damage(written, num_processes=2) is None
    shutil.copytree(written, copy)
    shard = copy / "sharded" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    problem = checkpoint.damage(copy, num_processes=2)
    assert problem.startswith(f"{copy / 'sharded'}: __1_0.distcp is truncated (1000 bytes"), problem
