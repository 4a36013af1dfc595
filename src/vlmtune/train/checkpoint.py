"""Training checkpoints: written atomically, checked before use, enough to continue with the identical loss curve.

A checkpoint is a folder ``RUN/checkpoints/step-000040`` holding

- the weights being trained and the optimizer state, either
  ``trainable.safetensors`` (every trainable parameter, the LoRA adapter or the weights being
  fine-tuned, by its name in the unwrapped model) and ``optimizer.pt`` (its ``state_dict``), written
  by the main process; or, when the model is sharded (FSDP 2), ``sharded/``: one
  ``torch.distributed.checkpoint`` folder of the model (frozen weights too) and the optimizer,
  each process writing its own shards;
- ``scheduler.pt`` (and ``scaler.pt`` under fp16): their ``state_dict``;
- ``rng-<rank>.pt``: each process's python, numpy and torch random states;
- ``process-<rank>.pt`` (when the loop passes one): each process's own training state, e.g. GRPO's
  generation batch being replayed;
- ``state.json``: the optimizer step, the data position (micro-batches consumed) and the
  early-stopping record, plus the batch geometry the position is only valid for.

It is first written to a hidden temporary folder and then renamed into place, so a process killed
mid-write leaves the previous checkpoint intact and no half-written one; a write that fails (a disk
that is full or became read-only) raises a ``VlmtuneError`` naming the path and leaves the previous
checkpoint in place. Only the last ``keep_last`` checkpoints are kept.

``damage(path, num_processes)`` checks a checkpoint before it is used: every file present and
readable (safetensors header and size, ``torch.load(weights_only=True)`` of each ``.pt``,
``state.json`` an object with the step and data position, sharded files as long as their index says).
``checkpoint_to_resume`` picks the checkpoint a run continues from: the newest, refused when damaged,
or with ``train.resume=auto`` the newest intact one (the damaged ones set aside).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlmtune.errors import VlmtuneError

log = logging.getLogger(__name__)

PREFIX = "step-"
DAMAGED_PREFIX = "damaged-"
SHARDED = "sharded"


class UnwritableOutput(VlmtuneError):
    """A file of the run (checkpoint, metrics, final model) could not be written; the last checkpoint is kept."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders ``step-N`` of a run, oldest first (temporary and set-aside folders are ignored)."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``damaged-step-N`` so that it is neither resumed from nor pruned."""
    target = path.with_name(DAMAGED_PREFIX + path.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target


def checkpoint_to_resume(out: Path, accelerator, resume: bool, auto: bool) -> Path | None:
    """The checkpoint of run folder ``out`` to continue from: the newest, checked; with ``auto`` the newest
    intact one. None to start from step 0; a run folder that already holds checkpoints is refused unless
    the run resumes."""
    latest = latest_checkpoint(out)
    if latest is not None and not (resume or auto):
        raise VlmtuneError(
            f"{out} already holds checkpoints (latest {latest.name}); pass --resume to continue "
            "that run, or choose another train.output_dir"
        )
    if latest is None:
        if resume or auto:
            log.info("no checkpoint in %s: starting from step 0", out)
        return None
    world = accelerator.num_processes
    problem = damage(latest, world)
    if problem is None:
        return latest
    older = list_checkpoints(out)[:-1]
    intact = next((p for p in reversed(older) if damage(p, world) is None), None)
    if intact is None:
        raise VlmtuneError(f"cannot resume from {latest.name}: {problem}; no intact checkpoint is left: "
                           "start again in another train.output_dir")
    if not auto:
        raise VlmtuneError(
            f"cannot resume from {latest.name}: {problem}; the newest intact checkpoint is {intact}: resume "
            f"from it with train.resume=auto, which sets the damaged ones aside as {DAMAGED_PREFIX}step-N"
        )
    return _set_aside_newer_than(out, intact, problem, accelerator)


def _set_aside_newer_than(out: Path, intact: Path, problem: str, accelerator) -> Path:
    """``train.resume=auto`` with damaged checkpoints: rename those newer than ``intact``, resume from it."""
    accelerator.wait_for_everyone()  # every process has checked before any folder is renamed
    found = list_checkpoints(out)
    damaged = found[found.index(intact) + 1 :]
    if accelerator.is_main_process:
        for path in damaged:
            set_aside(path)
    accelerator.wait_for_everyone()
    log.warning("resuming from %s, the newest intact checkpoint: %s; set aside %s", intact, problem,
                ", ".join(DAMAGED_PREFIX + p.name for p in damaged))
    return intact


# ----- writing -----


def save_checkpoint(run_dir, state: dict, accelerator, model, optimizer, scheduler, scaler_state: dict | None,
                    keep_last: int, process_state: dict | None = None) -> Path:
    """Write a checkpoint of optimizer step ``state["step"]``; every process must call this.

    ``optimizer`` is the torch optimizer itself (not accelerate's wrapper); ``process_state`` (tensors,
    lists, numbers, strings) is this process's own, read back by ``load_process_state``.
    """
    state = {k: v for k, v in state.items() if k != "process_state"}  # a resumed run's state.json had it
    if process_state is not None:
        state["process_state"] = True
    final = checkpoints_dir(run_dir) / f"{PREFIX}{state['step']:06d}"
    tmp = final.with_name(f".tmp-{final.name}")
    with naming_unwritable(tmp, run_dir, remove=tmp):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if process_state is not None:
            torch.save(process_state, tmp / f"process-{accelerator.process_index}.pt")
        if is_sharded(model):
            _save_sharded(tmp / SHARDED, model, optimizer)
        if accelerator.is_main_process:
            if not is_sharded(model):
                save_file(trainable_state(accelerator.unwrap_model(model)), tmp / "trainable.safetensors")
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if scaler_state is not None:
                torch.save(scaler_state, tmp / "scaler.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)  # a re-run that reached the same step again
            os.replace(tmp, final)
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def naming_unwritable(target: Path, run_dir, remove: Path | None = None):
    """Turn an ``OSError`` while writing ``target`` into an ``UnwritableOutput`` naming the path.

    The message names the run's last checkpoint, which is kept; ``remove`` (a half-written folder) is deleted.
    """
    try:
        yield
    except OSError as error:
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
        latest = latest_checkpoint(run_dir)
        kept = f"the last checkpoint, {latest}, is kept" if latest else "no checkpoint was written yet"
        raise UnwritableOutput(
            f"cannot write {error.filename or target}: {error.strerror or error}; {kept}. "
            "Make the output folder writable (or free space) and continue with --resume"
        ) from error


def _save_sharded(folder: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)


def is_sharded(model) -> bool:
    """True for a model sharded by FSDP 2 (``fully_shard``): its state lives in pieces on every process."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ----- checking -----


