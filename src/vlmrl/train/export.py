"""Turn a finished run into a plain model folder: the LoRA adapter merged into the base weights.

    vlmrl export --merge runs/demo-dpo runs/demo-dpo-merged

The result holds safetensors weights and the processor, and loads with plain transformers
(``AutoModelForImageTextToText.from_pretrained``), no peft needed. The base model is the one
named in the run's ``config.yaml``, loaded in the run's dtype.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from vlmrl.errors import VlmrlError


def export_run(run_dir: str | Path, out: str | Path, merge: bool = True) -> Path:
    """Write ``out``: the merged model (``merge``) or a copy of the adapter, plus the processor."""
    run, out = Path(run_dir), Path(out)
    final = run / "final"
    if not final.is_dir():
        raise VlmrlError(f"{run} has no final/ folder: export a run that finished training (vlmrl train)")
    if out.exists() and any(out.iterdir()):
        raise VlmrlError(f"{out} exists and is not empty; choose a new folder")
    is_adapter = (final / "adapter_config.json").is_file()
    if not merge or not is_adapter:  # an adapter as it is, or full fine-tuning's weights
        shutil.copytree(final, out, dirs_exist_ok=True)
        return out
    merged, processor = merged_model(run)
    merged.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def merged_model(run_dir: str | Path):
    """``(model, processor)``: the run's base model with its adapter merged in (peft merge_and_unload)."""
    from peft import PeftModel

    from vlmrl.models.load import load_model

    run = Path(run_dir)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise VlmrlError(f"{run} has no config.yaml: it does not look like a vlmrl training run")
    model_config = (yaml.safe_load(config_file.read_text()) or {}).get("model") or {}
    base, processor = load_model(
        model_config["name_or_path"],
        dtype=model_config.get("dtype", "float32"),
        trust_remote_code=model_config.get("trust_remote_code", False),
    )
    merged = PeftModel.from_pretrained(base, run / "final").merge_and_unload()
    return merged, processor
