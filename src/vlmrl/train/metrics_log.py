"""Where a run's numbers go: ``RUN/metrics.jsonl``, TensorBoard (``RUN/tensorboard``) and a progress bar.

Names follow TRL (``loss``, ``rewards/chosen``, ``rewards/accuracies``, ``logps/chosen``, ...),
held-out ones prefixed with ``eval/``. Only the main process writes. On resume, rows after the
checkpoint's step are dropped first, so the file of a resumed run reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


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
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not progress)

    def write(self, row: dict) -> None:
        """Append one row (it has a ``step``) to the JSONL file and TensorBoard."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
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
        self.path.write_text("".join(line + "\n" for line in kept))
