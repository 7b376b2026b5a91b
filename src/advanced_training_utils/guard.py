"""The one place that decides whether an optimizer step is taken.

A step is *bad* when the loss or the (unscaled) gradient norm is NaN or Inf, or, with
``spike_factor=k``, when the loss exceeds ``k`` times the median of the last ``spike_window`` good
losses (once at least half the window is filled; this assumes positive losses, as cross-entropy
and MSE are). A bad step is not applied: parameters, optimizer state, the scheduler and (fp16) the
scaler's growth are left alone, and the step is counted.

How the skip is applied without reading the device on the host: optimizers that support AMP
scaling natively (torch's fused Adam, AdamW, SGD, Adagrad: ``_step_supports_amp_scaling``) take a
``found_inf`` tensor and skip inside their kernel, so the decision never leaves the device. Other
optimizers need a Python ``if``; for them the guard reads one flag per optimizer step (documented
cost; the default optimizer is fused AdamW, which avoids it).

Every counter (skipped, spikes, the current run of consecutive bad steps, the per-step log of
losses, norms and flags) is a device tensor, read by the caller at epoch end or at its chosen
check interval.

With ``enabled=False`` every step is applied, NaN included (used to show what the guard saves).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from ._validate import check_int, check_real

__all__ = ["StepGuard"]


class StepGuard:
    """Detect bad steps and apply or skip the optimizer step accordingly.

    Args:
        optimizer: the optimizer whose steps are guarded.
        enabled: False applies every step (no skipping at all).
        spike_factor: treat a loss above ``spike_factor`` x the running median as bad (None: off).
        spike_window: how many recent good losses the median is taken over.
        reduce_max: under DDP, an in-place all-reduce MAX so every rank skips the same steps.

    Attributes:
        device_side: True when skips are applied on the device (no host read per step).
    """

    def __init__(self, optimizer: Optimizer, enabled: bool = True,
                 spike_factor: float | None = None, spike_window: int = 20,
                 reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.optimizer = optimizer
        self.reduce_max = reduce_max
        self.enabled = enabled
        self.spike_factor = (None if spike_factor is None else
                             check_real("spike_factor", spike_factor, low=1.0, low_inclusive=False))
        self.spike_window = check_int("spike_window", spike_window, low=2)
        self.device_side = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self.total_skipped = 0          # host totals of finished intervals
        self.total_spikes = 0
        self._losses: torch.Tensor | None = None   # [window] recent good losses (NaN = empty)
        self._pos = 0
        self._consec: torch.Tensor | None = None   # current run of consecutive bad steps
        self.reset_interval()

    # ------------------------------------------------------------------ per step
    def is_bad(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """0-dim bool tensor: the step must be skipped (non-finite, or a loss spike)."""
        loss = loss.detach().float()
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device)))
        spike = torch.zeros_like(bad)
        if self.spike_factor is not None:
            if self._losses is None or self._losses.device != loss.device:
                self._losses = torch.full((self.spike_window,), math.nan, device=loss.device)
            hist = self._losses
            filled = (~torch.isnan(hist)).sum() >= (self.spike_window + 1) // 2
            spike = filled & (loss > self.spike_factor * torch.nanmedian(hist)) & ~bad
            bad = bad | spike
            hist[self._pos % self.spike_window] = torch.where(
                bad, hist[self._pos % self.spike_window], loss)
            self._pos += 1
        if self.reduce_max is not None:  # every rank takes the same decision (no host read)
            flag = self.reduce_max(bad.float())
            bad = flag > 0
        self._log(loss, grad_norm, bad, spike)
        return bad

    def _log(self, loss: torch.Tensor, norm: torch.Tensor, bad: torch.Tensor,
             spike: torch.Tensor) -> None:
        dev = loss.device
        badf = bad.float()
        self._consec = badf if self._consec is None else (self._consec.to(dev) + 1.0) * badf
        self._max_consec = (self._consec if self._max_consec is None
                            else torch.maximum(self._max_consec, self._consec))
        self._steps.append(torch.stack([loss, norm.detach().float().to(dev), badf,
                                        spike.float()]))

    def step(self, bad: torch.Tensor) -> bool | None:
        """Apply the optimizer step unless ``bad``.

        Returns:
            None when the skip was applied on the device (the outcome is not known on the host
            yet); otherwise True when the step was taken and False when it was skipped.
        """
        opt = self.optimizer
        if not self.enabled:
            opt.step()
            return True
        if self.device_side:
            dev = opt.param_groups[0]["params"][0].device
            opt.found_inf = bad.to(dev, torch.float32)  # read by fused optimizers' kernels
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

    # ------------------------------------------------------------------ reading
    def reset_interval(self) -> None:
        """Start a new reading interval (an epoch, or a recovery check interval)."""
        self._steps: list[torch.Tensor] = []
        self._max_consec: torch.Tensor | None = None

    def interval_log(self) -> torch.Tensor | None:
        """``[steps, 4]`` device tensor of (loss, grad norm, bad, spike) since the last reset."""
        return torch.stack(self._steps) if self._steps else None

    def consecutive(self) -> torch.Tensor | None:
        """Device 0-dim: the current run of consecutive bad steps."""
        return self._consec

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Host totals, the spike window and the current bad run."""
        return {"total_skipped": self.total_skipped, "total_spikes": self.total_spikes,
                "losses": None if self._losses is None else self._losses.detach().cpu(),
                "pos": self._pos,
                "consec": None if self._consec is None else self._consec.detach().cpu(),
                "max_consec": None if self._max_consec is None else self._max_consec.detach().cpu(),
                "steps": None if not self._steps else torch.stack(self._steps).detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.total_skipped = int(state["total_skipped"])
        self.total_spikes = int(state.get("total_spikes", 0))
        dev = self.optimizer.param_groups[0]["params"][0].device
        self._losses = None if state.get("losses") is None else state["losses"].to(dev)
        self._pos = int(state.get("pos", 0))
        self._consec = None if state.get("consec") is None else state["consec"].to(dev)
        self._max_consec = (None if state.get("max_consec") is None
                            else state["max_consec"].to(dev))
        steps = state.get("steps")
        self._steps = [] if steps is None else list(steps.to(dev).unbind(0))
