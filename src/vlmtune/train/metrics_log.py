"""Where a run's numbers go: ``RUN/metrics.jsonl``, TensorBoard (``RUN/tensorboard``) and a progress bar.

Each row holds the step objects' metrics plus the loop's ``step``, ``epoch``, ``lr``, ``grad_norm``
and ``pairs_per_s``; held-out ones are prefixed with ``eval/``. SFT and the DPO family use TRL's
DPOTrainer names (``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``). GRPO logs TRL GRPOTrainer's names
(``loss``, ``reward``, ``reward_std``, ``frac_reward_zero_std``, ``rewards/<function>/mean|std``,
``completions/mean_length``, ``completions/min_length``, ``completions/max_length``,
``completions/clipped_ratio``, ``kl``, ``entropy``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``clip_ratio/region_mean``) and vlmtune's own: ``em_rate`` (mean task accuracy of the samples),
``completion_length`` and ``frac_zero_std_groups`` (the same numbers as TRL's mean length and
``frac_reward_zero_std``), ``clip_fraction``, ``clip_ratio/low``, ``clip_ratio/high`` (the same as
TRL's ``clip_ratio/*_mean``), ``ratio_mean`` and ``vision_tokens_masked``. Its held-out check
writes ``eval/accuracy``, ``eval/exact_match`` and ``eval/loss``.

A non-finite value (the ``grad_norm`` of an fp16 step the scaler skipped) is written as JSON ``null``
and left out of TensorBoard. Only the main process writes; a write that fails raises a ``VlmtuneError``
naming the file (``checkpoint.naming_unwritable``). On resume, rows after the checkpoint's step are dropped first, so the file of a
resumed run reads like one uninterrupted run.

``train.report_to`` picks the trackers. TensorBoard is written here (it drops the points past the
checkpoint on resume, and takes the training samples: a markdown table per sampling step, the items'
images once); wandb and mlflow go through accelerate's trackers (``Accelerator(log_with=...)``,
``init_trackers``, ``accelerator.log``), given the same rows, the flattened config as their
hyperparameters, the output folder's name as the run name and ``vlmtune`` as project / experiment.
wandb also gets each sampling step as a table. They read their own settings (``WANDB_MODE``,
``WANDB_DIR``, ``MLFLOW_TRACKING_URI``, ...); a resumed run is a new run there.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

from vlmtune import NAME
from vlmtune.errors import VlmtuneError
from vlmtune.progress import bars_shown
from vlmtune.train.checkpoint import naming_unwritable

# The trackers accelerate runs for us, and the package each needs (in the ``trackers`` extra).
TRACKER_PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}  # name: (module, pip)


def accelerate_trackers(report_to: list[str]) -> list[str]:
    """The trackers of ``train.report_to`` that accelerate runs (all but TensorBoard), each checked importable.

    A missing package is a ``VlmtuneError`` naming the extra to install: accelerate itself would drop the
    tracker with only a debug message.
    """
    names = [n for n in dict.fromkeys(report_to) if n != "tensorboard"]
    missing = [n for n in names if importlib.util.find_spec(TRACKER_PACKAGES[n][0]) is None]
    if missing:
        packages = " ".join(TRACKER_PACKAGES[n][1] for n in missing)
        raise VlmtuneError(
            f"train.report_to names {', '.join(missing)}, but {packages} is not installed: "
            f"pip install '{NAME}[trackers]' (or pip install {packages}), or take it out of train.report_to"
        )
    return names


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"train.lr": 1e-05, ...}``; lists and None as text (trackers take scalars only)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool,
                 tensorboard: bool = True, accelerator=None, config: dict[str, Any] | None = None):
        """``accelerator``: the run's, built with ``log_with=accelerate_trackers(...)``; ``config``: the run's
        settings, given to those trackers as hyperparameters."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.bar = None
        self.trackers = []
        if not enabled:
            return
        from tqdm.auto import tqdm

        self._keep_rows_up_to(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge_step = start_step + 1 if start_step else None  # drop TensorBoard points past the checkpoint
            board = Path(run_dir) / "tensorboard"
            with naming_unwritable(board, run_dir):
                self.writer = SummaryWriter(str(board), purge_step=purge_step)
        if accelerator is not None and accelerator.log_with:
            self.accelerator = accelerator
            name = Path(run_dir).resolve().name
            try:
                accelerator.init_trackers(NAME, config=flat_config(config or {}),
                                          init_kwargs={"wandb": {"name": name}, "mlflow": {"run_name": name}})
            except Exception as e:  # each tracker raises its own kind; all mean the user's settings for it
                raise VlmtuneError(
                    f"train.report_to: starting {', '.join(map(str, accelerator.log_with))} failed: "
                    f"{type(e).__name__}: {e}. Check that tracker's settings (wandb: WANDB_MODE, WANDB_API_KEY; "
                    "mlflow: MLFLOW_TRACKING_URI), or take it out of train.report_to"
                ) from e
            self.trackers = list(accelerator.trackers)
        # train.progress, and like every bar of the command line only on a terminal and not with --quiet
        shown = progress and bars_shown(sys.stderr)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not shown)

    def write(self, row: dict) -> None:
        """Append one row (it has a ``step``) to the JSONL file and TensorBoard."""
        if not self.enabled:
            return
        finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}
        with naming_unwritable(self.path, self.path.parent):
            with self.path.open("a") as f:
                f.write(json.dumps(finite, allow_nan=False) + "\n")
        scalars = {name: value for name, value in row.items()
                   if name != "step" and isinstance(value, (int, float)) and math.isfinite(value)}
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, row["step"])
            self.writer.flush()
        if self.trackers:
            self.accelerator.log(scalars, step=row["step"])

    def write_samples(self, step: int, rows: list[dict[str, Any]], images: bool) -> None:
        """One sampling step: TensorBoard's text tab gets the rows as a markdown table (and, with
        ``images``, each item's image once); wandb gets them as a table."""
        from vlmtune.train.samples import COLUMNS, markdown_table

        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.add_text("samples", markdown_table(rows), step)
            if images:
                self._add_images(rows, step)
            self.writer.flush()
        for tracker in self.trackers:
            if tracker.name == "wandb":
                tracker.log_table("samples", columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows],
                                  step=step)

    def _add_images(self, rows: list[dict[str, Any]], step: int) -> None:
        import numpy as np
        from PIL import Image

        for row in rows:
            if row["image"]:
                with Image.open(row["image"]) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(f"samples/{row['id']}", pixels, step, dataformats="HWC")

    def advance(self, row: dict) -> None:
        """Move the progress bar one step, showing live loss, reward accuracy and pairs/s."""
        if not self.enabled:
            return
        shown = {"loss": f"{row['loss']:.4f}"}
        if "rewards/accuracies" in row:
            shown["acc"] = f"{row['rewards/accuracies']:.2f}"
        shown["pairs/s"] = f"{row['pairs_per_s']:.1f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        """Close the bar, TensorBoard and the accelerate trackers (not ``end_training``: that would also
        end the process group, which iterative DPO's next round still needs)."""
        if not self.enabled:
            return
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        for tracker in self.trackers:
            tracker.finish()
        if self.trackers:
            self.accelerator.trackers = []
        self.trackers = []

    def _keep_rows_up_to(self, step: int) -> None:
        if not self.path.is_file():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["step"] <= step]
        with naming_unwritable(self.path, self.path.parent):
            self.path.write_text("".join(line + "\n" for line in kept))

