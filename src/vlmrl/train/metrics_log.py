"""Where a run's numbers go: ``RUN/metrics.jsonl``, TensorBoard (``RUN/tensorboard``) and a progress bar.

Each row holds the step objects' metrics plus the loop's ``step``, ``epoch``, ``lr``, ``grad_norm``
and ``pairs_per_s``; held-out ones are prefixed with ``eval/``. SFT and the DPO family use TRL's
DPOTrainer names (``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``). GRPO logs TRL GRPOTrainer's names
(``loss``, ``reward``, ``reward_std``, ``frac_reward_zero_std``, ``rewards/<function>/mean|std``,
``completions/mean_length``, ``completions/min_length``, ``completions/max_length``,
``completions/clipped_ratio``, ``kl``, ``entropy``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``clip_ratio/region_mean``) and vlmrl's own: ``em_rate`` (mean task accuracy of the samples),
``completion_length`` and ``frac_zero_std_groups`` (the same numbers as TRL's mean length and
``frac_reward_zero_std``), ``clip_fraction``, ``clip_ratio/low``, ``clip_ratio/high`` (the same as
TRL's ``clip_ratio/*_mean``), ``ratio_mean`` and ``vision_tokens_masked``. Its held-out check
writes ``eval/accuracy``, ``eval/exact_match`` and ``eval/loss``.

A non-finite value (the ``grad_norm`` of an fp16 step the scaler skipped) is written as JSON ``null``
and left out of TensorBoard. Only the main process writes; a write that fails raises a ``VlmrlError``
naming the file (``checkpoint.naming_unwritable``). On resume, rows after the checkpoint's step are dropped first, so the file of a
resumed run reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from vlmrl.train.checkpoint import naming_unwritable


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self._keep_rows_up_to(start_step)
        purge_step = start_step + 1 if start_step else None  # drop TensorBoard points past the checkpoint
        board = Path(run_dir) / "tensorboard"
        with naming_unwritable(board, run_dir):
            self.writer = SummaryWriter(str(board), purge_step=purge_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not progress)

    def write(self, row: dict) -> None:
        """Append one row (it has a ``step``) to the JSONL file and TensorBoard."""
        if not self.enabled:
            return
        finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}
        with naming_unwritable(self.path, self.path.parent):
            with self.path.open("a") as f:
                f.write(json.dumps(finite, allow_nan=False) + "\n")
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(name, value, row["step"])
        self.writer.flush()

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
        if self.enabled:
            self.bar.close()
            self.writer.close()

    def _keep_rows_up_to(self, step: int) -> None:
        if not self.path.is_file():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["step"] <= step]
        with naming_unwritable(self.path, self.path.parent):
            self.path.write_text("".join(line + "\n" for line in kept))

