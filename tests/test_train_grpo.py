"""`vlmtune train --algo grpo` through the real loop, and the fast and plain preference paths giving one curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

from vlmtune.cli import main
from vlmtune.config import validate_config
from vlmtune.train.fast_step import FastPreferenceStep
from vlmtune.train.loop import Trainer
from vlmtune.train.steps import PreferenceStep

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_grpo_from_the_cli_logs_rewards_and_held_out_exact_match(tiny_model_dir, synth_pairs_file, tmp_path, capsys):
    run = tmp_path / "grpo"
    args = ["train", "--algo", "grpo", "--config", str(CONFIGS / "demo-cpu.yaml"),
            f"model.name_or_path={tiny_model_dir}", f"data.train={synth_pairs_file}",
            f"data.eval={synth_pairs_file}", f"train.output_dir={run}", "train.max_steps=2",
            "train.batch_size=2", "train.grad_accum=1", "train.eval_every=2", "train.save_every=2",
            "train.progress=false", "grpo.group_size=4", "grpo.max_new_tokens=8", "grpo.beta=0.05"]
    assert main(args) == 0
    assert "final model" in capsys.readouterr().out
    logged = rows(run)
    train = [r for r in logged if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    trl_names = ("completions/mean_length", "completions/min_length", "completions/max_length",
                 "completions/clipped_ratio", "reward", "reward_std", "frac_reward_zero_std",
                 "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "kl", "entropy",
                 "rewards/task_accuracy/mean", "rewards/task_accuracy/std", "rewards/task_format/mean")
    ours = ("em_rate", "clip_fraction", "completion_length", "frac_zero_std_groups")
    for name in trl_names + ours:
        assert name in train[0], name
        assert math.isfinite(train[-1][name]), name
    assert train[0]["completions/min_length"] <= train[0]["completions/mean_length"] <= train[0]["completions/max_length"]
    assert train[0]["frac_reward_zero_std"] == train[0]["frac_zero_std_groups"]
    evals = [r for r in logged if "eval/accuracy" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["eval/exact_match"] <= evals[0]["eval/accuracy"] <= 1.0
    assert math.isclose(evals[0]["eval/loss"], 1.0 - evals[0]["eval/accuracy"])
    assert (run / "final" / "adapter_config.json").is_file()


def _trained(model_dir, data, out, data_settings=None, **train) -> tuple[list[dict], Trainer]:
    """The training rows of a short DPOP run, and its trainer (for its step's counters)."""
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"train": str(data), "max_length": 128, **(data_settings or {})},
        "loss": {"name": "dpop", "dpop_lambda": 5.0},
        "train": {"output_dir": str(out), "lr": 1e-2, "max_steps": 3, "batch_size": 3, "schedule": "constant",
                  "progress": False, **train},
    }
    trainer = Trainer(validate_config(raw))
    expected = FastPreferenceStep if (train.get("fast_path", True) or train.get("precompute_ref")) else PreferenceStep
    assert type(trainer.step_fn) is expected
    trainer.train()
    return [r for r in rows(Path(out)) if "loss" in r], trainer


def _run(model_dir, data, out, **train) -> list[dict]:
    return _trained(model_dir, data, out, **train)[0]


def test_fast_path_and_cached_reference_give_the_plain_loss_curve(tiny_model_dir, synth_pairs_file, tmp_path):
    plain = _run(tiny_model_dir, synth_pairs_file, tmp_path / "plain", fast_path=False)
    fast = _run(tiny_model_dir, synth_pairs_file, tmp_path / "fast", fast_path=True)
    cached = _run(tiny_model_dir, synth_pairs_file, tmp_path / "cached", fast_path=True, precompute_ref=True)
    assert (tmp_path / "ref-cache").is_dir()
    for other in (fast, cached):
        for a, b in zip(plain, other):
            for name in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
                assert math.isclose(a[name], b[name], rel_tol=1e-4, abs_tol=1e-5), (a["step"], name, a[name], b[name])


