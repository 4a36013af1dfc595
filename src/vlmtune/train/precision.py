"""Mixed precision of one training run (``train.mixed_precision``): autocast and, under fp16, a gradient scaler.

The run owns these rather than accelerate's ``Accelerator``, whose precision is fixed once per process
(``AcceleratorState`` is a per-process singleton that refuses a second, different ``mixed_precision``):
so an fp32 run and a bf16 or fp16 run can follow each other in one process, and fp16 works on CPU too
(accelerate turns fp16 off on CPU; torch's CPU autocast and ``GradScaler("cpu")`` support it).

- ``no``: fp32, nothing changes.
- ``bf16``: forwards run under ``torch.autocast(dtype=bfloat16)``; no scaler is needed.
- ``fp16``: forwards run under ``torch.autocast(dtype=float16)``; the loss is multiplied by the
  scaler's scale before ``backward``, gradients are unscaled before clipping, and a step whose
  gradients hold inf or NaN is skipped (weights and optimizer state unchanged) while the scale is
  halved (``torch.amp.GradScaler``'s defaults: start at 2**16, double after 2000 good steps).
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.dtype = DTYPES[mode]
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call ``backward`` on: multiplied by the fp16 scale, else unchanged."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer) -> None:
        """Divide the gradients by the fp16 scale in place, so clipping and ``grad_norm`` see true values."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """Step ``optimizer``; False when the fp16 scaler skipped it because a gradient was inf or NaN."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # The scaler lowers its scale exactly when it found non-finite gradients and skipped the step.
        return self.scaler.get_scale() >= before

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None:
            self.scaler.load_state_dict(state)
