"""Resuming through the CLI when a checkpoint is damaged, the output folder turns read-only, or the batch
geometry changed: a message naming the file (or setting), exit status 2, and the last good checkpoint kept."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vlmtune.cli import main
from vlmtune.config import validate_config
from vlmtune.train.loop import Trainer

from test_train import raw_config, train_rows


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, synth_pairs_file, tmp_path_factory) -> Path:
    """A 2-step dpo run with checkpoints step-000001 and step-000002."""
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(validate_config(raw_config(tiny_model_dir, synth_pairs_file, out, save_every=1, keep_last=3))).train()
    return out


def copy_run(finished_run: Path, tmp_path: Path, **train) -> tuple[Path, Path]:
    """A copy of the finished run and a config file pointing at it (``train`` overrides its settings)."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"].update(output_dir=str(run), **train)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return run, path


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


DAMAGE = {
    "trainable.safetensors": truncate,
    "optimizer.pt": truncate,
    "scheduler.pt": truncate,
    "state.json": truncate,
    "rng-0.pt": lambda f: f.write_bytes(os.urandom(600)),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_named_and_the_intact_one_offered(name, finished_run, tmp_path, capsys):
    run, path = copy_run(finished_run, tmp_path, max_steps=3)
    damaged = run / "checkpoints" / "step-000002" / name
    DAMAGE[name](damaged)
    assert main(["train", "--config", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume from step-000002: {damaged}: " in err, err
    assert f"the newest intact checkpoint is {run / 'checkpoints' / 'step-000001'}" in err
    assert "train.resume=auto" in err and "Traceback" not in err
    assert (run / "checkpoints" / "step-000002").is_dir()  # nothing was changed


def test_resume_auto_takes_the_newest_intact_checkpoint(finished_run, tmp_path, capsys):
    run, path = copy_run(finished_run, tmp_path, max_steps=3)
    truncate(run / "checkpoints" / "step-000002" / "optimizer.pt")
    assert main(["train", "--config", str(path), "train.resume=auto"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {run / 'checkpoints' / 'step-000001'}, the newest intact checkpoint" in err
    assert "optimizer.pt" in err and "damaged-step-000002" in err
    assert (run / "checkpoints" / "damaged-step-000002" / "optimizer.pt").is_file()  # kept for inspection
    assert [r["step"] for r in train_rows(run)] == [1, 2, 3]  # steps 2 and 3 trained again from step 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "damaged-step-000002", "step-000001", "step-000002", "step-000003"]


def test_every_checkpoint_damaged_says_start_again(finished_run, tmp_path, capsys):
    run, path = copy_run(finished_run, tmp_path, max_steps=3)
    for step in ("step-000001", "step-000002"):
        truncate(run / "checkpoints" / step / "state.json")
    assert main(["train", "--config", str(path), "train.resume=auto"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoints' / 'step-000002' / 'state.json'}: not valid JSON" in err
    assert "no intact checkpoint is left" in err


@pytest.mark.parametrize("setting", ["batch_size=4", "grad_accum=2", "seed=7"])
def test_resume_with_another_batch_geometry_is_refused(setting, finished_run, tmp_path, capsys):
    run, path = copy_run(finished_run, tmp_path, max_steps=3)
    assert main(["train", "--config", str(path), "--resume", f"train.{setting}"]) == 2
    err = capsys.readouterr().err
    name, value = setting.split("=")
    saved = {"batch_size": 2, "grad_accum": 1, "seed": 0}[name]
    assert f"step-000002 was written with {name}={saved}; this run has {name}={value}" in err, err
    assert "resume with those, or start a new train.output_dir" in err


def make_unwritable(path: Path) -> None:
    """Make ``path`` refuse writes, also for root (which chmod does not stop): the immutable attribute."""
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot make a folder unwritable for root here (chattr +i: {done.stderr.strip()})")
    else:
        path.chmod(0o555)


def make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o755)


def test_checkpoint_folder_turned_read_only_names_the_path_and_keeps_the_last(finished_run, tmp_path, capsys):
    """The run starts (config and metrics are writable) and fails when writing its next checkpoint."""
    run, path = copy_run(finished_run, tmp_path, max_steps=3)
    folder = run / "checkpoints"
    make_unwritable(folder)
    try:
        assert main(["train", "--config", str(path), "--resume"]) == 2
    finally:
        make_writable(folder)
    err = capsys.readouterr().err
    assert f"cannot write {folder / '.tmp-step-000003'}" in err, err
    assert f"the last checkpoint, {folder / 'step-000002'}, is kept" in err and "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001", "step-000002"]
    assert [r["step"] for r in train_rows(run)] == [1, 2, 3]  # step 3 was trained and logged


def test_metrics_file_turned_read_only_names_it(finished_run, tmp_path, capsys):
    run, path = copy_run(finished_run, tmp_path, max_steps=3)
    metrics = run / "metrics.jsonl"
    make_unwritable(metrics)
    try:
        assert main(["train", "--config", str(path), "--resume"]) == 2
    finally:
        make_writable(metrics)
    err = capsys.readouterr().err
    assert f"cannot write {metrics}" in err and "Traceback" not in err, err
    assert (run / "checkpoints" / "step-000002").is_dir()