def test_cache_vision_through_the_trainer_gives_the_same_curve(tiny_model_dir, synth_pairs_file, tmp_path):
    """``data.cache_vision: true``: 10 steps of 3 pairs over 24 one-image records, so the last 2 steps
    (the second epoch) read every image's vision output from disk; the curve is the uncached one."""
    without, _ = _trained(tiny_model_dir, synth_pairs_file, tmp_path / "without", max_steps=10)
    cached, trainer = _trained(tiny_model_dir, synth_pairs_file, tmp_path / "cached", {"cache_vision": True},
                               max_steps=10)
    cache = trainer.step_fn.vision_cache
    assert cache is not None and cache.directory == tmp_path / "vision-cache"
    assert (cache.misses, cache.hits) == (24, 6)  # each image encoded once, then read back
    assert trainer.step_fn.stats.images_encoded == 24
    assert len(list(cache.directory.glob("*.safetensors"))) == 24
    assert len(cached) == len(without) == 10
    for a, b in zip(without, cached):
        for name in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
            assert math.isclose(a[name], b[name], rel_tol=1e-5, abs_tol=1e-6), (a["step"], name, a[name], b[name])


def length_reward(completions, **kwargs) -> list[float]:
    """A reward that an untrained model's samples already vary in, so every group has a gradient."""
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]


def _grpo_raw(model_dir, data, out, max_steps: int) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"train": str(data), "max_length": 128},
        "train": {"algo": "grpo", "output_dir": str(out), "lr": 1e-2, "max_steps": max_steps, "batch_size": 2,
                  "schedule": "constant", "save_every": 2, "progress": False},
        "grpo": {"group_size": 4, "max_new_tokens": 8, "beta": 0.05,
                 "rewards": [{"name": "test_train_grpo:length_reward"}]},
    }


def test_grpo_resume_continues_the_identical_curve(tiny_model_dir, synth_pairs_file, tmp_path):
    """Sampling is part of the curve: the resumed run must draw the same completions."""
    Trainer(validate_config(_grpo_raw(tiny_model_dir, synth_pairs_file, tmp_path / "whole", 4))).train()
    Trainer(validate_config(_grpo_raw(tiny_model_dir, synth_pairs_file, tmp_path / "parts", 2))).train()
    Trainer(validate_config(_grpo_raw(tiny_model_dir, synth_pairs_file, tmp_path / "parts", 4)), resume=True).train()
    whole = [r for r in rows(tmp_path / "whole") if "loss" in r]
    parts = [r for r in rows(tmp_path / "parts") if "loss" in r]
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    assert all(r["frac_zero_std_groups"] < 1 and r["grad_norm"] > 0 for r in whole)  # real updates
    for a, b in zip(whole, parts):
        for name in ("loss", "reward", "completion_length", "entropy", "kl", "grad_norm"):
            assert math.isclose(a[name], b[name], rel_tol=1e-6, abs_tol=1e-6), (a["step"], name, a[name], b[name])


def test_grpo_names_a_record_without_a_task_before_training(tiny_model_dir, synth_pairs_file, tmp_path, capsys):
    rows_in = [json.loads(line) for line in synth_pairs_file.read_text().splitlines()[:4]]
    for row in rows_in:
        row["images"] = [str((synth_pairs_file.parent / image).resolve()) for image in row["images"]]
    rows_in[2]["metadata"] = {}
    data = tmp_path / "no-task.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows_in))
    args = ["train", "--algo", "grpo", "--config", str(CONFIGS / "demo-cpu.yaml"), f"model.name_or_path={tiny_model_dir}",
            f"data.train={data}", "data.eval=null", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1",
            "train.progress=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {data}: record {rows_in[2]['id']}: GRPO scores answers by the record's task" in err
    assert "build the data with `vlmtune data tasks`" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
