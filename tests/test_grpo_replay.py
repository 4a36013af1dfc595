"""GRPO through the loop: accumulation does not change the curve, and a run killed mid-way through a
generation batch's num_iterations updates resumes on the identical curve."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from test_train import wait_for
from vlmtune.cli import main
from vlmtune.config import validate_config
from vlmtune.train import checkpoint
from vlmtune.train.loop import Trainer

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def stopping_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with every 5th token id an end-of-sequence id, so completions stop at different
    lengths and micro-batches hold different numbers of tokens (what token normalisation is about)."""
    folder = tmp_path_factory.mktemp("stopping") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    vocab = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
    config["eos_token_id"] = sorted(set(config["eos_token_id"]) | set(range(7, vocab, 5)))
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def grpo_raw(model_dir, data, out, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"train": str(data), "max_length": 128},
        "train": {"algo": "grpo", "output_dir": str(out), "lr": 1e-2, "max_steps": 4, "batch_size": 2,
                  "grad_accum": 1, "schedule": "constant", "warmup_ratio": 0.0, "save_every": 2,
                  "progress": False, **train},
        "grpo": {"group_size": 4, "max_new_tokens": 6, "beta": 0.05, "num_iterations": 2, "clip_eps": 0.01,
                 "rewards": [{"name": "test_grpo:length_reward"}]},
    }


def train_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def close(a: float, b: float, tol: float) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def test_grpo_accumulation_2_equals_accumulation_1(stopping_model_dir, synth_pairs_file, tmp_path):
    """Batch 2 x accumulation 1 = batch 1 x accumulation 2: same samples (drawn per optimizer step), the
    loss normalised by the whole global batch's tokens, so the same curve and weights within 1e-5;
    num_iterations 2 with a tight clip, so the replayed updates (ratio != 1) are compared too."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    # lr 2e-3: Adam turns float noise in a near-zero gradient into a step of up to lr; below 1e-5 here.
    Trainer(validate_config(grpo_raw(stopping_model_dir, synth_pairs_file, one, lr=2e-3))).train()
    Trainer(validate_config(grpo_raw(stopping_model_dir, synth_pairs_file, two, lr=2e-3, batch_size=1,
                                     grad_accum=2))).train()
    a, b = train_rows(one), train_rows(two)
    assert all(r["completions/min_length"] < r["completions/max_length"] for r in a)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 and r["frac_reward_zero_std"] < 1 for r in a)  # real updates
    assert any(r["clip_fraction"] > 0 for r in a)  # the replays clip
    for ra, rb in zip(a, b):
        for name in ("loss", "reward", "reward_std", "completions/mean_length", "grad_norm"):
            assert close(ra[name], rb[name], 1e-5), (ra["step"], name, ra[name], rb[name])
    weights_a = load_file(one / "final" / "adapter_model.safetensors")
    weights_b = load_file(two / "final" / "adapter_model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert (weights_a[name] - weights_b[name]).abs().max() < 1e-5, name


def test_grpo_killed_mid_replay_resumes_on_the_identical_curve(tiny_model_dir, synth_pairs_file, tmp_path):
    """num_iterations 3, a checkpoint every 2 steps: step 2 is the 2nd of 3 updates on the first
    generation batch, step 4 the 1st on the second; the kept batch goes into the checkpoint."""
    whole = tmp_path / "whole"
    raw = grpo_raw(tiny_model_dir, synth_pairs_file, whole, max_steps=6)
    raw["grpo"]["num_iterations"] = 3
    Trainer(validate_config(raw)).train()
    run = tmp_path / "run"
    raw["train"]["output_dir"] = str(run)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "vlmtune", "train", "--config", str(path), "train.max_steps=100000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(run / "checkpoints" / "step-000002", process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL and not (run / "final").exists()
    kept = run / "checkpoints" / "step-000002"
    assert json.loads((kept / "state.json").read_text())["process_state"] and (kept / "process-0.pt").is_file()
    damaged = tmp_path / "damaged"
    shutil.copytree(kept, damaged)
    (damaged / "process-0.pt").write_bytes((damaged / "process-0.pt").read_bytes()[:100])
    assert "process-0.pt: not a complete torch.save file" in checkpoint.damage(damaged, 1)

    assert main(["train", "--config", str(path), "--resume"]) == 0
    a, b = train_rows(whole), train_rows(run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert any(r["clip_fraction"] > 0 for r in a)
    for ra, rb in zip(a, b):
        for name in ra.keys() - {"pairs_per_s"}:
            assert close(ra[name], rb[name], 1e-6), (ra["step"], name, ra[name], rb[name])
    last = json.loads((run / "checkpoints" / "step-000006" / "state.json").read_text())
    assert "process_state" not in last  # all 3 updates of the second batch done: nothing to keep
    assert not (run / "checkpoints" / "step-000006" / "process-0.pt").exists()
