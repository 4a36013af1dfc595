"""Checkpoints: complete or absent, pruned to the last K, restoring weights, optimizer and random states."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from vlmtune.errors import VlmtuneError
from vlmtune.train import checkpoint
from vlmtune.train.precision import Precision


def tiny_setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # a frozen parameter is not saved
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def one_step(model, optimizer, scheduler):
    loss = model(torch.randn(5, 4)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_round_trip_continues_identically(tmp_path):
    accelerator = Accelerator()
    model, optimizer, scheduler = tiny_setup()
    one_step(model, optimizer, scheduler)
    state = {"step": 1, "micro_batch": 3}
    path = checkpoint.save_checkpoint(tmp_path, state, accelerator, model, optimizer, scheduler, None, keep_last=2)
    assert sorted(p.name for p in path.iterdir()) == [
        "optimizer.pt", "rng-0.pt", "scheduler.pt", "state.json", "trainable.safetensors"]
    expected_draws = draws()
    one_step(model, optimizer, scheduler)
    expected = [p.detach().clone() for p in model.parameters()]

    model2, optimizer2, scheduler2 = tiny_setup(seed=1)  # different weights; frozen ones set equal
    model2[0].weight.data.copy_(model[0].weight)
    restored = checkpoint.load_checkpoint(path, accelerator, model2, optimizer2, scheduler2, Precision("no", "cpu"))
    assert restored == state
    assert draws() == expected_draws
    one_step(model2, optimizer2, scheduler2)
    for a, b in zip(expected, model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_keep_last_and_half_written_folders_are_ignored(tmp_path):
    accelerator = Accelerator()
    model, optimizer, scheduler = tiny_setup()
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, {"step": step}, accelerator, model, optimizer, scheduler, None, keep_last=2)
    # what a process killed while writing step 4 leaves behind
    (checkpoint.checkpoints_dir(tmp_path) / ".tmp-step-000004").mkdir()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000003"
    assert checkpoint.latest_checkpoint(tmp_path / "elsewhere") is None


def test_checkpoint_of_another_model_is_refused(tmp_path):
    accelerator = Accelerator()
    model, optimizer, scheduler = tiny_setup()
    path = checkpoint.save_checkpoint(tmp_path, {"step": 1}, accelerator, model, optimizer, scheduler, None, keep_last=1)
    other = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(VlmtuneError, match="trainable parameters do not match"):
        checkpoint.load_checkpoint(path, accelerator, other, optimizer, scheduler, Precision("no", "cpu"))


def test_fp16_scaler_state_round_trips(tmp_path):
    accelerator = Accelerator()
    model, optimizer, scheduler = tiny_setup()
    scaler = Precision("fp16", "cpu").scaler
    scaler.scale(torch.ones(()))  # the scale is created lazily, at the first use
    scaler.update(new_scale=1024.0)
    path = checkpoint.save_checkpoint(tmp_path, {"step": 1, "micro_batch": 1}, accelerator, model, optimizer,
                                      scheduler, scaler.state_dict(), keep_last=1)
    assert (path / "scaler.pt").is_file() and checkpoint.damage(path, num_processes=1) is None
    restored = Precision("fp16", "cpu")
    checkpoint.load_checkpoint(path, accelerator, model, optimizer, scheduler, restored)
    assert restored.scaler.get_scale() == 1024.0


def test_unwritable_checkpoint_folder_is_named_and_the_previous_kept(tmp_path):
    accelerator = Accelerator()
    model, optimizer, scheduler = tiny_setup()
    checkpoint.save_checkpoint(tmp_path, {"step": 1}, accelerator, model, optimizer, scheduler, None, keep_last=2)
    # A file where the temporary folder must go: mkdir fails for root too.
    blocker = checkpoint.checkpoints_dir(tmp_path) / ".tmp-step-000002"
    blocker.write_text("")
    with pytest.raises(checkpoint.UnwritableOutput) as raised:
        checkpoint.save_checkpoint(tmp_path, {"step": 2}, accelerator, model, optimizer, scheduler, None, keep_last=2)
    assert str(blocker) in str(raised.value) and "step-000001, is kept" in str(raised.value)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000001"]
