"""The model card: a Hugging Face style ``README.md`` beside a run's final model and an export.

    RUN/final/README.md        written when training ends (the adapter, or full fine-tuning's weights)
    OUT/README.md              written by ``vlmtune export`` (the merged model, or the adapter copied)

Everything the card says is read from the run folder, so any finished run can get one:

- ``RUN/config.yaml``, the resolved config: base model, method, the loss (or GRPO) parameters,
  LoRA settings, the data files. The whole file is quoted in the card, and the command that
  reproduces the run is ``vlmtune train --config`` on it (overrides are already folded in);
- the data files it names: their sha256, so a reader can check that their copy is the one
  trained on (the images the records point to are not hashed);
- ``RUN/metrics.jsonl``: the number of optimizer steps, the last training row and the last
  held-out (``eval/``) row;
- every ``metrics.json`` written by ``vlmtune eval --out`` inside the run folder (for example
  ``RUN/eval/test``): held-out metrics with their 95% bootstrap confidence intervals.

The YAML front matter holds ``base_model``, ``library_name`` (``peft`` for an adapter,
``transformers`` for merged weights), ``tags`` and a ``license`` left empty for the user to fill
in: the licence depends on the base model and the data, which this package cannot know.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from vlmtune import NAME, __version__
from vlmtune.config import LossConfig
from vlmtune.errors import VlmtuneError

log = logging.getLogger(__name__)

LICENSE_LINE = "license: null  # fill in: the licence that the base model and the training data allow\n"
SKIPPED_FOLDERS = ("checkpoint", "tensorboard", "final")  # no eval output lives in these


def write_model_card(run_dir: str | Path, out_dir: str | Path, merged: bool = False) -> Path:
    """Write ``out_dir/README.md``, the card of the run in ``run_dir``; ``merged``: the folder holds
    the adapter merged into the base weights (else the adapter or full fine-tuning's weights)."""
    run, out = Path(run_dir), Path(out_dir)
    config = read_run_config(run)
    text = model_card_text(
        config=config,
        config_text=(run / "config.yaml").read_text(encoding="utf-8"),
        fingerprints=data_fingerprints(config),
        train_rows=read_metrics_rows(run / "metrics.jsonl"),
        eval_results=read_eval_results(run),
        adapter=_is_adapter(config) and not merged,
    )
    path = out / "README.md"
    path.write_text(text, encoding="utf-8")
    log.info("wrote the model card %s", path)
    return path


def model_card_text(config: dict, config_text: str, fingerprints: dict[str, str | None],
                    train_rows: list[dict], eval_results: dict[str, dict], adapter: bool) -> str:
    """The card as text: YAML front matter, then the sections, from what ``write_model_card`` read."""
    base = config["model"]["name_or_path"]
    algo = config.get("train", {}).get("algo", "dpo")
    front = {
        "base_model": base,
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": [NAME, algo, *(["lora"] if adapter else [])],
    }
    sections = [
        f"# {Path(str(config.get('train', {}).get('output_dir', 'model'))).name}",
        f"A vision-language model fine-tuned from `{base}` with {_method_name(config)} by {NAME} {__version__}. "
        + _what_the_folder_holds(config, adapter),
        "## Training\n\n" + _table(["setting", "value"], _training_rows(config, train_rows)),
        "## Method parameters\n\n" + _table(["parameter", "value"], _method_parameters(config)),
        "## Data\n\n" + _data_section(fingerprints),
        "## Results\n\n" + _results_section(train_rows, eval_results),
        "## Reproduce\n\n" + _reproduce_section(config_text),
        "## Licence\n\nNot set: fill in the `license` field above with the terms that the base model "
        "and the training data allow.",
    ]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + LICENSE_LINE + "---\n\n" + "\n\n".join(sections) + "\n"


def read_run_config(run: Path) -> dict:
    """``RUN/config.yaml`` as a dict; it must name the base model."""
    path = run / "config.yaml"
    if not path.is_file():
        raise VlmtuneError(f"{run} has no config.yaml: it does not look like a {NAME} training run")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise VlmtuneError(f"{path}: not a readable YAML file ({e}); the run folder is damaged") from e
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not config["model"].get("name_or_path"):
        raise VlmtuneError(f"{path} names no base model (model.name_or_path); the run folder is damaged")
    return config


def sha256_of_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprints(config: dict) -> dict[str, str | None]:
    """``{path as the config names it: sha256}`` of the train and eval files; None where the file
    is not found from the current folder (a relative path resolves from where training ran)."""
    data = config.get("data") or {}
    named = [data[key] for key in ("train", "eval") if data.get(key)]
    return {str(p): sha256_of_file(Path(p)) if Path(p).is_file() else None for p in named}


def read_metrics_rows(path: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``; none when the file is absent."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise VlmtuneError(f"{path}, line {number}: not JSON ({e.msg}); the run folder is damaged") from e
    return rows


def read_eval_results(run: Path) -> dict[str, dict]:
    """``{folder relative to the run: {metric: {value, ci_low, ci_high, n}}}`` for every
    ``metrics.json`` that ``vlmtune eval --out`` wrote inside the run folder."""
    results = {}
    for path in sorted(run.rglob("metrics.json")):
        where = path.parent.relative_to(run)
        if any(part.startswith(SKIPPED_FOLDERS) for part in where.parts):
            continue
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VlmtuneError(f"{path}: not JSON ({e}); rerun `{NAME} eval --out {path.parent}`") from e
        if isinstance(metrics, dict) and all(isinstance(m, dict) and "value" in m for m in metrics.values()):
            results[where.as_posix()] = metrics
    return results


def _is_adapter(config: dict) -> bool:
    return bool((config.get("lora") or {}).get("enabled", True))


def _what_the_folder_holds(config: dict, adapter: bool) -> str:
    if adapter:
        return "This folder holds a LoRA adapter: load it on the base model with peft."
    if _is_adapter(config):
        return "This folder holds the LoRA adapter merged into the base weights: it loads with plain transformers."
    return "This folder holds the fully fine-tuned weights: it loads with plain transformers."


def _method_name(config: dict) -> str:
    algo = config.get("train", {}).get("algo", "dpo")
    if algo == "sft":
        return "supervised fine-tuning (SFT)"
    if algo == "grpo":
        return "GRPO (group relative policy optimisation)"
    if algo == "rft":
        return "rejection-sampling fine-tuning (SFT on the best of the policy's own judged samples)"
    if algo == "online_dpo":
        return f"online DPO on the policy's own judged samples, loss `{(config.get('loss') or {}).get('name')}`"
    return f"preference optimisation, loss `{(config.get('loss') or {}).get('name', 'dpo')}`"


def _training_rows(config: dict, train_rows: list[dict]) -> list[list[str]]:
    train, lora = config.get("train") or {}, config.get("lora") or {}
    steps = max((row["step"] for row in train_rows if "step" in row), default=None)
    rows = [["method", _method_name(config)], ["base model", f"`{config['model']['name_or_path']}`"],
            ["optimizer steps", str(steps) if steps is not None else "not recorded (no metrics.jsonl)"]]
    if _is_adapter(config):
        rows.append(["LoRA", f"rank {lora.get('rank')}, alpha {lora.get('alpha')}, vision tower {lora.get('vision')}"])
    else:
        rows.append(["weights", "full fine-tuning"])
    for key in ("lr", "batch_size", "grad_accum", "schedule", "warmup_ratio", "seed", "mixed_precision"):
        if key in train:
            rows.append([f"train.{key}", str(train[key])])
    return rows


def _method_parameters(config: dict) -> list[list[str]]:
    algo = config.get("train", {}).get("algo", "dpo")
    if algo == "sft":
        return [["loss", "mean next-token negative log-likelihood of the chosen answers"]]
    sections = {"grpo": ("grpo",), "rft": ("online",), "online_dpo": ("online", "loss")}.get(algo, ("loss",))
    read = _loss_keys_read(config.get("loss") or {}, algo)
    return [[f"{section}.{key}", _value(value)] for section in sections
            for key, value in (config.get(section) or {}).items() if section != "loss" or key in read]


def _loss_keys_read(loss: dict, algo: str) -> set[str]:
    """The ``loss.*`` keys the run's loss reads; every key when the section does not validate."""
    from pydantic import ValidationError

    try:
        return set(LossConfig.model_validate(loss).keys_read(algo))
    except (ValidationError, TypeError):
        return set(loss)


def _data_section(fingerprints: dict[str, str | None]) -> str:
    if not fingerprints:
        return "The config names no data file."
    rows = [[f"`{path}`", f"`{digest}`" if digest else "not found when this card was written"]
            for path, digest in fingerprints.items()]
    return _table(["file", "sha256"], rows) + "\n\nThe images the records point to are not part of the fingerprint."


def _results_section(train_rows: list[dict], eval_results: dict[str, dict]) -> str:
    parts = []
    last_train = next((row for row in reversed(train_rows) if "loss" in row), None)
    last_eval = next((row for row in reversed(train_rows) if any(k.startswith("eval/") for k in row)), None)
    for title, row in (("Last training step", last_train), ("Last held-out evaluation during training", last_eval)):
        if row is not None:
            rows = [[name, _value(v)] for name, v in row.items() if name not in ("step", "epoch", "pairs_per_s")]
            parts.append(f"{title} (step {row.get('step')}):\n\n" + _table(["metric", "value"], rows))
    for where, metrics in eval_results.items():
        rows = [[name, _value(m["value"]), _ci(m), str(m.get("n", ""))] for name, m in metrics.items()]
        parts.append(f"`{NAME} eval` in `{where}`:\n\n" + _table(["metric", "value", "95% CI", "n"], rows))
    return "\n\n".join(parts) if parts else "The run recorded no metrics."


def _reproduce_section(config_text: str) -> str:
    return (f"Install {NAME} {__version__}, save the config below as `config.yaml` (it is the run's resolved "
            f"config: command-line overrides are folded in) and run:\n\n```bash\n{NAME} train --config config.yaml\n```"
            f"\n\n```yaml\n{config_text.rstrip()}\n```")


def _ci(metric: dict) -> str:
    low, high = metric.get("ci_low"), metric.get("ci_high")
    return f"[{_value(low)}, {_value(high)}]" if low is not None and high is not None else ""


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)
