"""Training checkpoints: written atomically, enough to continue with the identical loss curve.

A checkpoint is a folder ``RUN/checkpoints/step-000040`` holding

- ``trainable.safetensors``: every trainable parameter (the LoRA adapter, or the weights being
  fine-tuned), by its name in the unwrapped model;
- ``optimizer.pt``, ``scheduler.pt`` (and ``scaler.pt`` under fp16): their ``state_dict``;
- ``rng-<rank>.pt``: each process's python, numpy and torch random states;
- ``state.json``: the optimizer step, the data position (micro-batches consumed) and the
  early-stopping record, plus the batch geometry the position is only valid for.

It is first written to a hidden temporary folder and then renamed into place, so a process killed
mid-write leaves the previous checkpoint intact and no half-written one. Only the last
``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlmrl.errors import VlmrlError

PREFIX = "step-"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir, state: dict, accelerator, model, optimizer, scheduler, keep_last: int) -> Path:
    """Write a checkpoint of optimizer step ``state["step"]``; every process must call this."""
    final = checkpoints_dir(run_dir) / f"{PREFIX}{state['step']:06d}"
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(trainable_state(accelerator.unwrap_model(model)), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # a re-run that reached the same step again
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: str | Path, accelerator, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this process's random states; return ``state.json``."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise VlmrlError(
            f"{path} was written by {state.get('num_processes')} process(es) and has no random state for "
            f"process {accelerator.process_index}; resume with the same number of processes"
        )
    load_trainable(accelerator.unwrap_model(model), load_file(path / "trainable.safetensors"), path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved trainable parameters into ``model``, refusing a checkpoint of another set-up."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(params))[:3]
        raise VlmrlError(
            f"{source}: its trainable parameters do not match this model (missing {missing}, unexpected {extra}); "
            "resume with the same model and lora settings, or start a new output_dir"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device))


def rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": (py_version, list(py_state), py_gauss),
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
