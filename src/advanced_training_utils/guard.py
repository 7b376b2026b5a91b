"""The one place that decides whether an optimizer step is taken.

A step is *bad* when the loss or the (unscaled) gradient norm is NaN or Inf. A bad step is not
applied: parameters, optimizer state, the scheduler and (for fp16) the scaler's growth are left
alone, and the step is counted.

How the skip is applied without reading the device on the host: optimizers that support AMP
scaling natively (torch's fused Adam, AdamW, SGD, Adagrad: ``_step_supports_amp_scaling``) take a
``found_inf`` tensor and skip inside their kernel, so the decision never leaves the device. Other
optimizers need a Python ``if``; for them the guard reads one flag per optimizer step (documented
cost; pass a fused optimizer, the default, to avoid it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["StepGuard"]


class StepGuard:
    """Detect non-finite steps and apply or skip the optimizer step accordingly.

    Args:
        optimizer: the optimizer whose steps are guarded.

    Attributes:
        device_side: True when skips are applied on the device (no host read per step).
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.device_side = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self._skipped: torch.Tensor | None = None   # device counter, read at epoch end
        self.total_skipped = 0                       # host total of finished epochs

    @staticmethod
    def is_bad(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """0-dim bool tensor: True when ``loss`` or ``grad_norm`` is NaN/Inf."""
        loss = loss.detach()
        return ~(torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device)))

    def step(self, bad: torch.Tensor) -> bool | None:
        """Apply the optimizer step unless ``bad``.

        Returns:
            None when the skip was applied on the device (the outcome is not known on the host
            yet); otherwise True when the step was taken and False when it was skipped.
        """
        opt = self.optimizer
        bad_f = bad.to(torch.float32)
        self._skipped = bad_f if self._skipped is None else self._skipped + bad_f.to(
            self._skipped.device)
        if self.device_side:
            dev = opt.param_groups[0]["params"][0].device
            opt.found_inf = bad_f.to(dev)  # read by fused optimizers' kernels
            opt.grad_scale = None
            try:
                opt.step()
            finally:
                del opt.found_inf, opt.grad_scale
            return None
        if bool(bad):  # host read: non-fused optimizers cannot skip on the device
            return False
        opt.step()
        return True

    def pop_skipped(self) -> torch.Tensor | None:
        """The device count of skipped steps since the last call (None when no step ran)."""
        out, self._skipped = self._skipped, None
        return out

    def state_dict(self) -> dict[str, Any]:
        """The host total of skipped steps."""
        return {"total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.total_skipped = int(state["total_skipped"])
