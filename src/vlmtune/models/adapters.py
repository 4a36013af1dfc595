"""LoRA adapter folders: find one, record the base model it was trained on, refuse what must not load.

A training run keeps its adapter in ``RUN/final``: peft's ``adapter_config.json`` (which names
the base in ``base_model_name_or_path``) and ``adapter_model.safetensors``, plus
``base_model.json``, written by ``record_base`` when the run saves it: the base model's model
type, architecture and sizes, which peft does not record.

``load_adapter`` puts an adapter on a loaded model after ``check_adapter`` has found nothing to
refuse. It refuses, with a ``VlmtuneError`` that names the folder and what to do:
- an adapter with only pickle weights (``adapter_model.bin``): unpickling can run code, so
  adapters are read from safetensors only, as models are;
- an adapter whose recorded base (``base_model.json``; for an adapter saved elsewhere, the
  ``config.json`` of the base folder its ``adapter_config.json`` names, when that folder is here)
  differs from the model in model type, architecture or size;
- an adapter with a tensor the model cannot take: a module the model lacks, or another shape.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.models.load import SUPPORTED_MODEL_TYPES

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
BASE_RECORD = "base_model.json"
# What must agree between the base an adapter was trained on and the model it is put on.
FINGERPRINT = ("model_type", "architecture", "hidden_size", "num_hidden_layers", "vocab_size",
               "vision_hidden_size", "vision_depth")
PEFT_PREFIX = "base_model.model."
# LoRA factors by name: the layer size each one takes, and on which axis (the other is the rank):
# lora_A [r, in_features], lora_B [out_features, r]; for embeddings [r, num_embeddings], [dim, r].
LORA_FACTORS = {
    ".lora_A.": ("in_features", 1),
    ".lora_B.": ("out_features", 0),
    ".lora_embedding_A": ("num_embeddings", 1),
    ".lora_embedding_B": ("embedding_dim", 0),
}


def find_adapter(path: str | Path) -> Path:
    """The peft adapter folder of a training run (``final/``) or the adapter folder itself."""
    path = Path(path)
    for candidate in (path / "final", path):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise VlmtuneError(
        f"no peft adapter at {path}: expected a training run with final/{ADAPTER_CONFIG}, "
        f"or a folder with {ADAPTER_CONFIG} and {SAFETENSORS_WEIGHTS}"
    )


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on (``base_model_name_or_path`` in its config)."""
    base = _read_json(adapter_dir / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base:
        raise VlmtuneError(f"{adapter_dir / ADAPTER_CONFIG} names no base model; pass --model")
    return str(base)


def base_fingerprint(config: dict) -> dict:
    """Model type, architecture and sizes from a model's ``config.json`` (as a dict)."""
    text = config.get("text_config") or config
    vision = config.get("vision_config") or {}
    architectures = config.get("architectures") or [None]
    return {
        "model_type": config.get("model_type"),
        "architecture": architectures[0],
        "hidden_size": text.get("hidden_size"),
        "num_hidden_layers": text.get("num_hidden_layers"),
        "vocab_size": text.get("vocab_size"),
        "vision_hidden_size": vision.get("hidden_size"),
        "vision_depth": vision.get("depth"),
    }


def record_base(model, folder: str | Path) -> None:
    """Write ``folder/base_model.json``: the name and fingerprint of a peft model's base (nothing
    for a model without an adapter, whose folder holds its own ``config.json``)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return
    base = model.get_base_model()
    record = {"name_or_path": base.name_or_path, **base_fingerprint(base.config.to_dict())}
    (Path(folder) / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def load_adapter(model, adapter_dir: str | Path, model_name: str):
    """``model`` (loaded from ``model_name``) wrapped in the peft adapter of ``adapter_dir``, frozen,
    once ``check_adapter`` has found nothing to refuse."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    check_adapter(adapter_dir, model, model_name)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)


def check_adapter(adapter_dir: Path, model, model_name: str) -> None:
    """Refuse pickle weights, an adapter trained on another base, or a tensor the model cannot take."""
    weights = adapter_weights(adapter_dir)
    base_name, recorded = recorded_base(adapter_dir)
    model_fp = base_fingerprint(model.config.to_dict())
    if recorded is None:
        log.info("%s records no base model beyond %s: only its tensor shapes are checked", adapter_dir, base_name)
    else:
        differences = [f"{key.replace('_', ' ')} {recorded[key]} vs {model_fp[key]}" for key in FINGERPRINT
                       if recorded.get(key) is not None and model_fp.get(key) is not None
                       and recorded[key] != model_fp[key]]
        if differences:
            raise VlmtuneError(
                f"the adapter {adapter_dir} was trained on {base_name} ({describe(recorded)}), but the model "
                f"{model_name} is {describe(model_fp)} ({'; '.join(differences)}): put the adapter on the model "
                f"it was trained on ({base_name}; `vlmtune infer`/`eval` use it when --model is left out)"
            )
    misfits = adapter_misfits(weights, model)
    if misfits:
        raise VlmtuneError(
            f"the adapter {adapter_dir} (trained on {base_name}) does not fit the model {model_name}: "
            f"{'; '.join(misfits[:3])}{' ...' if len(misfits) > 3 else ''} ({len(misfits)} tensors): "
            f"put the adapter on the model it was trained on ({base_name})"
        )


def adapter_weights(adapter_dir: Path) -> Path:
    """``adapter_model.safetensors`` of ``adapter_dir``; pickle weights are refused."""
    weights = adapter_dir / SAFETENSORS_WEIGHTS
    if weights.is_file():
        return weights
    if (adapter_dir / PICKLE_WEIGHTS).is_file():
        raise VlmtuneError(
            f"{adapter_dir} holds {PICKLE_WEIGHTS} (a pickle file, which can run code when loaded) and no "
            f"{SAFETENSORS_WEIGHTS}: vlmtune loads adapters from safetensors only; convert it where you trust "
            "it (load it with peft, then save_pretrained(..., safe_serialization=True))"
        )
    raise VlmtuneError(
        f"{adapter_dir} has {ADAPTER_CONFIG} but no {SAFETENSORS_WEIGHTS}: the adapter's weights are missing"
    )


def recorded_base(adapter_dir: Path) -> tuple[str, dict | None]:
    """``(base name, fingerprint or None)`` of the model an adapter was trained on."""
    name = str(_read_json(adapter_dir / ADAPTER_CONFIG).get("base_model_name_or_path") or "an unnamed base model")
    record = adapter_dir / BASE_RECORD
    if record.is_file():
        data = _read_json(record)
        return str(data.get("name_or_path") or name), {key: data.get(key) for key in FINGERPRINT}
    base_config = Path(name).expanduser() / "config.json"
    if base_config.is_file():
        return name, base_fingerprint(_read_json(base_config))
    return name, None


def adapter_misfits(weights: Path, model) -> list[str]:
    """One line per tensor of the adapter file that ``model`` cannot take (none: it fits)."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    problems = []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix(PEFT_PREFIX)
            shape = tuple(f.get_slice(key).get_shape())
            expected = _expected_shape(name, shape, modules, parameters)
            if expected is None:
                problems.append(f"{name}: the model has no such module")
            elif expected != shape:
                problems.append(f"{name}: {list(shape)} in the adapter, {list(expected)} for the model")
    return problems


def describe(fingerprint: dict) -> str:
    """'Qwen2-VL (Qwen2VLForConditionalGeneration), hidden size 64, 2 layers'."""
    family = SUPPORTED_MODEL_TYPES.get(fingerprint.get("model_type"), fingerprint.get("model_type"))
    return (f"{family} ({fingerprint.get('architecture')}), hidden size {fingerprint.get('hidden_size')}, "
            f"{fingerprint.get('num_hidden_layers')} layers")


def _expected_shape(name: str, shape: tuple, modules: dict, parameters: dict) -> tuple | None:
    """The shape ``model`` needs for adapter tensor ``name`` (None: nothing in the model takes it).

    A LoRA factor keeps the adapter's rank r and takes the layer's size on the other axis
    (``LORA_FACTORS``); anything else (a ``modules_to_save`` copy) is a parameter of the model
    by the same name, of the same shape.
    """
    for part, (attribute, axis) in LORA_FACTORS.items():
        if part in name:
            module = modules.get(name.split(part)[0])
            if module is None:
                return None
            size = getattr(module, attribute, None)
            if size is None or len(shape) != 2:
                return shape  # a layer kind whose sizes are not read here: peft checks it
            expected = list(shape)
            expected[axis] = size
            return tuple(expected)
    if ".lora_" in name:  # other LoRA parts (DoRA magnitudes, ...): their module must exist
        return shape if name.split(".lora_")[0] in modules else None
    parameter = parameters.get(name)
    return None if parameter is None else tuple(parameter.shape)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise VlmtuneError(f"{path}: not a readable JSON file ({e}); the adapter folder is damaged") from e
    if not isinstance(data, dict):
        raise VlmtuneError(f"{path}: expected a JSON object; the adapter folder is damaged")
    return data
