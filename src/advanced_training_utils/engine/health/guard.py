"""The one place that decides whether an optimizer step is taken.

A step is *bad* when the loss or the (unscaled) gradient norm is NaN or Inf, or, with
``spike_factor=k``, when the loss is a spike:

    loss > low + k * max(high - low, floor)

where ``low`` and ``high`` are the 10th and 90th percentiles of the recent good losses (the last
``spike_window`` steps; nearest-rank, so they are losses that occurred: ``low`` rounds down and
``high`` up), and ``floor`` is 1/64 of the largest ``high - low`` seen in the run. The threshold
is refreshed every ``_REFRESH`` steps once half the window is filled.

The rule is invariant under shifting and (positive) scaling of the loss: a loss ``s * L + c``
gets the same decisions as ``L``, so negative losses (-cosine similarity, -CCC) and losses
that sit at 0 work like positive ones. For losses that approach 0 from above (cross-entropy,
MSE), ``low`` is near 0 and the rule is about ``k`` x the 90th percentile: late in training a
cross-entropy median can be 0.02 while an ordinary hard batch scores 0.5, and that batch must not
count as a spike. A history with no spread (a loss constant at 0, say) gives no scale to judge
by: no step is a spike then. The floor keeps a loss that has become almost flat (one fixed batch,
full-batch training) from calling every small wobble a spike. A bad step is not applied:
parameters, optimizer state, the scheduler and (fp16) the scaler's growth are left alone, and
the step is counted.

How the skip is applied without reading the device on the host: optimizers that support AMP
scaling natively (torch's fused Adam, AdamW, SGD, Adagrad: ``_step_supports_amp_scaling``) take a
``found_inf`` tensor and skip inside their kernel, so the decision never leaves the device. Other
optimizers need a Python ``if``; for them the guard reads one flag per optimizer step (documented
cost; the default optimizer is fused AdamW, which avoids it).

Per step the guard launches five tiny kernels and keeps references to the step's loss, norm and
flags; the per-step log, counts and the current run of consecutive bad steps are reduced on the
device when the caller reads them (epoch end, or its recovery check interval).

With ``enabled=False`` every step is applied, NaN included (used to show what the guard saves).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from ..._validate import check_int, check_real

__all__ = ["StepGuard"]

_REFRESH = 8  # steps between refreshes of the spike threshold
_FLOOR = 1 / 64  # the spread's floor, as a fraction of the largest spread seen in the run


class StepGuard:
    """Detect bad steps and apply or skip the optimizer step accordingly.

    Args:
        optimizer: the optimizer whose steps are guarded.
        enabled: False applies every step (no skipping at all).
        spike_factor: ``k``: treat a loss above ``low + k * spread`` of the recent good losses
            as bad (see the module docstring; None: off).
        spike_window: how many recent steps the percentiles are taken over (good steps only).
        reduce_max: under DDP, an in-place all-reduce MAX so every rank skips the same steps.

    Attributes:
        device_side: True when skips are applied on the device (no host read per step).
    """

    def __init__(self, optimizer: Optimizer, enabled: bool = True,
                 spike_factor: float | None = None, spike_window: int = 20,
                 reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.optimizer = optimizer
        self.enabled = enabled
        self.reduce_max = reduce_max
        self.spike_factor = (None if spike_factor is None else
                             check_real("spike_factor", spike_factor, low=1.0, low_inclusive=False))
        self.spike_window = check_int("spike_window", spike_window, low=2)
        self.device_side = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self.total_skipped = 0          # host totals of finished intervals
        self.total_spikes = 0
        self._count = 0                 # steps seen (drives the threshold refresh)
        self._recent: collections.deque[tuple[torch.Tensor, torch.Tensor]] = collections.deque(
            maxlen=self.spike_window)
        self._threshold: torch.Tensor | None = None
        self._spread_max: torch.Tensor | None = None  # largest high - low seen (for the floor)
        self._consec: torch.Tensor | None = None   # bad run carried over from earlier intervals
        self.reset_interval()

    # ------------------------------------------------------------------ per step
    def is_bad(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """0-dim bool tensor: the step must be skipped (non-finite, or a loss spike)."""
        loss = loss.detach().float()
        norm = grad_norm.detach().float().to(loss.device)
        nonfinite = torch.isfinite(loss + norm).logical_not_()  # NaN/Inf in either
        bad, spike = nonfinite, None
        if self.spike_factor is not None:
            if self._count % _REFRESH == 0:
                self._refresh_threshold(loss.device)
            if self._threshold is not None:
                spike = loss > self._threshold
                bad = nonfinite | spike
        if self.reduce_max is not None:  # every rank takes the same decision (no host read)
            bad = self.reduce_max(bad.float()) > 0
        self._count += 1
        self._recent.append((loss, bad))
        # The log's "bad" column counts skipped steps: a disabled guard skips none, although
        # it applies steps with a NaN loss (so the history never calls a NaN update skipped).
        skipped = bad if self.enabled else torch.zeros_like(bad)
        self._steps.append((loss, norm, skipped, spike))
        return bad

    def _refresh_threshold(self, device: torch.device) -> None:
        """``low + k * max(high - low, floor)`` over the recent good losses (half a window at
        least); +inf when they have no spread. Device ops only (no host read)."""
        if len(self._recent) < (self.spike_window + 1) // 2:
            return
        # float64 so that shifted and scaled losses give the same decisions (not on MPS).
        dtype = torch.float32 if device.type == "mps" else torch.float64
        losses = torch.stack([x for x, _ in self._recent]).to(dtype)
        bad = torch.stack([b for _, b in self._recent])
        good = torch.where(bad, torch.full_like(losses, math.nan), losses)
        low = torch.nanquantile(good, 0.1, interpolation="lower")
        high = torch.nanquantile(good, 0.9, interpolation="higher")
        spread = high - low                      # NaN when every recent step was bad
        if self._spread_max is not None:
            spread_max = torch.fmax(self._spread_max.to(spread), spread)
        else:
            spread_max = spread
        width = torch.maximum(spread, spread_max * _FLOOR)
        new = torch.where(width > 0, low + self.spike_factor * width,
                          torch.full_like(width, math.inf))
        # All recent steps bad (NaN): keep the previous threshold.
        if self._threshold is not None:
            new = torch.where(torch.isnan(spread), self._threshold.to(new), new)
        self._threshold = new
        self._spread_max = spread_max

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
    @property
    def steps_seen(self) -> int:
        """Optimizer steps decided so far (taken or skipped; restored by a resume)."""
        return self._count

    def reset_interval(self) -> None:
        """Start a new reading interval (an epoch, or a recovery check interval); the current
        run of consecutive bad steps carries over."""
        if getattr(self, "_steps", None):
            self._consec = self.consecutive()
        self._steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]] = []

    def interval_log(self) -> torch.Tensor | None:
        """``[steps, 4]`` device tensor of (loss, grad norm, bad, spike) since the last reset."""
        if not self._steps:
            return None
        loss = torch.stack([s[0] for s in self._steps])
        norm = torch.stack([s[1] for s in self._steps])
        bad = torch.stack([s[2] for s in self._steps]).float()
        spike = torch.stack([s[3] if s[3] is not None else torch.zeros_like(s[2])
                             for s in self._steps]).float()
        return torch.stack([loss, norm, bad, spike], dim=1)

    def consecutive(self) -> torch.Tensor | None:
        """Device 0-dim: the current run of consecutive bad steps (across intervals)."""
        if not self._steps:
            return self._consec
        bad = torch.stack([s[2] for s in self._steps])                  # [n]
        n = bad.numel()
        idx = torch.arange(n, device=bad.device)
        last_good = torch.where(bad, torch.full_like(idx, -1), idx).max()
        run = (n - 1 - last_good).float()
        if self._consec is not None:  # every step of this interval bad: add the earlier run
            run = torch.where(last_good < 0, run + self._consec.to(run.device), run)
        return run

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Host totals, the spike window and threshold, this interval's log, the bad run."""
        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().cpu()

        return {
            "total_skipped": self.total_skipped, "total_spikes": self.total_spikes,
            "count": self._count, "threshold": cpu(self._threshold),
            "spread_max": cpu(self._spread_max),
            "recent": None if not self._recent else torch.stack(
                [torch.stack([x, b.float()]) for x, b in self._recent]).cpu(),
            "steps": cpu(self.interval_log()), "consec": cpu(self._consec),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        dev = self.optimizer.param_groups[0]["params"][0].device
        self.total_skipped = int(state["total_skipped"])
        self.total_spikes = int(state.get("total_spikes", 0))
        self._count = int(state.get("count", 0))
        thr = state.get("threshold")
        self._threshold = None if thr is None else thr.to(dev)
        spread = state.get("spread_max")
        self._spread_max = None if spread is None else spread.to(dev)
        self._recent.clear()
        if state.get("recent") is not None:
            for row in state["recent"].to(dev).unbind(0):
                self._recent.append((row[0], row[1] > 0))
        self._consec = None if state.get("consec") is None else state["consec"].to(dev)
        self._steps = []
        steps = state.get("steps")
        if steps is not None:
            for row in steps.to(dev).unbind(0):
                self._steps.append((row[0], row[1], row[2] > 0, row[3] > 0))
