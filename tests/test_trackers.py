"""``train.report_to``: TensorBoard by default, wandb and mlflow through accelerate's trackers, offline.

The logged metrics are read back from what each tracker wrote: the wandb offline run's ``.wandb``
file (its records, protobuf in wandb's LevelDB-style log) and the mlflow file store's metric files.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from vlmtune.config import TrainConfig, validate_config
from vlmtune.errors import VlmtuneError
from vlmtune.train.loop import Trainer
from vlmtune.train.metrics_log import accelerate_trackers, flat_config

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb is not installed (pip install 'vlmtune[trackers]')")
needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="mlflow is not installed (pip install 'vlmtune[trackers]')")


def _raw(model_dir, data, out, report_to) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(data), "max_length": 128},
        "train": {"output_dir": str(out), "lr": 1e-2, "max_steps": 2, "batch_size": 2, "schedule": "constant",
                  "progress": False, "report_to": report_to},
    }


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_tensorboard_is_the_default_and_a_single_name_is_a_list():
    assert TrainConfig().report_to == ["tensorboard"]
    assert TrainConfig(report_to="mlflow").report_to == ["mlflow"]
    with pytest.raises(ValueError, match="'tensorboard', 'wandb' or 'mlflow'"):
        TrainConfig(report_to=["neptune"])


def test_a_missing_tracker_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(VlmtuneError) as e:
        accelerate_trackers(["tensorboard", "wandb"])
    assert str(e.value) == ("train.report_to names wandb, but wandb is not installed: pip install 'vlmtune[trackers]' "
                            "(or pip install wandb), or take it out of train.report_to")


def test_tensorboard_alone_needs_no_accelerate_tracker():
    assert accelerate_trackers(["tensorboard"]) == []
    assert accelerate_trackers([]) == []


def test_the_config_is_flattened_for_the_trackers():
    values = {"train": {"lr": 1e-5, "report_to": ["wandb"], "eval_every": None}, "model": {"name": "m"}}
    assert flat_config(values) == {"train.lr": 1e-5, "train.report_to": '["wandb"]', "train.eval_every": "null",
                                   "model.name": "m"}


def test_without_tensorboard_no_event_files_are_written(tiny_model_dir, synth_pairs_file, tmp_path):
    run = tmp_path / "run"
    Trainer(validate_config(_raw(tiny_model_dir, synth_pairs_file, run, []))).train()
    assert not (run / "tensorboard").exists()
    assert sorted(_losses(run)) == [1, 2]


def wandb_records(run_file: Path):
    """The protobuf records of an offline run's ``.wandb`` file: a 7-byte header, then 32 KiB blocks of
    chunks, each ``crc32 (4) | length (2) | type (1)`` (full, or first / middle / last of a record)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts, block = run_file.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


@needs_wandb
def test_wandb_offline_receives_the_metrics_and_the_config(tiny_model_dir, synth_pairs_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    run = tmp_path / "run"
    raw = _raw(tiny_model_dir, synth_pairs_file, run, ["tensorboard", "wandb"])
    raw["train"].update(sample_every=2, sample_count=2)
    raw["online"] = {"max_new_tokens": 4}
    Trainer(validate_config(raw)).train()
    [run_file] = (tmp_path / "wandb-dir").glob("wandb/offline-run-*/run-*.wandb")
    logged, config, tables = {}, {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "loss" in items:
                logged[items["_step"]] = items["loss"]
            if "samples/_type" in items:
                tables.append((items["_step"], items["samples/_type"], items["samples/nrows"]))
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert logged == pytest.approx(_losses(run), rel=1e-6)  # every step's loss, as metrics.jsonl has it
    assert config["train.lr"] == 1e-2 and config["train.max_steps"] == 2
    assert tables == [(2, "table-file", 2)]  # the samples of step 2 as a table


@needs_wandb
def test_quiet_silences_wandb_too(tiny_model_dir, synth_pairs_file, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_raw(tiny_model_dir, synth_pairs_file, tmp_path / "run", ["wandb"])))
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path))

    def output(*flags):
        done = subprocess.run([sys.executable, "-m", "vlmtune", *flags, "train", "--config", str(config),
                               f"train.output_dir={tmp_path / ('run' + ''.join(flags))}"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr

    assert "wandb:" in output()  # wandb's banner and summary, when not quiet
    assert "wandb:" not in output("-q")


@needs_mlflow
def test_mlflow_file_store_receives_the_metrics_and_the_params(tiny_model_dir, synth_pairs_file, tmp_path,
                                                              monkeypatch):
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind this switch
    run = tmp_path / "run"
    Trainer(validate_config(_raw(tiny_model_dir, synth_pairs_file, run, ["mlflow"]))).train()
    [loss_file] = store.glob("*/*/metrics/loss")
    logged = {int(step): float(value) for _, value, step in (line.split() for line in loss_file.read_text().splitlines())}
    assert logged == pytest.approx(_losses(run), rel=1e-6)
    params = loss_file.parents[1] / "params"
    assert (params / "train.lr").read_text() == "0.01" and (params / "loss.name").read_text() == "dpo"
    assert (loss_file.parents[1] / "tags" / "mlflow.runName").read_text() == "run"
    assert (loss_file.parents[1] / "metrics" / "rewards" / "accuracies").is_file()  # TRL's names kept


@needs_mlflow
def test_a_tracker_that_cannot_start_is_a_clear_error(tiny_model_dir, synth_pairs_file, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # mlflow 3 refuses the file store without it
    run = tmp_path / "run"
    with pytest.raises(VlmtuneError, match=r"train.report_to: starting mlflow failed: MlflowException: .*"
                                         r"MLFLOW_TRACKING_URI\), or take it out of train.report_to"):
        Trainer(validate_config(_raw(tiny_model_dir, synth_pairs_file, run, ["mlflow"]))).train()
