"""Load a Qwen-VL family model and its processor; add LoRA; the reference model.

Families: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``SUPPORTED_MODEL_TYPES``), from a local folder or a
hub id. ``load_model`` is the one loading function of training, eval, infer, compare and export;
its ``loader`` picks how the weights are loaded: ``transformers`` (``AutoModelForImageTextToText``)
or ``unsloth`` (Unsloth's ``FastVisionModel``, CUDA + the unsloth package, see
``vlmtune.models.unsloth_loader``). The processor always comes from ``AutoProcessor``.

Security: weights are read from safetensors only, and a folder that ships its own Python code
(an ``auto_map`` in its config files) is refused unless the caller passes
``trust_remote_code=True``, which only a command-line flag (``--trust-remote-code``) sets.

The reference model of DPO is the policy with its LoRA adapter switched off (``reference_mode``):
no second copy in memory. Full fine-tuning needs a real copy (``frozen_copy``).
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Iterator

from vlmtune.errors import VlmtuneError

SUPPORTED_MODEL_TYPES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}

# The attention implementations that take an arbitrary 4D mask (the packed pair forward and the
# shared-prompt group forward need one); flash-attention takes none.
MASKED_ATTENTION = ("sdpa", "eager")

LOADERS = ("transformers", "unsloth")

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}

# The files of a model folder that may name custom code (``auto_map``): model, processor, tokenizer.
CODE_MAP_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json")

# The text decoder's linear layers, by module path. The vision tower has modules with the same
# short names (Qwen2.5-VL's vision MLP has gate/up/down_proj too), so a bare ["q_proj", ...] list
# would put LoRA on the vision tower as well; peft takes a string as a full-match regex.
LANGUAGE_MODEL_LINEARS = (
    r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)
VISION_LINEARS = r".*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2|gate_proj|up_proj|down_proj|linear_fc1|linear_fc2))"
TRAIN_VISION = ("frozen", "lora", "full")


def load_model(
    name_or_path: str | Path,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
    loader: str = "transformers",
    gradient_checkpointing: bool = False,
):
    """Load ``(model, processor)`` from a local folder or a hub id.

    ``min_pixels``/``max_pixels`` bound each image's resized area, so the number of image tokens:
    lowering ``max_pixels`` is the main lever against running out of memory. ``load_in_4bit``
    quantises the language model to NF4 and prepares it for training adapters on top (QLoRA); it
    needs bitsandbytes and a CUDA device. ``gradient_checkpointing`` recomputes activations in the
    backward pass instead of keeping them (non-reentrant, so it works with frozen inputs and DDP).
    ``trust_remote_code`` lets a folder's own Python code run: only a command-line flag sets it.
    """
    import torch

    if loader not in LOADERS:
        raise VlmtuneError(f"unknown loader {loader!r}: choose one of {', '.join(LOADERS)}")
    source = _resolve(name_or_path)
    torch_dtype = getattr(torch, _dtype_name(dtype))
    check_model_source(source, trust_remote_code)
    if loader == "unsloth":
        from vlmtune.models.unsloth_loader import load_model_unsloth

        if attn_implementation:
            raise VlmtuneError("loader 'unsloth' picks its own attention kernels: leave model.attn_implementation unset")
        model = load_model_unsloth(source, torch_dtype, load_in_4bit, gradient_checkpointing, trust_remote_code)
    else:
        model = _load_transformers(source, torch_dtype, attn_implementation, trust_remote_code, load_in_4bit)
        _prepare_for_training(model, load_in_4bit, gradient_checkpointing)
    return model, load_processor(source, min_pixels, max_pixels, trust_remote_code)


def check_model_source(source: str, trust_remote_code: bool = False) -> dict:
    """The model's ``config.json`` as a dict, read without running any code, once it is known to be
    loadable: a supported model type, and no custom code (``auto_map``) unless ``trust_remote_code``."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, ValueError) as e:
        raise VlmtuneError(f"cannot read the model config of {source}: {e}") from e
    if not trust_remote_code:
        code_file = "config.json" if "auto_map" in config else _local_code_map(source)
        if code_file:
            raise VlmtuneError(
                f"{source}: {code_file} has an auto_map, so the model folder ships its own Python code; "
                "vlmtune runs such code only when you pass --trust-remote-code on the command line "
                "(do that only for a folder you trust)"
            )
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES and not trust_remote_code:
        raise VlmtuneError(
            f"{source} is a {model_type!r} model; vlmtune supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES.values())} (model types {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return config


def load_processor(source: str, min_pixels: int | None = None, max_pixels: int | None = None,
                   trust_remote_code: bool = False):
    """The model's ``AutoProcessor``, with the image-area bounds when given."""
    from transformers import AutoProcessor

    pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **pixels)
    except OSError as e:
        raise VlmtuneError(f"cannot load the processor from {source}: {e}") from e


