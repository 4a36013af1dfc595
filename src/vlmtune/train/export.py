"""Turn a finished run into a plain model folder: the LoRA adapter merged into the base weights.

    vlmtune export --merge runs/demo-dpo runs/demo-dpo-merged

The result holds safetensors weights, the processor and a model card (``README.md``, see
``vlmtune.model_card``), and loads with plain transformers
(``AutoModelForImageTextToText.from_pretrained``), no peft needed. The base model is the one
named in the run's ``config.yaml``, loaded in the run's dtype with the transformers loader; the
adapter is checked against it before the merge (``vlmtune.models.adapters``). The run folder cannot
turn on remote code: only the caller's ``trust_remote_code`` (the ``--trust-remote-code`` flag)
lets a base model folder's own Python code run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.model_card import read_run_config, write_model_card

log = logging.getLogger(__name__)


def export_run(run_dir: str | Path, out: str | Path, merge: bool = True, trust_remote_code: bool = False) -> Path:
    """Write ``out``: the merged model (``merge``) or a copy of the adapter, plus the processor and
    the model card."""
    run, out = Path(run_dir), Path(out)
    final = run / "final"
    if not final.is_dir():
        raise VlmtuneError(f"{run} has no final/ folder: export a run that finished training (vlmtune train)")
    if out.exists() and any(out.iterdir()):
        raise VlmtuneError(f"{out} exists and is not empty; choose a new folder")
    is_adapter = (final / "adapter_config.json").is_file()
    if not merge or not is_adapter:  # an adapter as it is, or full fine-tuning's weights
        shutil.copytree(final, out, dirs_exist_ok=True)
        write_model_card(run, out)
        return out
    merged, processor = merged_model(run, trust_remote_code=trust_remote_code)
    merged.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    write_model_card(run, out, merged=True)
    return out


def merged_model(run_dir: str | Path, trust_remote_code: bool = False):
    """``(model, processor)``: the run's base model with its adapter merged in (peft merge_and_unload)."""
    from vlmtune.models.adapters import load_adapter
    from vlmtune.models.load import load_model

    run = Path(run_dir)
    model_config = run_model_config(run)
    if model_config.get("trust_remote_code") and not trust_remote_code:
        log.warning("%s/config.yaml sets model.trust_remote_code, which a run folder cannot do: "
                    "the base model's own code runs only with --trust-remote-code", run)
    base_name = model_config["name_or_path"]
    base, processor = load_model(base_name, dtype=model_config.get("dtype", "float32"),
                                 trust_remote_code=trust_remote_code)
    return load_adapter(base, run / "final", base_name).merge_and_unload(), processor


def run_model_config(run: Path) -> dict:
    """The ``model`` section of a run's ``config.yaml``, which must name the base model."""
    return read_run_config(run)["model"]
