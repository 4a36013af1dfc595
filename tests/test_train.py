"""Training on the tiny models: every algorithm and loss learns what it should and nothing else,
accumulation and resumption do not change the loss curve, and failures stop cleanly."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from vlmtune.cli import main
from vlmtune.config import validate_config
from vlmtune.train.loop import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRL_NAMES = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "lr", "grad_norm", "step", "epoch", "pairs_per_s"}



def raw_config(model_dir, data, out, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "max_length": 128},
        "loss": {"name": "dpo"},
        "train": {"output_dir": str(out), "lr": 1e-2, "max_steps": 2, "batch_size": 2, "grad_accum": 1,
                  "warmup_ratio": 0.0, "schedule": "constant", "progress": False, **train},
    }


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r]


def small_eval_file(pairs_file: Path, out: Path, n: int = 4) -> Path:
    """The first ``n`` pairs of ``pairs_file`` as held-out data (image paths made absolute)."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()[:n]]
    for row in rows:
        row["images"] = [str((pairs_file.parent / image).resolve()) for image in row["images"]]
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def assert_same_curve(a: list[dict], b: list[dict], tol=1e-6):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for name in ra.keys() - {"pairs_per_s"}:
            assert math.isclose(ra[name], rb[name], rel_tol=tol, abs_tol=tol), (ra["step"], name, ra[name], rb[name])


CASES = [  # (family, algo, loss, lora, train settings): every loss, two families
    ("qwen2-vl", "dpo", {"name": "dpo", "sft_weight": 0.5}, {}, {}),
    ("qwen2-vl", "dpo", {"name": "ipo"}, {}, {}),
    ("qwen2-vl", "dpo", {"name": "robust", "label_smoothing": 0.1}, {}, {}),
    ("qwen2.5-vl", "dpo", {"name": "dpop", "dpop_lambda": 5.0}, {}, {"gradient_checkpointing": True}),
    ("qwen2.5-vl", "dpo", {"name": "hinge"}, {}, {"mixed_precision": "bf16"}),  # CPU autocast
    ("qwen2.5-vl", "dpo", {"name": "simpo", "beta": 2.0}, {}, {}),
    ("qwen2-vl", "sft", {}, {}, {}),
    ("qwen2.5-vl", "sft", {}, {"merger": True}, {"weight_decay": 0.1}),
    ("qwen2-vl", "dpo", {"name": "dpo"}, {"enabled": False}, {}),  # full fine-tuning, frozen-copy reference
]


def train_and_check_only_trainables_change(raw: dict) -> None:
    """Train the run ``raw`` describes; every trainable parameter must change and no frozen one."""
    trainer = Trainer(validate_config(raw))
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(before)
    trainer.train()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"


@pytest.mark.parametrize("family, algo, loss, lora, settings", CASES, ids=lambda v: str(v))
def test_every_trainable_parameter_changes_and_no_frozen_one(
    family, algo, loss, lora, settings, tiny_model_dir, tiny_qwen25_dir, synth_pairs_file, tmp_path
):
    model_dir = tiny_model_dir if family == "qwen2-vl" else tiny_qwen25_dir
    raw = raw_config(model_dir, synth_pairs_file, tmp_path / "run", algo=algo, **settings)
    raw["loss"].update(loss)
    raw["lora"].update(lora)
    train_and_check_only_trainables_change(raw)
    rows = train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    sft_names = {"loss", "logps/chosen", "lr", "grad_norm", "step", "epoch", "pairs_per_s"}
    expected = TRL_NAMES if algo == "dpo" else sft_names
    assert set(rows[0]) == expected