def family_of(model) -> str:
    """The family name ("Qwen2-VL", ...) of a loaded model, adapter or not."""
    return SUPPORTED_MODEL_TYPES.get(model.config.model_type, model.config.model_type)


def add_lora(
    model,
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: str | list[str] | None = None,
    train_vision: str = "frozen",
    train_merger: bool = False,
):
    """Wrap ``model`` in a peft LoRA adapter on the language model's linear layers.

    ``train_vision``: "frozen" (default) leaves the vision tower as it is, "lora" adds LoRA to its
    linear layers too, "full" trains its weights directly. ``train_merger`` trains the projector
    that maps vision features into the language model. Fully trained modules are peft
    ``modules_to_save`` copies, so switching the adapter off (``reference_mode``) still gives the
    untouched base model.
    """
    from peft import LoraConfig, get_peft_model

    if train_vision not in TRAIN_VISION:
        raise VlmtuneError(f"train_vision must be one of {', '.join(TRAIN_VISION)}, not {train_vision!r}")
    targets = target_modules or LANGUAGE_MODEL_LINEARS
    if train_vision == "lora":
        if not isinstance(targets, str):
            raise VlmtuneError("train_vision='lora' needs target_modules as a regex string (or left unset)")
        targets = f"(?:{targets})|(?:{VISION_LINEARS})"
    modules_to_save = _vision_modules(model, full=train_vision == "full", merger=train_merger)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@contextlib.contextmanager
def reference_mode(model) -> Iterator[None]:
    """Run the reference model: the same weights with the adapter switched off, without gradients."""
    import torch
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise VlmtuneError("reference_mode needs a LoRA model (add_lora); for full fine-tuning use frozen_copy(model)")
    with model.disable_adapter(), torch.no_grad():
        yield


@contextlib.contextmanager
def reference_forward(reference, policy) -> Iterator:
    """The model to run as the reference, without gradients and in eval mode: ``reference`` (a
    separate frozen model) when given, else ``policy`` (unwrapped) with its adapter switched off."""
    import torch

    if reference is not None:
        context, model = torch.no_grad(), reference
    else:
        context, model = reference_mode(policy), policy
    with context, eval_mode(model):
        yield model


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """The reference is a fixed function: no dropout, whatever mode the policy is in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def frozen_copy(model):
    """A separate frozen copy of ``model`` in eval mode: the reference for full fine-tuning."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def _vision_modules(model, full: bool, merger: bool) -> list[str]:
    """Module-name suffixes of the vision tower (and/or merger) to train as whole modules."""
    visual = model.model.visual
    names = []
    if full:
        names += [name for name in ("patch_embed", "pos_embed") if hasattr(visual, name)]
        names += [f"blocks.{i}" for i in range(len(visual.blocks))]
    if merger:
        names.append("merger")
        names += [f"deepstack_merger_list.{i}" for i in range(len(getattr(visual, "deepstack_merger_list", [])))]
    return [f"visual.{name}" for name in names]


def _load_transformers(source: str, torch_dtype, attn_implementation, trust_remote_code: bool, load_in_4bit: bool):
    from transformers import AutoModelForImageTextToText

    kwargs = dict(dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        kwargs["quantization_config"] = _four_bit_config(torch_dtype)
    try:
        return AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    except OSError as e:
        raise VlmtuneError(f"cannot load the model from {source}: {e}") from e


def _prepare_for_training(model, load_in_4bit: bool, gradient_checkpointing: bool) -> None:
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def _local_code_map(source: str) -> str | None:
    """The first processor or tokenizer file of a local folder that names custom code, if any."""
    folder = Path(source)
    for name in CODE_MAP_FILES[1:]:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise VlmtuneError(f"{path}: not a readable JSON file ({e}); repair or remove it") from e
        if isinstance(data, dict) and "auto_map" in data:
            return name
    return None


def _resolve(name_or_path: str | Path) -> str:
    """A local folder as a path string, or a hub id as given; a missing local path is an error."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = path.is_absolute() or text.startswith((".", "~")) or text.count("/") != 1 or path.exists()
    if looks_local:
        raise VlmtuneError(
            f"no model folder at {text}: give a folder with config.json and model.safetensors, "
            "a hub id such as Qwen/Qwen2-VL-2B-Instruct, or build one with `vlmtune model tiny`"
        )
    return text


def _dtype_name(dtype: str) -> str:
    if dtype not in DTYPES:
        raise VlmtuneError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _four_bit_config(compute_dtype):
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("a CUDA device")
    if missing:
        raise VlmtuneError(f"4-bit loading (QLoRA) needs {' and '.join(missing)}; load without 4-bit instead")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        # The vision tower and the output head stay in full precision, as in QLoRA for VLMs.
        llm_int8_skip_modules=["visual", "lm_head"],
    )