def damage(path: Path, num_processes: int) -> str | None:
    """What is wrong with checkpoint ``path`` (naming the file), or None when every file reads."""
    path = Path(path)
    state_file = path / "state.json"
    problem = _state_problem(state_file)
    if problem:
        return f"{state_file}: {problem}"
    saved_world = json.loads(state_file.read_text()).get("num_processes", num_processes)
    weights = [SHARDED] if (path / SHARDED).exists() else ["trainable.safetensors", "optimizer.pt"]
    names = weights + ["scheduler.pt"] + [f"rng-{rank}.pt" for rank in range(saved_world)]
    if json.loads(state_file.read_text()).get("process_state"):
        names += [f"process-{rank}.pt" for rank in range(saved_world)]
    if (path / "scaler.pt").exists():
        names.append("scaler.pt")
    for name in names:
        problem = _file_problem(path / name)
        if problem:
            return f"{path / name}: {problem}"
    return None


def _state_problem(file: Path) -> str | None:
    if not file.is_file():
        return "missing"
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"not valid JSON ({e})"
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("step", "micro_batch")):
        return "not a checkpoint state (needs integer 'step' and 'micro_batch')"
    return None


def _file_problem(file: Path) -> str | None:
    if not file.exists():
        return "missing"
    try:
        if file.name == SHARDED:
            return _sharded_problem(file)
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt"):  # parses the header and checks the size it promises
                pass
            return None
        if not zipfile.is_zipfile(file):  # torch.save writes a zip archive whose index is at its end
            return "not a complete torch.save file (truncated or overwritten)"
        loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch and safetensors raise many kinds on a damaged file
        return f"unreadable ({type(e).__name__}: {str(e)[:200]})"
    if file.name.startswith("rng-") and not (isinstance(loaded, dict) and {"python", "numpy", "torch"} <= set(loaded)):
        return "not a random-state file (needs python, numpy and torch states)"
    if not isinstance(loaded, dict):
        return f"holds a {type(loaded).__name__}, not a state dict"
    return None


def _sharded_problem(folder: Path) -> str | None:
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(folder)).read_metadata().storage_data
    for info in storage.values():
        shard = folder / info.relative_path
        if not shard.is_file():
            return f"{info.relative_path} is missing"
        if shard.stat().st_size < info.offset + info.length:
            return f"{info.relative_path} is truncated ({shard.stat().st_size} bytes, its index needs {info.offset + info.length})"
    return None


# ----- reading -----


def load_checkpoint(path: str | Path, accelerator, model, optimizer, scheduler, precision) -> dict:
    """Restore weights, optimizer, scheduler, fp16 scaler and this process's random states; return ``state.json``.

    ``optimizer`` is the torch optimizer itself; ``precision`` a ``vlmtune.train.precision.Precision``.
    """
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise VlmtuneError(
            f"{path} was written by {state.get('num_processes')} process(es) and has no random state for "
            f"process {accelerator.process_index}; resume with the same number of processes"
        )
    if (path / SHARDED).exists() != is_sharded(model):
        written = "sharded (FSDP)" if (path / SHARDED).exists() else "unsharded"
        raise VlmtuneError(f"{path} was written by an {written} run; resume it with the same accelerate launch set-up")
    if is_sharded(model):
        _load_sharded(path / SHARDED, model, optimizer)
    else:
        load_trainable(accelerator.unwrap_model(model), load_file(path / "trainable.safetensors"), path)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if (path / "scaler.pt").is_file():
        precision.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def load_process_state(path: str | Path, process_index: int) -> dict | None:
    """This process's own state saved with the checkpoint (``save_checkpoint``'s ``process_state``), or None."""
    file = Path(path) / f"process-{process_index}.pt"
    return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None


def _load_sharded(folder: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=folder)  # each process reads its own shards, in place
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved trainable parameters into ``model``, refusing a checkpoint of another set-up."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(params))[:3]
        raise VlmtuneError(
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