def test_cli_run_writes_metrics_checkpoints_final_and_config(tiny_model_dir, synth_pairs_file, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [f"model.name_or_path={tiny_model_dir}", f"data.train={synth_pairs_file}",
                 f"data.eval={small_eval_file(synth_pairs_file, tmp_path / 'eval.jsonl')}",
                 f"train.output_dir={run}", "train.max_steps=3",
                 "train.batch_size=2", "train.grad_accum=1", "train.eval_every=2", "train.save_every=1",
                 "train.keep_last=2", "train.progress=false"]
    assert main(["train", "--algo", "dpo", "--config", str(CONFIGS / "demo-cpu.yaml"), *overrides]) == 0
    assert "final model" in capsys.readouterr().out
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 3]
    assert all(0 <= r["eval/rewards/accuracies"] <= 1 and math.isfinite(r["eval/loss"]) for r in evals)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-000002", "step-000003"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "processor_config.json"):
        assert (run / "final" / name).is_file(), name
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loss"]["name"] == "dpop" and saved["train"]["max_steps"] == 3
    # a new run must not silently overwrite this one
    assert main(["train", "--config", str(CONFIGS / "demo-cpu.yaml"), *overrides]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_batch_8_equals_batch_1_with_8_accumulation_steps(tiny_model_dir, synth_pairs_file, tmp_path):
    """TRL's invariant: one optimizer step over the same 8 pairs, split differently."""
    results = []
    for batch, accum in ((8, 1), (1, 8)):
        raw = raw_config(tiny_model_dir, synth_pairs_file, tmp_path / f"b{batch}", max_steps=1,
                         batch_size=batch, grad_accum=accum)
        trainer = Trainer(validate_config(raw))
        trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((params, train_rows(tmp_path / f"b{batch}")))
    (params_a, rows_a), (params_b, rows_b) = results
    assert_same_curve(rows_a, rows_b, tol=1e-5)
    assert any(p.abs().sum() > 0 for n, p in params_a.items() if "lora_B" in n)
    for name in params_a:
        # Adam's first step is about lr * sign(g): where |g| is near eps, a 1e-7 difference in the
        # summation order moves that element by up to ~1e-4 (lr 1e-2). The gradients themselves agree
        # to ~1e-6 of each tensor's largest entry; their size is checked through grad_norm above.
        torch.testing.assert_close(params_a[name], params_b[name], rtol=1e-3, atol=1e-4)


def test_early_stopping_when_eval_loss_stops_improving(tiny_model_dir, synth_pairs_file, tmp_path):
    # lr 1e-30 leaves the eval loss exactly where it was: no evaluation improves on the first
    raw = raw_config(tiny_model_dir, synth_pairs_file, tmp_path / "run", lr=1e-30, max_steps=10,
                     eval_every=1, early_stopping_patience=2)
    raw["data"]["eval"] = str(small_eval_file(synth_pairs_file, tmp_path / "eval.jsonl"))
    Trainer(validate_config(raw)).train()
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "eval/loss" in r] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "step-000003").is_dir()
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, synth_pairs_file, tmp_path, capsys):
    # lr 1e30: the first update is finite but enormous, the next forward overflows to NaN
    run = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw_config(tiny_model_dir, synth_pairs_file, run, lr=1e30, max_steps=5,
                                              save_every=1, max_grad_norm=None)))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "became nan at step 2" in err and "last good checkpoint is" in err and "step-000001" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert not (run / "final").exists()


def cli_subprocess(config_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlmtune", "train", "--config", str(config_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(path: Path, process: subprocess.Popen, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_dir():
        assert process.poll() is None, f"the run ended before writing {path}: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, synth_pairs_file, tmp_path_factory) -> list[dict]:
    """The reference curve: 6 steps of dpo in one go (dropout on, so random states matter)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    raw = resumable_config(tiny_model_dir, synth_pairs_file, out)
    Trainer(validate_config(raw)).train()
    return train_rows(out)


def resumable_config(model_dir, data, out) -> dict:
    # A constant schedule: the killed run below is given far more steps, which must not change the lr.
    raw = raw_config(model_dir, data, out, lr=5e-3, max_steps=6, save_every=2, warmup_ratio=0.0,
                     schedule="constant", batch_size=1, grad_accum=2)
    raw["lora"]["dropout"] = 0.1
    return raw


def test_resume_after_kill_9_gives_the_identical_curve(uninterrupted, tiny_model_dir, synth_pairs_file, tmp_path):
    run = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(resumable_config(tiny_model_dir, synth_pairs_file, run)))
    # 100,000 steps: the run cannot finish between two polls, so it is killed mid-training.
    process = cli_subprocess(path, "train.max_steps=100000")
    wait_for(run / "checkpoints" / "step-000002", process)
    assert process.poll() is None  # still training
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL and not (run / "final").exists()
    assert train_rows(run)[-1]["step"] < 100000
    assert main(["train", "--config", str(path), "--resume"]) == 0
    assert_same_curve(train_rows(run), uninterrupted)


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_the_curve(
    uninterrupted, tiny_model_dir, synth_pairs_file, tmp_path
):
    run = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(resumable_config(tiny_model_dir, synth_pairs_file, run)))
    process = cli_subprocess(path, "train.max_steps=100000")  # still training when Ctrl-C comes
    wait_for(run / "checkpoints" / "step-000002", process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "interrupted: saved checkpoint" in err and "Traceback" not in err
    last_logged = train_rows(run)[-1]["step"]
    assert (run / "checkpoints" / f"step-{last_logged:06d}").is_dir() and last_logged < 6
    assert main(["train", "--config", str(path), "train.resume=auto"]) == 0
    assert_same_curve(train_rows(run), uninterrupted)


def one_step_run(model_dir, data, out, **train) -> Trainer:
    trainer = Trainer(validate_config(raw_config(model_dir, data, out, max_steps=1, **train)))
    trainer.train()
    return trainer


def test_runs_of_different_precision_follow_each_other_in_one_process(tiny_model_dir, synth_pairs_file, tmp_path):
    """accelerate fixes one precision per process; the run's own autocast must still change the numbers."""
    losses = {}
    for mode in ("no", "bf16", "fp16", "no"):
        out = tmp_path / f"{mode}-{len(losses)}"
        one_step_run(tiny_model_dir, synth_pairs_file, out, mixed_precision=mode)
        losses[f"{mode}-{len(losses)}"] = train_rows(out)[0]["logps/chosen"]
    assert losses["no-0"] == losses["no-3"]  # the first run left nothing behind
    assert losses["bf16-1"] != losses["no-0"] and losses["fp16-2"] != losses["no-0"]  # autocast took effect
    assert math.isclose(losses["bf16-1"], losses["no-0"], rel_tol=0.05)


def test_fp16_overflow_skips_the_step_and_the_schedule(tiny_model_dir, synth_pairs_file, tmp_path, caplog):
    """A loss scale of 2**40 overflows fp16 gradients: GradScaler skips every step and halves its scale.

    As documented in the loop: the step counter and data position advance and the rows are logged
    (grad_norm null), the weights, the optimizer and the lr schedule do not move, and the run goes on.
    """
    raw = raw_config(tiny_model_dir, synth_pairs_file, tmp_path / "run", mixed_precision="fp16", max_steps=2,
                     schedule="linear", warmup_ratio=0.5, save_every=1)
    trainer = Trainer(validate_config(raw))
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with caplog.at_level("WARNING", logger="vlmtune"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    rows = train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] is None for r in rows)
    assert rows[0]["lr"] == rows[1]["lr"] == 0.0  # warm-up starts at 0 and was never stepped
    assert trainer.scheduler.last_epoch == 0 and trainer.optimizer.optimizer.state == {}
    assert "fp16 gradients overflowed" in caplog.text and "lowered its scale to 2.74878e+11" in caplog.text
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-000002" / "scaler.pt", weights_only=True)
    assert saved["scale"] == 2.0**38


def test_fp16_trains_with_its_scaler_on_cpu(tiny_model_dir, synth_pairs_file, tmp_path):
    trainer = Trainer(validate_config(raw_config(tiny_model_dir, synth_pairs_file, tmp_path / "run",
                                                 mixed_precision="fp16")))
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    rows = train_rows(tmp_path / "run")
    assert all(math.isfinite(r["grad_norm"]) for r in rows)
    assert trainer.precision.scaler.get_scale() == 2.0**16  # no overflow in two steps
